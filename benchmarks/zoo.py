"""The quality benchmark's model zoo: one pre-trained ViT, eight fine-tuned copies.

``python -m benchmarks.zoo`` builds (or finds in the cache) the zoo of each
seed and prints what it holds:

1. Data (:mod:`benchmarks.tasks`): eight image-classification tasks with
   their own image distributions and label functions, generated offline from
   ``jax.random.key(data_seed)``; the same images for every seed.
2. Pre-training: a small ViT (:mod:`benchmarks.vit`) on a separate pool of
   images of all eight families with a coarse 16-way label (family x one bit,
   see :mod:`benchmarks.tasks`), AdamW with warm-up and cosine decay.
3. Per task: a linear probe on the frozen pre-trained encoder (its head is
   the *pre-trained* baseline's head), then fine-tuning of the whole encoder
   with that head kept fixed (as CLIP's zero-shot heads are in the usual
   task-vector protocol; ``freeze_head=False`` trains it too, LP-FT), Adam
   with cosine decay and no weight decay.

Why these sizes (width 128, 2 blocks, 16k training images per task): with
width 64 x 4 blocks, or 4k images per task, every merge landed at the
pre-trained model's accuracy (the tasks' updates interfered completely) and
some tasks overfitted; this is the smallest setting found where the
fine-tuned models reach ~90 % and merging methods separate, within the
time budget of 2 CPU cores.

A *seed* changes everything that is trained: the pre-trained encoder's
initialisation and data order, every probe's and fine-tuning run's
initialisation and data order (and, in :mod:`benchmarks.quality`, the keys
of DARE and of randomized SVDs). The images do not change with the seed.

Each seed's zoo is cached under ``<cache>/zoo-<config hash>/seed<s>/`` as
orbax checkpoints (``pretrained/``, ``finetuned/<task>/``, ``heads/``) plus
``meta.json`` (written last, so a half-written zoo is rebuilt). The cache is
``--cache``, else ``$PACT_JAX_CACHE/zoo``, else ``~/.cache/pact_jax/zoo``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import tasks as tasks_mod
from benchmarks import vit

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    """What the zoo is built from; its hash names the cache directory."""

    # Bump when the task generators or the training code change, so cached zoos are rebuilt.
    version: int = 4
    vit: vit.ViTConfig = vit.ViTConfig(width=128, depth=2, heads=4, mlp=256)
    num_tasks: int = 8
    data_seed: int = 0
    train_size: int = 16384  # per task
    val_size: int = 256
    test_size: int = 1024
    pretrain_per_task: int = 8192
    pretrain_steps: int = 3000
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    probe_steps: int = 300
    probe_lr: float = 1e-2
    finetune_steps: int = 1000
    finetune_batch: int = 64
    finetune_lr: float = 1e-4
    weight_decay: float = 0.05  # pre-training only; fine-tuning uses none (it would pull every task towards 0)
    # As in the CLIP protocol (fixed zero-shot heads), fine-tuning keeps each task's probe head fixed
    # and trains the encoder only; False trains both (LP-FT).
    freeze_head: bool = True

    @property
    def task_list(self) -> tuple[tasks_mod.Task, ...]:
        return tasks_mod.TASKS[: self.num_tasks]

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]


# Tiny settings for the CI test (`--quick`): seconds, not minutes.
QUICK = ZooConfig(
    vit=vit.ViTConfig(width=16, depth=1, heads=2, mlp=32),
    num_tasks=4,
    train_size=256,
    val_size=64,
    test_size=64,
    pretrain_per_task=128,
    pretrain_steps=40,
    pretrain_batch=32,
    probe_steps=20,
    finetune_steps=20,
    finetune_batch=32,
    finetune_lr=1e-3,
)


class Zoo(NamedTuple):
    pretrained: PyTree  # encoder params
    finetuned: list[PyTree]  # one encoder per task
    probe_heads: PyTree  # {'kernel' (T, d, 10), 'bias' (T, 10)}: linear probes on the pre-trained encoder
    heads: PyTree  # fine-tuned heads, same shapes
    meta: dict[str, Any]


def default_cache_dir() -> Path:
    env = os.environ.get("PACT_JAX_CACHE")
    return Path(env) / "zoo" if env else Path.home() / ".cache" / "pact_jax" / "zoo"


def num_classes(cfg: ZooConfig) -> np.ndarray:
    return np.array([t.num_classes for t in cfg.task_list], np.int32)


def make_data(cfg: ZooConfig) -> dict[str, tasks_mod.Split]:
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    return tasks_mod.task_data(jax.random.key(cfg.data_seed), sizes, cfg.task_list)


# --------------------------------------------------------------------------
# Training


def _xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _fit(loss_fn: Callable, params: PyTree, opt: optax.GradientTransformation, keys: jax.Array):
    """``len(keys)`` optimiser steps in one ``lax.scan``; ``loss_fn(params, key)`` draws its own batch."""
    state = opt.init(params)

    def step(carry, k):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p, k)
        updates, s = opt.update(g, s, p)
        return (optax.apply_updates(p, updates), s), loss

    (params, _), losses = jax.lax.scan(step, (params, state), keys)
    return params, losses


def _schedule(lr: float, steps: int, warmup: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1), lr * 0.01)


@functools.lru_cache(maxsize=None)
def _make_pretrainer(cfg: ZooConfig):
    """Jitted ``(key, x, y) -> (encoder, losses)``; compiled once per config."""
    opt = optax.adamw(_schedule(cfg.pretrain_lr, cfg.pretrain_steps, cfg.pretrain_steps // 20), weight_decay=cfg.weight_decay)

    def train(key, x, y):
        k_init, k_head, k_steps = jax.random.split(key, 3)
        params = {
            "encoder": vit.init_encoder(k_init, cfg.vit),
            "head": vit.init_head(k_head, cfg.vit.width, 2 * len(cfg.task_list)),
        }

        def loss_fn(p, k):
            idx = jax.random.randint(k, (cfg.pretrain_batch,), 0, x.shape[0])
            return _xent(vit.head_logits(p["head"], vit.encode(cfg.vit, p["encoder"], x[idx])), y[idx])

        params, losses = _fit(loss_fn, params, opt, jax.random.split(k_steps, cfg.pretrain_steps))
        return params["encoder"], losses

    return jax.jit(train)


def pretrain(key: jax.Array, cfg: ZooConfig, x: np.ndarray, y: np.ndarray):
    """Encoder + 16-way head trained on the pre-training pool; returns ``(encoder, losses)``."""
    enc, losses = _make_pretrainer(cfg)(key, jnp.asarray(x), jnp.asarray(y))
    return enc, np.asarray(losses)


@functools.lru_cache(maxsize=None)
def _make_task_trainer(cfg: ZooConfig):
    """Jitted ``(key, encoder, x, y, n_classes) -> (ft_encoder, ft_head, probe_head, losses)`` for one task."""
    width = cfg.vit.width
    if cfg.train_size % 256:
        raise ValueError(f"train_size must be a multiple of 256, got {cfg.train_size}.")

    def train(key, encoder, x, y, ncls):
        k_head, k_probe, k_ft = jax.random.split(key, 3)
        feats = jax.lax.map(lambda xb: vit.encode(cfg.vit, encoder, xb), x.reshape(-1, 256, *x.shape[1:]))
        feats = feats.reshape(x.shape[0], width)

        def probe_loss(h, k):
            idx = jax.random.randint(k, (256,), 0, x.shape[0])
            return _xent(vit.head_logits(h, feats[idx], ncls), y[idx])

        h0 = vit.init_head(k_head, width, tasks_mod.MAX_CLASSES)
        h0 = {"kernel": h0["kernel"] * 0.0, "bias": h0["bias"]}
        probe, probe_losses = _fit(probe_loss, h0, optax.adam(cfg.probe_lr), jax.random.split(k_probe, cfg.probe_steps))

        def ft_loss(p, k):
            idx = jax.random.randint(k, (cfg.finetune_batch,), 0, x.shape[0])
            feats_b = vit.encode(cfg.vit, p["encoder"], x[idx])
            head = probe if cfg.freeze_head else p["head"]
            return _xent(vit.head_logits(head, feats_b, ncls), y[idx])

        sched = _schedule(cfg.finetune_lr, cfg.finetune_steps, cfg.finetune_steps // 10)
        p0 = {"encoder": encoder, "head": probe}
        p, ft_losses = _fit(ft_loss, p0, optax.adam(sched), jax.random.split(k_ft, cfg.finetune_steps))
        return p["encoder"], probe if cfg.freeze_head else p["head"], probe, probe_losses, ft_losses

    return jax.jit(train)


def _stack(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def build_seed(
    cfg: ZooConfig, seed: int, data: dict[str, tasks_mod.Split], log: Callable[[str], None] = print
) -> Zoo:
    """Pre-trains and fine-tunes the zoo of one seed (no cache)."""
    root = jax.random.key(seed)
    k_pool, k_pre, k_ft = jax.random.split(root, 3)
    timings = {}
    t0 = time.perf_counter()
    # The pool's images are drawn from data_seed (fixed); the seed only shuffles.
    px, py = tasks_mod.pretrain_data(
        jax.random.fold_in(jax.random.key(cfg.data_seed), 1_000_000), cfg.pretrain_per_task, cfg.task_list
    )
    perm = np.asarray(jax.random.permutation(k_pool, px.shape[0]))
    px, py = px[perm], py[perm]
    pre, pre_losses = pretrain(k_pre, cfg, px, py)
    jax.block_until_ready(pre)
    timings["pretrain_s"] = time.perf_counter() - t0
    log(
        f"  seed {seed}: pre-trained {cfg.pretrain_steps} steps, loss {pre_losses[:20].mean():.3f} -> "
        f"{pre_losses[-50:].mean():.3f} ({timings['pretrain_s']:.0f} s)"
    )

    t0 = time.perf_counter()
    trainer = _make_task_trainer(cfg)
    ncls = num_classes(cfg)
    fts, heads, probes, losses = [], [], [], {}
    train = data["train"]
    for t, task in enumerate(cfg.task_list):
        enc, head, probe, pl, fl = trainer(
            jax.random.fold_in(k_ft, t), pre, jnp.asarray(train.x[t]), jnp.asarray(train.y[t]), ncls[t]
        )
        jax.block_until_ready(enc)
        fts.append(enc)
        heads.append(head)
        probes.append(probe)
        losses[task.name] = {"probe_final": float(np.mean(pl[-10:])), "ft_final": float(np.mean(fl[-20:]))}
        log(
            f"  seed {seed}: {task.name:<12} probe loss {losses[task.name]['probe_final']:.3f}, "
            f"fine-tuned loss {float(fl[:10].mean()):.3f} -> {losses[task.name]['ft_final']:.3f}"
        )
    timings["finetune_s"] = time.perf_counter() - t0
    meta = {
        "seed": seed,
        "config": dataclasses.asdict(cfg),
        "tasks": [t.name for t in cfg.task_list],
        "timings": timings,
        "pretrain_loss": [float(pre_losses[:20].mean()), float(pre_losses[-50:].mean())],
        "losses": losses,
    }
    return Zoo(pre, fts, _stack(probes), _stack(heads), meta)


# --------------------------------------------------------------------------
# Cache


def seed_dir(cache: Path, cfg: ZooConfig, seed: int) -> Path:
    return Path(cache).expanduser().resolve() / f"zoo-{cfg.digest()}" / f"seed{seed}"


def save_zoo(path: Path, cfg: ZooConfig, zoo: Zoo) -> None:
    from pact_jax import io

    if path.exists():
        shutil.rmtree(path)
    (path / "finetuned").mkdir(parents=True)
    io.save(path / "pretrained", zoo.pretrained)
    for task, enc in zip(cfg.task_list, zoo.finetuned):
        io.save(path / "finetuned" / task.name, enc)
    io.save(path / "heads", {"probe": zoo.probe_heads, "finetuned": zoo.heads})
    (path / "meta.json").write_text(json.dumps(zoo.meta, indent=1))


def load_zoo(path: Path, cfg: ZooConfig) -> Zoo:
    from pact_jax import io

    meta = json.loads((path / "meta.json").read_text())
    heads = io.load(path / "heads")
    return Zoo(
        io.load(path / "pretrained"),
        [io.load(path / "finetuned" / t.name) for t in cfg.task_list],
        heads["probe"],
        heads["finetuned"],
        meta,
    )


def get_zoo(
    cfg: ZooConfig,
    seed: int,
    cache: Path | None = None,
    *,
    data: dict[str, tasks_mod.Split] | None = None,
    rebuild: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Zoo, bool]:
    """The zoo of ``seed``: from the cache if there, else built and cached. Returns ``(zoo, was_cached)``."""
    path = seed_dir(cache or default_cache_dir(), cfg, seed)
    if not rebuild and (path / "meta.json").exists():
        return load_zoo(path, cfg), True
    data = data if data is not None else make_data(cfg)
    zoo = build_seed(cfg, seed, data, log)
    save_zoo(path, cfg, zoo)
    log(f"  seed {seed}: cached in {path}")
    return zoo, False


# --------------------------------------------------------------------------
# Evaluation helpers shared with benchmarks.quality


def make_accuracy(cfg: ZooConfig):
    """``(shared, per_task)`` jitted accuracy functions returning ``(T,)`` fractions.

    ``shared(encoder, heads, x, y, ncls)``: one encoder, task ``t`` evaluated
    with head ``t`` on ``x[t]``; ``per_task(encoders, ...)``: encoder ``t``
    (stacked) for task ``t``.
    """

    def acc(enc, head, x, y, ncls):
        logits = vit.head_logits(head, vit.encode(cfg.vit, enc, x), ncls)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    shared = jax.jit(jax.vmap(acc, in_axes=(None, 0, 0, 0, 0)))
    per_task = jax.jit(jax.vmap(acc, in_axes=(0, 0, 0, 0, 0)))
    return shared, per_task


def describe(cfg: ZooConfig, zoo: Zoo) -> dict[str, Any]:
    return {
        "encoder_params": vit.param_count(zoo.pretrained),
        "head_params": [int(cfg.vit.width * t.num_classes + t.num_classes) for t in cfg.task_list],
        "vit": dataclasses.asdict(cfg.vit),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cache", type=Path, default=None, help="cache directory (default: $PACT_JAX_CACHE/zoo or ~/.cache/pact_jax/zoo)")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), as the CI test uses")
    p.add_argument("--rebuild", action="store_true", help="rebuild even when cached")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else ZooConfig()
    cache = args.cache or default_cache_dir()
    t_all = time.perf_counter()
    data = make_data(cfg)
    print(f"data: {cfg.num_tasks} tasks, train/val/test {cfg.train_size}/{cfg.val_size}/{cfg.test_size} per task "
          f"({time.perf_counter() - t_all:.0f} s)", flush=True)
    shared, per_task = make_accuracy(cfg)
    ncls = jnp.asarray(num_classes(cfg))
    test = data["test"]
    for seed in args.seeds:
        t0 = time.perf_counter()
        zoo, cached = get_zoo(cfg, seed, cache, data=data, rebuild=args.rebuild, log=lambda s: print(s, flush=True))
        pre = np.asarray(shared(zoo.pretrained, zoo.probe_heads, test.x, test.y, ncls))
        ft = np.asarray(per_task(_stack(zoo.finetuned), zoo.heads, test.x, test.y, ncls))
        what = "cached" if cached else f"built in {time.perf_counter() - t0:.0f} s"
        print(f"seed {seed} ({what}): test accuracy per task, pre-trained + probe vs fine-tuned", flush=True)
        for t, task in enumerate(cfg.task_list):
            print(f"  {task.name:<12} {100 * pre[t]:5.1f}  {100 * ft[t]:5.1f}")
        print(f"  {'mean':<12} {100 * pre.mean():5.1f}  {100 * ft.mean():5.1f}", flush=True)
    print(f"total {time.perf_counter() - t_all:.0f} s; zoo in {seed_dir(cache, cfg, 0).parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
