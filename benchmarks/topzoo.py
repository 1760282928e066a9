"""Zoos that fine-tune only the top of a frozen pre-trained encoder: the model-agnostic pieces.

A suite supplies ``feature_fn(layers, x) -> (B, hidden)``: the trained
subtree ``layers`` applied to inputs ``x`` (a pytree with a leading example
axis: e.g. the frozen bottom's cached tokens). This module gives it

* :func:`make_trainer`: per task, a linear probe on the frozen pre-trained
  features, then fine-tuning of ``layers`` from there with that head fixed
  (or trained too: LP-FT), Adam with warm-up and cosine decay, all in one
  jitted call; tasks may have fewer valid examples than the padded arrays;
* :func:`build_seed`: every task of one seed, with losses and timings;
* :func:`cached_seed`: a seed's trained subtrees and heads as orbax
  checkpoints (:mod:`pact_jax.io`) under a directory, built when missing;
* :func:`make_accuracy`: the ``(shared, per_task)`` accuracy functions of
  :class:`benchmarks.quality.TaskEvaluator`;
* :func:`run_seeds`: a suite's driver loop, each seed's zoo built or loaded,
  then every method evaluated per task count and seed;
* :func:`suite_main`: the end of a suite's ``main`` (task counts checked, a
  missing model or dataset in one sentence, the report published).

The training config is duck-typed: any object with ``probe_steps``,
``probe_batch``, ``probe_lr``, ``finetune_steps``, ``finetune_batch``,
``finetune_lr`` and ``freeze_head``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import report, sources, vit
from benchmarks import zoo as zoo_mod

PyTree = Any
FeatureFn = Callable[[PyTree, PyTree], jax.Array]


def cache_root(kind: str) -> Path:
    """``$PACT_JAX_CACHE/<kind>``, else ``~/.cache/pact_jax/<kind>``."""
    env = os.environ.get("PACT_JAX_CACHE")
    return Path(env) / kind if env else Path.home() / ".cache" / "pact_jax" / kind


def _rows(tree: PyTree, idx: jax.Array) -> PyTree:
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


def make_trainer(cfg: Any, feature_fn: FeatureFn, hidden: int, max_classes: int):
    """Jitted ``(key, layers, feats, x, y, n, ncls) -> (ft_layers, ft_head, probe, probe_losses, ft_losses)``.

    ``feats`` are the pre-trained features of ``x`` (the probe's inputs); batches are drawn from the
    first ``n`` rows of ``x`` / ``y`` / ``feats`` (the rest is padding).
    """

    def train(key, layers, feats, x, y, n, ncls):
        k_head, k_probe, k_ft = jax.random.split(key, 3)

        def probe_loss(h, k):
            idx = jax.random.randint(k, (cfg.probe_batch,), 0, n)
            return zoo_mod._xent(vit.head_logits(h, feats[idx], ncls), y[idx])

        h0 = vit.init_head(k_head, hidden, max_classes)
        h0 = {"kernel": jnp.zeros_like(h0["kernel"]), "bias": h0["bias"]}
        probe, probe_losses = zoo_mod._fit(probe_loss, h0, optax.adam(cfg.probe_lr),
                                           jax.random.split(k_probe, cfg.probe_steps))

        def ft_loss(p, k):
            idx = jax.random.randint(k, (cfg.finetune_batch,), 0, n)
            head = probe if cfg.freeze_head else p["head"]
            return zoo_mod._xent(vit.head_logits(head, feature_fn(p["layers"], _rows(x, idx)), ncls), y[idx])

        sched = zoo_mod._schedule(cfg.finetune_lr, cfg.finetune_steps, cfg.finetune_steps // 10)
        start = {"layers": layers} if cfg.freeze_head else {"layers": layers, "head": probe}
        p, ft_losses = zoo_mod._fit(ft_loss, start, optax.adam(sched), jax.random.split(k_ft, cfg.finetune_steps))
        return p["layers"], probe if cfg.freeze_head else p["head"], probe, probe_losses, ft_losses

    return jax.jit(train)


def batched(fn: Callable[..., jax.Array], params: PyTree, x: PyTree, batch: int = 256) -> np.ndarray:
    """``fn(params, x)`` over ``x``'s leading axis in chunks of ``batch``, concatenated on the host."""
    n = len(jax.tree_util.tree_leaves(x)[0])
    return np.concatenate([np.asarray(fn(params, _rows(x, slice(i, i + batch)))) for i in range(0, n, batch)])


def build_seed(trainer: Callable, layers0: PyTree, task_names: Sequence[str], seed: int,
               train: Sequence[tuple[PyTree, np.ndarray, int]], feats: Sequence[np.ndarray], ncls: Sequence[int],
               log: Callable[[str], None] = print) -> tuple[list[PyTree], PyTree, PyTree, dict[str, Any]]:
    """Runs ``trainer`` on every task (``train[t] = (x, y, n)``): ``(trained subtrees, heads, probes, meta)``."""
    key = jax.random.fold_in(jax.random.key(seed), 7)
    outs, heads, probes, losses = [], [], [], {}
    t0 = time.perf_counter()
    for t, name in enumerate(task_names):
        t1 = time.perf_counter()
        x, y, n = train[t]
        lay, head, probe, pl, fl = trainer(jax.random.fold_in(key, t), layers0, jnp.asarray(feats[t]),
                                           jax.tree_util.tree_map(jnp.asarray, x), jnp.asarray(y), n, ncls[t])
        pl, fl = np.asarray(pl), np.asarray(fl)
        outs.append(jax.tree_util.tree_map(np.asarray, lay))
        heads.append(head)
        probes.append(probe)
        losses[name] = {"probe_final": float(pl[-10:].mean()), "ft_first": float(fl[:10].mean()),
                        "ft_final": float(fl[-20:].mean())}
        r = losses[name]
        log(f"  seed {seed}: {name:<14} probe loss {r['probe_final']:.3f}, fine-tuned loss {r['ft_first']:.3f} -> "
            f"{r['ft_final']:.3f} ({time.perf_counter() - t1:.0f} s)")
    meta = {"seed": seed, "tasks": list(task_names), "losses": losses,
            "timings": {"finetune_s": time.perf_counter() - t0}}
    return outs, zoo_mod._stack(heads), zoo_mod._stack(probes), meta


def cached_seed(path: Path, task_names: Sequence[str], build: Callable[[], tuple[list, PyTree, PyTree, dict]],
                log: Callable[[str], None] = print) -> tuple[list[PyTree], PyTree, PyTree, dict[str, Any], bool]:
    """``(trained subtrees, heads, probes, meta, was_cached)`` from ``path`` (orbax), else ``build()`` saved there.

    Layout: ``finetuned/<task>/``, ``heads/`` (``{'probe', 'finetuned'}``), ``meta.json`` written last.
    """
    from pact_jax import io

    path = Path(path)
    if (path / "meta.json").exists():
        meta = json.loads((path / "meta.json").read_text())
        layers = [io.load(path / "finetuned" / name) for name in task_names]
        hd = io.load(path / "heads")
        return layers, hd["finetuned"], hd["probe"], meta, True
    layers, heads, probes, meta = build()
    if path.exists():
        shutil.rmtree(path)
    (path / "finetuned").mkdir(parents=True)
    for name, lay in zip(task_names, layers):
        io.save(path / "finetuned" / name, lay)
    io.save(path / "heads", {"probe": probes, "finetuned": heads})
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"  cached in {path}")
    return layers, heads, probes, meta, False


