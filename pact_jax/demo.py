"""Built-in end-to-end example: pre-train, fine-tune, merge with and without PACT.

Run ``python -m pact_jax.demo``. Everything is built in-process from explicit
``jax.random`` keys; nothing is downloaded:

1. A synthetic *world*: inputs ``x = z A + noise`` in ``R^32`` from a
   16-dimensional Gaussian latent ``z``.
2. A broad *pre-training* task (10-way ``argmax`` of linear functions of
   ``z``) teaches a small MLP encoder the latent structure.
3. ``T`` downstream 4-way tasks. Task ``t``'s label is two bits:
   ``sign(z . p_t)``, a direction the pre-training task already taught
   (knowledge anchored in the pre-trained weights), and the XOR
   ``sign((z . u_t)(z . v_t))`` of two new directions, which the pre-trained
   features do not represent and fine-tuning must learn.
4. Per task: a linear probe (head only, encoder frozen), then fine-tuning of
   encoder and head together (LP-FT). Heads are never merged: as in the usual
   task-vector protocol, every model evaluated on task ``t``, the merged ones
   included, uses task ``t``'s fine-tuned head.
5. The ``T`` fine-tuned encoders are merged by each method with and without
   PACT; ``alpha`` is picked on a validation split by mean accuracy and the
   test split is reported.

PACT runs with the library's default hyperparameters (the subspace
perspective before Task Arithmetic and the SVD-based mergers, the scalar
perspective before TIES); nothing here is tuned in its favour.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pact_jax
from pact_jax import recipes
from pact_jax.tree import PyTree

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_METHODS",
    "METHODS",
    "TABLE_HEADER",
    "DemoConfig",
    "Encoder",
    "Head",
    "build_parser",
    "config_from_args",
    "finetune",
    "format_report",
    "format_table",
    "main",
    "make_merge",
    "make_world_and_data",
    "pretrain",
    "run_demo",
]

# Mergers the demo can run (recipes of pact_jax.recipes); dare_ties needs a key per alpha sweep.
METHODS: tuple[str, ...] = tuple(m for m in recipes.METHODS if m not in ("average", "dare_ties"))
DEFAULT_METHODS: tuple[str, ...] = METHODS
# Wide enough for every method: Task Arithmetic peaks near 1/T, the
# normalised mergers (TIES, TSV, Iso) near 1 or above.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 21))


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything the demo builds; the defaults are the README's example.

    Attributes:
      num_tasks: number of downstream tasks ``T`` (fine-tuned models merged).
      seed: seed of the one root ``jax.random.key``.
      finetune_steps: optimiser steps of fine-tuning per task.
      pretrain_steps: optimiser steps of pre-training.
      probe_steps: optimiser steps of the linear probe before fine-tuning.
      input_dim, latent_dim: sizes of ``x`` and of the latent ``z``.
      width, depth: the encoder is ``depth`` Dense+ReLU layers of ``width``.
      pretrain_classes, task_classes: classes of the pre-training and
        downstream tasks (the label construction needs ``task_classes == 4``).
      noise: standard deviation of the input noise.
      train_size, val_size, test_size: examples per downstream task and split.
      batch_size: mini-batch size of every training stage.
      pretrain_lr, probe_lr, finetune_lr: Adam learning rates.
      methods: mergers to run (keys of :data:`METHODS`).
      alphas: the grid ``alpha`` is chosen from on the validation split.
      save_dir: if set, the pre-trained and fine-tuned encoders are written
        there as orbax checkpoints (``pretrained/``, ``task0/`` ...), ready
        for ``pact-jax merge``.
    """

    num_tasks: int = 4
    seed: int = 0
    finetune_steps: int = 1000
    pretrain_steps: int = 1500
    probe_steps: int = 200
    input_dim: int = 32
    latent_dim: int = 16
    width: int = 128
    depth: int = 2
    pretrain_classes: int = 10
    task_classes: int = 4
    noise: float = 0.1
    train_size: int = 4096
    val_size: int = 1024
    test_size: int = 4096
    batch_size: int = 128
    pretrain_lr: float = 3e-3
    probe_lr: float = 1e-2
    finetune_lr: float = 1e-3
    methods: tuple[str, ...] = DEFAULT_METHODS
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    save_dir: str | None = None

    def __post_init__(self) -> None:
        if self.num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {self.num_tasks}.")
        for name in ("finetune_steps", "pretrain_steps", "probe_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.task_classes != 4:
            raise ValueError("task_classes must be 4: a task's label is two binary features.")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown or no methods {unknown}; choose from {list(METHODS)}.")
        if not self.alphas:
            raise ValueError("alphas must not be empty.")


# --------------------------------------------------------------------------
# Synthetic world and tasks


class World(NamedTuple):
    """The generative structure shared by pre-training and all downstream tasks."""

    mixing: jax.Array  # (latent_dim, input_dim): x = z @ mixing + noise
    pretrain_dirs: jax.Array  # (latent_dim, pretrain_classes)
    anchor_dirs: jax.Array  # (T, latent_dim): p_t, inside the pre-training span
    xor_dirs: jax.Array  # (T, 2, latent_dim): u_t, v_t, new to every task


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def make_world(key: jax.Array, cfg: DemoConfig) -> World:
    """Random mixing, pre-training and task directions, all from ``key``."""
    shapes = {
        "mixing": (cfg.latent_dim, cfg.input_dim),
        "pretrain": (cfg.latent_dim, cfg.pretrain_classes),
        "coeffs": (cfg.num_tasks, cfg.pretrain_classes),
        "xor": (cfg.num_tasks, 2, cfg.latent_dim),
    }
    # One draw sliced into parts: on CPU every separate random call adds
    # about a second of XLA compilation, far more than the demo's arithmetic.
    flat = jax.random.normal(key, (sum(math.prod(s) for s in shapes.values()),))
    parts, start = {}, 0
    for name, shape in shapes.items():
        parts[name] = flat[start : start + math.prod(shape)].reshape(shape)
        start += math.prod(shape)
    mixing = parts["mixing"] / np.sqrt(cfg.latent_dim)
    # p_t is a mix of the pre-training directions, so the pre-trained encoder
    # already holds the feature that one bit of task t needs.
    anchor_dirs = _unit(parts["coeffs"] @ parts["pretrain"].T)
    return World(mixing, parts["pretrain"], anchor_dirs, _unit(parts["xor"]))


def sample_inputs(key: jax.Array, world: World, n: int, noise: float) -> tuple[jax.Array, jax.Array]:
    """``n`` latents ``z`` and their inputs ``x``: ``((n, latent_dim), (n, input_dim))``."""
    latent_dim, input_dim = world.mixing.shape
    draw = jax.random.normal(key, (n, latent_dim + input_dim))  # one random call: see make_world
    z, eps = draw[:, :latent_dim], draw[:, latent_dim:]
    return z, z @ world.mixing + noise * eps


def pretrain_labels(world: World, z: jax.Array) -> jax.Array:
    """The broad pre-training task: ``argmax`` of linear functions of ``z``."""
    return jnp.argmax(z @ world.pretrain_dirs, axis=-1)


def task_labels(world: World, task: int | jax.Array, z: jax.Array) -> jax.Array:
    """Downstream task ``task``: ``2 [z.p_t > 0] + [(z.u_t)(z.v_t) > 0]``, in ``{0..3}``."""
    anchored = (z @ world.anchor_dirs[task]) > 0
    u, v = world.xor_dirs[task]
    xor = (z @ u) * (z @ v) > 0
    return 2 * anchored.astype(jnp.int32) + xor.astype(jnp.int32)


class Split(NamedTuple):
    """One split of every downstream task: ``x (T, n, input_dim)``, ``y (T, n)``."""

    x: jax.Array
    y: jax.Array


def make_task_data(key: jax.Array, world: World, cfg: DemoConfig) -> dict[str, Split]:
    """Train / val / test splits of every downstream task, from ``key``."""
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    total = sum(sizes.values())

    def one_task(k: jax.Array, task: jax.Array) -> tuple[jax.Array, jax.Array]:
        z, x = sample_inputs(k, world, total, cfg.noise)
        return x, task_labels(world, task, z)

    x, y = jax.vmap(one_task)(jax.random.split(key, cfg.num_tasks), jnp.arange(cfg.num_tasks))
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = Split(x[:, start : start + n], y[:, start : start + n])
        start += n
    return out


@functools.partial(jax.jit, static_argnames="cfg")
def make_world_and_data(key: jax.Array, cfg: DemoConfig) -> tuple[World, dict[str, Split]]:
    """:func:`make_world` and :func:`make_task_data` from one key, in one compiled call."""
    k_world, k_data = jax.random.split(key)
    world = make_world(k_world, cfg)
    return world, make_task_data(k_data, world, cfg)


# --------------------------------------------------------------------------
# Model


class Encoder(nn.Module):
    """The shared part that gets merged: ``depth`` Dense+ReLU layers."""

    width: int
    depth: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return x


class Head(nn.Module):
    """A task's linear classifier on the encoder's features; never merged."""

    num_classes: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(h)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _fit(
    loss: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    tx: optax.GradientTransformation,
    keys: jax.Array,
) -> tuple[PyTree, jax.Array]:
    """One optimiser step per key (``loss(params, key)`` draws its own batch); returns params, losses."""

    def step(carry: tuple[PyTree, Any], key: jax.Array) -> tuple[tuple[PyTree, Any], jax.Array]:
        params, opt_state = carry
        value, grads = jax.value_and_grad(loss)(params, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    # A scan compiles the whole loop once instead of dispatching every step.
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), keys)
    return params, losses