def run_seeds(seeds: Sequence[int], task_counts: Sequence[int], get_zoo: Callable[[int], tuple[Any, bool]],
              make_evaluator: Callable[[Any, int, int], Any], evaluate: Callable[[Any], dict[str, Any]],
              log: Callable[[str], None] = print
              ) -> tuple[dict[int, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]], float]:
    """Each seed's zoo (``get_zoo(seed) -> (zoo, was_cached)``), then ``evaluate(make_evaluator(zoo, t, seed))``
    for every task count ``t`` and seed: ``(zoos, build, per_T, eval_seconds)``.

    ``build[str(seed)]`` holds ``cached``, ``seconds`` and the zoo's ``meta["timings"]``;
    ``per_T[str(t)][str(seed)]`` is ``evaluate``'s result; ``eval_seconds`` times the evaluation loop.
    """
    zoos, build = {}, {}
    for seed in seeds:
        t0 = time.perf_counter()
        zoos[seed], cached = get_zoo(seed)
        build[str(seed)] = {"cached": cached, "seconds": time.perf_counter() - t0, **zoos[seed].meta["timings"]}
        log(f"zoo seed {seed}: {'cached' if cached else 'built'} ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    per_t: dict[str, dict[str, Any]] = {}
    for t in task_counts:
        per_t[str(t)] = {}
        for seed in seeds:
            ev = make_evaluator(zoos[seed], t, seed)
            t1 = time.perf_counter()
            per_t[str(t)][str(seed)] = evaluate(ev)
            log(f"  T={t} seed {seed}: {time.perf_counter() - t1:.0f} s")
    return zoos, build, per_t, time.perf_counter() - t0


def make_accuracy(feature_fn: FeatureFn):
    """``(shared, per_task)`` for :class:`benchmarks.quality.TaskEvaluator`; ``feature_fn(encoder, x)``."""

    def acc(enc, head, x, y, ncls):
        return jnp.mean(jnp.argmax(vit.head_logits(head, feature_fn(enc, x), ncls), -1) == y)

    return jax.jit(jax.vmap(acc, in_axes=(None, 0, 0, 0, 0))), jax.jit(jax.vmap(acc, in_axes=(0, 0, 0, 0, 0)))


def suite_main(prog: str, parser: Any, argv: Sequence[str] | None, cfg: Any, out: Path,
               run: Callable[[], dict[str, Any]], header: Callable[[Mapping[str, Any]], list[str]]) -> int:
    """The end of a suite's ``main``: refuses task counts above the suite's (``parser.error``), runs
    (a missing model or dataset ends in one sentence: :func:`benchmarks.sources.or_exit`) and
    publishes the report with the command line that produced it."""
    bad = [t for t in cfg.task_counts if not 1 <= t <= cfg.zoo.num_tasks]
    if bad:
        parser.error(f"--task-counts {bad}: the suite has {cfg.zoo.num_tasks} tasks")
    command = f"python -m {prog}" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    report.publish(sources.or_exit(f"python -m {prog}", run), out, command, header=header)
    return 0