@functools.partial(jax.jit, static_argnames="cfg")
def pretrain(key: jax.Array, world: World, cfg: DemoConfig) -> tuple[PyTree, jax.Array]:
    """Pre-trains encoder + a pre-training head on fresh batches; returns the encoder params and losses."""
    encoder, head = Encoder(cfg.width, cfg.depth), Head(cfg.pretrain_classes)
    k_enc, k_head, k_steps = jax.random.split(key, 3)
    params = {
        "encoder": encoder.init(k_enc, jnp.zeros((1, cfg.input_dim))),
        "head": head.init(k_head, jnp.zeros((1, cfg.width))),
    }

    def loss(p: PyTree, k: jax.Array) -> jax.Array:
        z, x = sample_inputs(k, world, cfg.batch_size * 2, cfg.noise)
        logits = head.apply(p["head"], encoder.apply(p["encoder"], x))
        return _cross_entropy(logits, pretrain_labels(world, z))

    params, losses = _fit(loss, params, optax.adam(cfg.pretrain_lr), jax.random.split(k_steps, cfg.pretrain_steps))
    return params["encoder"], losses


@functools.partial(jax.jit, static_argnames="cfg")
def finetune(
    key: jax.Array, encoder_params: PyTree, train: Split, cfg: DemoConfig
) -> tuple[PyTree, PyTree]:
    """Linear probe, then full fine-tuning, for every task at once (vmapped).

    Returns ``(encoders, heads)``, each a pytree whose leaves carry a leading
    task axis ``T``.
    """
    encoder, head = Encoder(cfg.width, cfg.depth), Head(cfg.task_classes)
    n = train.x.shape[1]

    def batch(k: jax.Array, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        idx = jax.random.randint(k, (cfg.batch_size,), 0, n)
        return x[idx], y[idx]

    def one_task(k: jax.Array, x: jax.Array, y: jax.Array) -> tuple[PyTree, PyTree]:
        k_head, k_probe, k_ft = jax.random.split(k, 3)
        # Probing first starts fine-tuning from a sensible head, so the
        # encoder's update (the task vector) is spent on the task, not on
        # undoing a random head.
        feats = encoder.apply(encoder_params, x)

        def probe_loss(h: PyTree, kb: jax.Array) -> jax.Array:
            fb, yb = batch(kb, feats, y)
            return _cross_entropy(head.apply(h, fb), yb)

        h0 = head.init(k_head, jnp.zeros((1, cfg.width)))
        h, _ = _fit(probe_loss, h0, optax.adam(cfg.probe_lr), jax.random.split(k_probe, cfg.probe_steps))

        def ft_loss(p: PyTree, kb: jax.Array) -> jax.Array:
            xb, yb = batch(kb, x, y)
            return _cross_entropy(head.apply(p["head"], encoder.apply(p["encoder"], xb)), yb)

        p0 = {"encoder": encoder_params, "head": h}
        p, _ = _fit(ft_loss, p0, optax.adam(cfg.finetune_lr), jax.random.split(k_ft, cfg.finetune_steps))
        return p["encoder"], p["head"]

    keys = jax.random.split(key, cfg.num_tasks)
    return jax.vmap(one_task)(keys, train.x, train.y)


# --------------------------------------------------------------------------
# Evaluation and merging


def save_checkpoints(directory: str, pretrained: PyTree, finetuned: Sequence[PyTree]) -> list:
    """Writes ``directory/pretrained`` and ``directory/task{t}`` (orbax); returns their paths."""
    from pathlib import Path

    from pact_jax import io

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = [io.save(root / "pretrained", pretrained)]
    paths += [io.save(root / f"task{t}", ft) for t, ft in enumerate(finetuned)]
    return paths


def _make_accuracy(cfg: DemoConfig) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
    """Jitted per-task accuracy ``(T,)`` for one shared encoder, and for one encoder per task."""
    encoder, head = Encoder(cfg.width, cfg.depth), Head(cfg.task_classes)

    def acc(enc: PyTree, h: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = head.apply(h, encoder.apply(enc, x))
        return jnp.mean(jnp.argmax(logits, -1) == y)

    shared = jax.jit(jax.vmap(acc, in_axes=(None, 0, 0, 0)))
    per_task = jax.jit(jax.vmap(acc, in_axes=(0, 0, 0, 0)))
    return shared, per_task


def _summary(per_task: np.ndarray, finetuned: np.ndarray) -> dict[str, Any]:
    return {
        "per_task": [float(a) for a in per_task],
        "mean": float(np.mean(per_task)),
        "normalized": float(np.mean(per_task / finetuned)),
    }


def make_merge(method: str, with_pact: bool) -> Callable[..., PyTree]:
    """The library's recipe for ``method``: PACT (in the perspective that fits it) then the merger."""
    return recipes.make_merge(method, use_pact=with_pact, alpha=1.0)


def _evaluate_merge(
    method: str,
    with_pact: bool,
    pre_enc: PyTree,
    ft_encs: Sequence[PyTree],
    heads: PyTree,
    data: dict[str, Split],
    finetuned: np.ndarray,
    accuracy: Callable[..., jax.Array],
    alphas: Sequence[float],
) -> dict[str, Any]:
    """Merges once, sweeps ``alpha`` on validation, reports test at the chosen one."""
    merge = make_merge(method, with_pact)
    t0 = time.perf_counter()
    delta = jax.block_until_ready(merge.delta(pre_enc, ft_encs))
    merge_s = time.perf_counter() - t0
    val = data["val"]
    val_means = [
        float(jnp.mean(accuracy(pact_jax.apply_delta(pre_enc, delta, a), heads, val.x, val.y))) for a in alphas
    ]
    # First maximum: on ties the smaller alpha, i.e. the smaller edit.
    best = int(np.argmax(val_means))
    test = data["test"]
    merged = pact_jax.apply_delta(pre_enc, delta, alphas[best])
    test_acc = np.asarray(accuracy(merged, heads, test.x, test.y))
    return {
        **_summary(test_acc, finetuned),
        "alpha": float(alphas[best]),
        "val_mean": val_means[best],
        "val_curve": dict(zip((float(a) for a in alphas), val_means)),
        "merge_seconds": merge_s,
    }


def _task_norms(stacked: PyTree) -> np.ndarray:
    """Frobenius norm of each task's vector over all leaves, ``(T,)``."""
    sq = sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree_util.tree_leaves(stacked))
    return np.sqrt(np.asarray(sq))


def _param_count(tree: PyTree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def run_demo(cfg: DemoConfig = DemoConfig(), log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Builds the world, pre-trains, fine-tunes, merges; returns every number as a dict.

    Args:
      cfg: what to build (see :class:`DemoConfig`).
      log: called with one line per stage (progress and timings); ``None``
        stays silent.

    Returns:
      ``{"config", "built", "tasks", "pretrained", "finetuned", "methods",
      "timings"}``. ``pretrained`` and ``finetuned`` hold test accuracies
      ``{"per_task", "mean", "normalized"}``; ``methods[name]["plain" |
      "pact"]`` adds ``"alpha"`` (chosen on validation), ``"val_mean"``,
      ``"val_curve"`` and ``"merge_seconds"``. Accuracies are fractions in
      ``[0, 1]``; normalised accuracy is ``mean_t(merged_t / finetuned_t)``.
    """
    say = log or (lambda _line: None)
    timings: dict[str, float] = {}
    root = jax.random.key(cfg.seed)
    k_data, k_pre, k_ft = jax.random.split(root, 3)

    t0 = time.perf_counter()
    world, data = jax.block_until_ready(make_world_and_data(k_data, cfg))
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pre_enc, pre_losses = jax.block_until_ready(pretrain(k_pre, world, cfg))
    timings["pretrain"] = time.perf_counter() - t0
    say(
        f"pre-trained the encoder: {cfg.pretrain_steps} steps, loss {float(pre_losses[:50].mean()):.3f} -> "
        f"{float(pre_losses[-50:].mean()):.3f} ({timings['pretrain']:.1f} s)"
    )

    t0 = time.perf_counter()
    ft_stacked, heads = jax.block_until_ready(finetune(k_ft, pre_enc, data["train"], cfg))
    timings["finetune"] = time.perf_counter() - t0
    say(
        f"fine-tuned {cfg.num_tasks} tasks: {cfg.probe_steps} probe + {cfg.finetune_steps} full steps each "
        f"({timings['finetune']:.1f} s)"
    )
    ft_encs = [jax.tree_util.tree_map(lambda x, t=t: x[t], ft_stacked) for t in range(cfg.num_tasks)]
    if cfg.save_dir:
        saved = save_checkpoints(cfg.save_dir, pre_enc, ft_encs)
        say(f"wrote {len(saved)} orbax checkpoints to {cfg.save_dir}: {', '.join(p.name for p in saved)}")

    shared_acc, per_task_acc = _make_accuracy(cfg)
    test = data["test"]
    ft_acc = np.asarray(per_task_acc(ft_stacked, heads, test.x, test.y))
    pre_acc = np.asarray(shared_acc(pre_enc, heads, test.x, test.y))

    t0 = time.perf_counter()
    methods: dict[str, dict[str, Any]] = {}
    for method in cfg.methods:
        methods[method] = {}
        for variant, with_pact in (("plain", False), ("pact", True)):
            methods[method][variant] = _evaluate_merge(
                method, with_pact, pre_enc, ft_encs, heads, data, ft_acc, shared_acc, cfg.alphas
            )
        say(
            f"merged with {method}: {methods[method]['plain']['mean']:.3f} plain, "
            f"{methods[method]['pact']['mean']:.3f} with PACT"
        )
    timings["merge_and_eval"] = time.perf_counter() - t0
    timings["total"] = sum(timings.values())

    stacked = pact_jax.task_vectors(pre_enc, ft_encs)
    tv_norms = _task_norms(stacked)
    w0_norm = float(np.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree_util.tree_leaves(pre_enc))))
    # How much PACT takes out of the task vectors, so its effect on accuracy can be read against it:
    # ||tau - PACT(tau)||^2 / ||tau||^2 per task, as `inspect` and lbw_statistics report it (not
    # 1 - ||PACT(tau)||^2 / ||tau||^2: PACT is not an orthogonal projection of the whole vector).
    pact_removed = {}
    for perspective in sorted({recipes.default_perspective(m) for m in cfg.methods}):
        filtered = pact_jax.pact(pre_enc, stacked, perspective=perspective)
        gone = _task_norms(jax.tree_util.tree_map(lambda a, b: a - b, stacked, filtered))
        pact_removed[perspective] = [float((g / n) ** 2) for g, n in zip(gone, tv_norms)]
    built = {
        "input_dim": cfg.input_dim,
        "latent_dim": cfg.latent_dim,
        "encoder_layers": [cfg.width] * cfg.depth,
        "encoder_params": _param_count(pre_enc),
        "head_params": _param_count(jax.tree_util.tree_map(lambda x: x[0], heads)),
        "pretrain_classes": cfg.pretrain_classes,
        "task_classes": cfg.task_classes,
        "split_sizes": {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size},
        "task_vector_rel_norms": [float(n / w0_norm) for n in tv_norms],
        "pact_energy_removed": pact_removed,
    }
    tasks = [f"task{t}: 2*[z.p{t} > 0] + xor(z.u{t}, z.v{t})" for t in range(cfg.num_tasks)]
    return {
        "config": dataclasses.asdict(cfg),
        "built": built,
        "tasks": tasks,
        "pretrained": _summary(pre_acc, ft_acc),
        "finetuned": _summary(ft_acc, ft_acc),
        "methods": methods,
        "timings": timings,
    }


# --------------------------------------------------------------------------
# Report and CLI

TABLE_HEADER = (
    f"{'method':<28} {'acc':>6} {'norm':>6} {'alpha':>5}   {'acc+PACT':>8} {'norm+PACT':>9} {'alpha':>5}"
)


def format_table(results: dict[str, Any]) -> str:
    """The results table: mean test accuracy, normalised accuracy and alpha, without / with PACT."""
    rule = "-" * len(TABLE_HEADER)
    lines = [TABLE_HEADER, rule]
    for label, key in (("pre-trained (+ task heads)", "pretrained"), ("individual fine-tuned", "finetuned")):
        r = results[key]
        lines.append(f"{label:<28} {100 * r['mean']:6.1f} {100 * r['normalized']:6.1f} {'':>5}")
    lines.append(rule)
    for name, r in results["methods"].items():
        a, b = r["plain"], r["pact"]
        lines.append(
            f"{name:<28} {100 * a['mean']:6.1f} {100 * a['normalized']:6.1f} {a['alpha']:5.1f}   "
            f"{100 * b['mean']:8.1f} {100 * b['normalized']:9.1f} {b['alpha']:5.1f}"
        )
    return "\n".join(lines)


def format_report(results: dict[str, Any]) -> str:
    """What was built, per-task accuracies, the table and timings, as printable text."""
    b, cfg, tm = results["built"], results["config"], results["timings"]
    layers = " -> ".join(str(w) for w in [b["input_dim"], *b["encoder_layers"]])
    rel = ", ".join(f"{r:.2f}" for r in b["task_vector_rel_norms"])
    lines = [
        "Built (in-process, seed {}):".format(cfg["seed"]),
        f"  inputs x in R^{b['input_dim']} from a {b['latent_dim']}-d Gaussian latent z",
        f"  encoder MLP {layers} (ReLU), {b['encoder_params']} params, merged;"
        f" one {b['task_classes']}-way head per task ({b['head_params']} params), not merged",
        f"  pre-training: {b['pretrain_classes']}-way argmax of linear functions of z, {cfg['pretrain_steps']} steps",
        f"  downstream splits per task: train {b['split_sizes']['train']}, val {b['split_sizes']['val']},"
        f" test {b['split_sizes']['test']}",
        f"  ||task vector|| / ||W0||: {rel}",
        *(
            f"  PACT ({p}, {'the paper' if p == 'subspace' else 'library'} defaults) removes "
            f"{', '.join(f'{100 * e:.0f}%' for e in es)}"
            " of each task vector's energy"
            for p, es in b["pact_energy_removed"].items()
        ),
        "  tasks:",
        *(f"    {t}" for t in results["tasks"]),
        "",
        "Test accuracy per task (%):",
        "  pre-trained  " + " ".join(f"{100 * a:5.1f}" for a in results["pretrained"]["per_task"]),
        "  fine-tuned   " + " ".join(f"{100 * a:5.1f}" for a in results["finetuned"]["per_task"]),
        "",
        "Merged encoders (mean test accuracy over tasks, %; alpha chosen on validation):",
        format_table(results),
        "",
        "Timings (s, including JAX compilation): "
        + ", ".join(f"{k} {v:.1f}" for k, v in tm.items()),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The demo's command-line options."""
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="python -m pact_jax.demo",
        description="Pre-train a tiny Flax model on synthetic data, fine-tune it on several tasks, "
        "and merge the fine-tuned encoders with and without PACT. No downloads.",
    )
    p.add_argument("--tasks", type=int, default=d.num_tasks, help="number of downstream tasks (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="root PRNG seed (default %(default)s)")
    p.add_argument(
        "--steps", type=int, default=d.finetune_steps,
        help="fine-tuning steps per task (default %(default)s); fewer for a quick run",
    )
    p.add_argument(
        "--pretrain-steps", type=int, default=None,
        help=f"pre-training steps (default: {d.pretrain_steps}, or 3x --steps when --steps is smaller than "
        f"its default)",
    )
    p.add_argument(
        "--save-checkpoints", metavar="DIR", default=None,
        help="also write the pre-trained and fine-tuned encoders as orbax checkpoints under DIR",
    )
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help="comma-separated mergers from: " + ", ".join(METHODS) + " (default: all)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """A :class:`DemoConfig` from parsed command-line options."""
    d = DemoConfig()
    pretrain_steps = args.pretrain_steps
    if pretrain_steps is None:
        # A quick run shortens pre-training in proportion, so --steps alone makes it fast.
        pretrain_steps = d.pretrain_steps if args.steps >= d.finetune_steps else min(d.pretrain_steps, 3 * args.steps)
    probe_steps = min(d.probe_steps, max(1, args.steps))
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return DemoConfig(
        num_tasks=args.tasks,
        seed=args.seed,
        finetune_steps=args.steps,
        pretrain_steps=pretrain_steps,
        probe_steps=probe_steps,
        methods=methods,
        save_dir=args.save_checkpoints,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo and prints its report; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if cfg.save_dir is not None:  # fail before training, not after
        from pathlib import Path

        taken = [p for p in ["pretrained", *(f"task{t}" for t in range(cfg.num_tasks))] if (Path(cfg.save_dir) / p).exists()]
        if taken:
            parser.error(f"--save-checkpoints {cfg.save_dir}: {', '.join(taken)} already exist there; "
                         "checkpoints are never overwritten: remove them or choose another directory.")
    print(f"pact_jax {pact_jax.__version__} demo on {jax.devices()[0].platform}: "
          f"{cfg.num_tasks} tasks, seed {cfg.seed}", flush=True)
    results = run_demo(cfg, log=lambda line: print(line, flush=True))
    print()
    print(format_report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
