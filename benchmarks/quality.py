"""Quality benchmark: what PACT adds to each merging method, in the paper's table form.

    python -m benchmarks.quality                 # 3 seeds, T = 4 and 8, all methods (+ zoo build if not cached)
    python -m benchmarks.quality --ablation      # ... plus PACT's hyperparameter ablation (validation split)
    python -m benchmarks.quality --quick         # tiny settings, seconds (the CI test)

For each seed's zoo (:mod:`benchmarks.zoo`) and each task count ``T`` (the
first ``T`` tasks), every method of :data:`pact_jax.recipes.METHODS` merges
the ``T`` fine-tuned encoders without and with PACT, through
:func:`pact_jax.recipes.make_merge` (PACT with the library defaults, in the
perspective :func:`pact_jax.recipes.default_perspective` picks: subspace
before average, task arithmetic and the SVD mergers, scalar before TIES and
DARE-TIES). The merged delta is computed once; ``alpha`` is swept with
:func:`pact_jax.apply_delta` and chosen by mean accuracy on the validation
split; the test split is reported at that ``alpha``. Task ``t`` is always
evaluated with its own fine-tuned head (heads are not merged).

Baselines: each fine-tuned model on its own task, and the pre-trained encoder
with each task's linear-probe head (trained on the frozen pre-trained
encoder before fine-tuning; the "zero-shot" row). Weight averaging uses
``alpha = 1`` (the plain mean of the models), the others the swept ``alpha``.

Normalised accuracy of task ``t`` = merged accuracy / fine-tuned accuracy on
``t``; tables give mean +- sample std over seeds.

Writes ``benchmarks/results_quality.md`` (``--out``), the same numbers as
JSON next to it, and a PNG of normalised accuracy per method with and without
PACT.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import inspect
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import pact_jax
from pact_jax import recipes
from pact_jax.pact import DEFAULT_STRENGTH
from benchmarks import report, vit
from benchmarks import zoo as zoo_mod

PyTree = Any

METHODS: tuple[str, ...] = recipes.METHODS
# The mergers' own hyperparameters (library defaults, stated here so the table says what ran).
METHOD_KWARGS: Mapping[str, Mapping[str, Any]] = {
    "ties": {"density": 0.2},
    "dare_ties": {"p": 0.9, "density": 0.2},
    "iso_cts": {"common_fraction": 0.8},
}
# Weight averaging is the mean model: no alpha to tune.
FIXED_ALPHA: Mapping[str, float] = {"average": 1.0}
ALPHAS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)
# While the best alpha is the largest tried, the grid goes on with these (PACT removes part of the
# task vectors, so its best alpha can lie above the plain method's).
ALPHAS_EXTEND: tuple[float, ...] = (2.5, 3.0, 4.0, 5.0)

# One hyperparameter at a time around the defaults (T = 8, validation split).
ABLATION_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "tsv", "iso_cts")
SUBSPACE_GRID: Mapping[str, tuple[Any, ...]] = {
    "pretrained_rank": (0.05, 0.1, 0.2, 0.4),
    "task_rank": (0.02, 0.05, 0.1, 0.2),
    "align_threshold": (0.7, 0.8, 0.9, 0.95, 0.99, 0.999),
    "strength": (0.1, 0.25, 0.5, 1.0),
    "side": ("left", "right", "both"),
    "exclude_self": (True, False),
    "svd": ("exact", "randomized"),
}
SCALAR_GRID: Mapping[str, tuple[Any, ...]] = {
    "weight_fraction": (0.05, 0.1, 0.2, 0.4),
    "anchor_fraction": (0.25, 0.5, 0.75),
    "strength": (0.25, 0.5, 1.0),
    "exclude_self": (True, False),
}
# Second stage: pairs of the best single changes of the one-at-a-time stage (one seed, T = 8).
SUBSPACE_COMBOS: tuple[Mapping[str, Any], ...] = (
    {"align_threshold": 0.99, "strength": 0.5},
    {"align_threshold": 0.99, "task_rank": 0.1},
    {"align_threshold": 0.99, "side": "right"},
    {"strength": 0.25, "side": "right"},
)
SCALAR_COMBOS: tuple[Mapping[str, Any], ...] = (
    {"anchor_fraction": 0.75, "strength": 0.5},
    {"anchor_fraction": 0.75, "weight_fraction": 0.05},
)


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    zoo: zoo_mod.ZooConfig = zoo_mod.ZooConfig()
    seeds: tuple[int, ...] = (0, 1, 2)
    task_counts: tuple[int, ...] = (4, 8)
    methods: tuple[str, ...] = METHODS
    alphas: tuple[float, ...] = ALPHAS
    ablation: bool = False
    ablation_only: bool = False  # skip the main tables (writes the ablation alone)
    ablation_methods: tuple[str, ...] = ABLATION_METHODS
    ablation_seeds: tuple[int, ...] | None = None  # None: all seeds
    subspace_grid: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=lambda: dict(SUBSPACE_GRID))
    scalar_grid: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=lambda: dict(SCALAR_GRID))
    subspace_combos: tuple[Mapping[str, Any], ...] = SUBSPACE_COMBOS
    scalar_combos: tuple[Mapping[str, Any], ...] = SCALAR_COMBOS


QUICK = QualityConfig(
    zoo=zoo_mod.QUICK,
    seeds=(0,),
    task_counts=(4,),
    methods=("task_arithmetic", "tsv"),
    alphas=(0.3, 1.0),
    ablation_methods=("tsv",),
    subspace_grid={"align_threshold": (0.9, 0.99)},
    scalar_grid={},
    subspace_combos=(),
    scalar_combos=(),
)


# --------------------------------------------------------------------------
# Evaluation of one zoo on its first T tasks


def _take(tree: PyTree, t: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[:t], tree)


class TaskEvaluator:
    """Validation sweeps and test accuracy of merged encoders on ``T`` tasks (any model family).

    The suites differ only in what they pass here: :class:`Evaluator` (the
    ViT zoo) and :mod:`benchmarks.minilm_suite` (all-MiniLM-L6-v2).

    Args:
      pretrained: encoder params ``W0`` (the tree that is merged).
      finetuned: ``T`` fine-tuned encoders, same structure.
      heads: fine-tuned heads stacked over tasks (used by every merged model).
      probe_heads: linear-probe heads on the frozen pre-trained encoder, stacked.
      val, test: ``(x, y)`` pytrees with a leading task axis ``T``.
      num_classes: ``(T,)`` classes per task (heads are padded to the largest).
      accuracy_fns: ``(shared, per_task)`` jitted functions returning ``(T,)``
        accuracies: ``shared(encoder, heads, x, y, ncls)`` evaluates one
        encoder on every task, ``per_task(stacked_encoders, ...)`` encoder
        ``t`` on task ``t``.
      seed: seeds the merges' PRNG keys (:func:`merge_key`).
      rules: the :class:`pact_jax.LeafRules` of the merges and of PACT.
    """

    def __init__(self, *, pretrained, finetuned, heads, probe_heads, val, test, num_classes,
                 accuracy_fns: tuple[Callable, Callable], seed: int, rules: pact_jax.LeafRules):
        self.t, self.seed, self.rules = len(finetuned), seed, rules
        self.pre, self.fts, self.heads = pretrained, list(finetuned), heads
        self.ncls = jnp.asarray(num_classes)
        self.val, self.test = val, test
        shared, per_task = accuracy_fns
        self._shared = shared
        self.finetuned = np.asarray(per_task(zoo_mod._stack(self.fts), self.heads, *self.test, self.ncls))
        self.pretrained = np.asarray(shared(self.pre, probe_heads, *self.test, self.ncls))

    def sweep(self, delta: PyTree, alphas: Sequence[float]) -> np.ndarray:
        """Mean validation accuracy at each alpha, ``(len(alphas),)``."""
        return np.asarray(_sweep_fn(self._shared)(self.pre, delta, jnp.asarray(alphas), self.heads, *self.val, self.ncls))

    def test_acc(self, delta: PyTree, alpha: float) -> np.ndarray:
        return np.asarray(self._shared(pact_jax.apply_delta(self.pre, delta, alpha), self.heads, *self.test, self.ncls))


class Evaluator(TaskEvaluator):
    """:class:`TaskEvaluator` for the first ``T`` tasks of one ViT zoo."""

    def __init__(self, cfg: zoo_mod.ZooConfig, zoo: zoo_mod.Zoo, data, t: int, seed: int):
        super().__init__(
            pretrained=zoo.pretrained,
            finetuned=zoo.finetuned[:t],
            heads=_take(zoo.heads, t),
            probe_heads=_take(zoo.probe_heads, t),
            val=(jnp.asarray(data["val"].x[:t]), jnp.asarray(data["val"].y[:t])),
            test=(jnp.asarray(data["test"].x[:t]), jnp.asarray(data["test"].y[:t])),
            num_classes=zoo_mod.num_classes(cfg)[:t],
            accuracy_fns=_accuracy_fns(cfg),
            seed=seed,
            rules=vit.MERGE_RULES,
        )


@functools.lru_cache(maxsize=None)
def _accuracy_fns(cfg: zoo_mod.ZooConfig):
    return zoo_mod.make_accuracy(cfg)


@functools.lru_cache(maxsize=None)
def _sweep_fn(shared: Callable):
    def sweep(pre, delta, alphas, heads, x, y, ncls):
        return jax.lax.map(lambda a: shared(pact_jax.apply_delta(pre, delta, a), heads, x, y, ncls).mean(), alphas)

    return jax.jit(sweep)


def merge_key(seed: int, method: str) -> jax.Array:
    """The PRNG key of a merge (DARE, randomized SVD): from the seed and the method name."""
    return jax.random.fold_in(jax.random.key(seed), sum(ord(c) * 31**i for i, c in enumerate(method)) % (2**31))


def merged_delta(
    ev: TaskEvaluator, method: str, use_pact: bool, pact_kwargs: Mapping[str, Any] | None = None
) -> PyTree:
    """``merge.delta`` of :func:`pact_jax.recipes.make_merge` for the evaluator's models.

    ``svd='randomized'`` in ``pact_kwargs`` also randomizes TSV-M's truncated
    SVDs (the randomized path of the speed benchmark), as ``pact-jax merge --svd`` does.
    """
    recipe = dict(
        use_pact=use_pact,
        pact_kwargs=dict(pact_kwargs or {}) if use_pact else None,
        method_kwargs=METHOD_KWARGS.get(method, {}),
        svd=(pact_kwargs or {}).get("svd"),
    )
    merge = recipes.make_merge(method, rules=ev.rules, **recipe)
    key = merge_key(ev.seed, method) if recipes.needs_key(method, **recipe) else None
    return jax.block_until_ready(merge.delta(ev.pre, ev.fts, key=key))


def pact_energy_removed(ev: TaskEvaluator, method: str, pact_kwargs: Mapping[str, Any] | None = None) -> float:
    """Share of the task vectors' total squared norm that PACT removes (mean over tasks)."""
    kw = {"perspective": recipes.default_perspective(method), **(pact_kwargs or {})}
    if kw.get("svd") == "randomized":
        kw.setdefault("key", merge_key(ev.seed, method))
    stacked = pact_jax.task_vectors(ev.pre, ev.fts)
    cleaned = pact_jax.pact(ev.pre, stacked, rules=ev.rules, **kw)

    def sq(tree):
        return sum(np.sum(np.square(np.asarray(x)).reshape(x.shape[0], -1), axis=1) for x in jax.tree_util.tree_leaves(tree))

    removed = sq(jax.tree_util.tree_map(lambda a, b: a - b, stacked, cleaned))
    return float(np.mean(removed / sq(stacked)))


def evaluate_method(
    ev: TaskEvaluator,
    method: str,
    use_pact: bool,
    alphas: Sequence[float],
    pact_kwargs: Mapping[str, Any] | None = None,
    test: bool = True,
    alphas_extend: Sequence[float] = ALPHAS_EXTEND,
) -> dict[str, Any]:
    """Merge once, choose alpha on validation (first maximum), report test there.

    The grid is ``alphas``, extended by ``alphas_extend`` (default
    :data:`ALPHAS_EXTEND`) one value at a time while its largest value is the best.
    """
    t0 = time.perf_counter()
    delta = merged_delta(ev, method, use_pact, pact_kwargs)
    merge_s = time.perf_counter() - t0
    if method in FIXED_ALPHA:
        grid = (FIXED_ALPHA[method],)
        val = ev.sweep(delta, grid)
    else:
        grid = tuple(alphas)
        val = ev.sweep(delta, grid)
        extra = [a for a in alphas_extend if a > max(grid)]
        while extra and int(np.argmax(val)) == len(grid) - 1:
            grid += (extra.pop(0),)
            val = np.concatenate([val, ev.sweep(delta, grid[-1:])])
    best = int(np.argmax(val))
    out = {"alpha": float(grid[best]), "val_mean": float(val[best]), "merge_s": merge_s}
    if test:
        acc = ev.test_acc(delta, grid[best])
        out.update(per_task=[float(a) for a in acc], mean=float(acc.mean()),
                   normalized=float(np.mean(acc / ev.finetuned)))
    return out


def evaluate_methods(
    ev: TaskEvaluator, methods: Sequence[str], alphas: Sequence[float], log: Callable[[str], None],
    alphas_extend: Sequence[float] = ALPHAS_EXTEND,
) -> dict[str, Any]:
    """Baselines and every method without / with PACT on one evaluator: one ``per_T[t][seed]`` entry."""
    res: dict[str, Any] = {
        "finetuned": {"per_task": ev.finetuned.tolist(), "mean": float(ev.finetuned.mean()), "normalized": 1.0},
        "pretrained": {
            "per_task": ev.pretrained.tolist(),
            "mean": float(ev.pretrained.mean()),
            "normalized": float(np.mean(ev.pretrained / ev.finetuned)),
        },
        "methods": {},
    }
    for method in methods:
        plain = evaluate_method(ev, method, False, alphas, alphas_extend=alphas_extend)
        with_pact = evaluate_method(ev, method, True, alphas, alphas_extend=alphas_extend)
        with_pact["energy_removed"] = pact_energy_removed(ev, method)
        res["methods"][method] = {"plain": plain, "pact": with_pact}
        log(
            f"    T={ev.t} seed {ev.seed} {method:<16} {100 * plain['mean']:5.1f} (alpha {plain['alpha']:.2f})  "
            f"+PACT {100 * with_pact['mean']:5.1f} (alpha {with_pact['alpha']:.2f}, "
            f"removes {100 * with_pact['energy_removed']:.1f}% of ||tau||^2)"
        )
    return res


def evaluate_zoo(
    cfg: QualityConfig, zoo: zoo_mod.Zoo, data, seed: int, t: int, log: Callable[[str], None]
) -> dict[str, Any]:
    return evaluate_methods(Evaluator(cfg.zoo, zoo, data, t, seed), cfg.methods, cfg.alphas, log)


# --------------------------------------------------------------------------
# Ablation of PACT's hyperparameters (validation split only)


def _pact_defaults(perspective: str) -> dict[str, Any]:
    defaults = {
        k: p.default for k, p in inspect.signature(pact_jax.pact).parameters.items() if p.default is not p.empty
    }
    return {**defaults, "strength": DEFAULT_STRENGTH[perspective]}


def ablation_settings(cfg: QualityConfig, method: str) -> list[tuple[str, Any, dict[str, Any]]]:
    """``(hyperparameter, value, pact_kwargs)`` rows for ``method``: one change at a time from the defaults.

    The first row is the library defaults; values equal to a default are not
    repeated. Methods whose recipe uses the subspace perspective run the
    subspace grid; those using the scalar perspective run the scalar grid
    plus one row with ``perspective='subspace'`` (everything else default);
    then the pairs of changes in ``cfg.*_combos`` (hyperparameter
    ``'combination'``).
    """
    defaults = _pact_defaults(recipes.default_perspective(method))
    rows: list[tuple[str, Any, dict[str, Any]]] = [("(defaults)", "", {})]

    def add(grid: Mapping[str, tuple[Any, ...]]) -> None:
        for name, values in grid.items():
            rows.extend((name, v, {name: v}) for v in values if not (name in defaults and v == defaults[name]))

    if recipes.default_perspective(method) == "scalar":
        add(cfg.scalar_grid)
        rows.append(("perspective", "subspace", {"perspective": "subspace"}))
        combos = cfg.scalar_combos
    else:
        add(cfg.subspace_grid)
        combos = cfg.subspace_combos
    for kw in combos:
        rows.append(("combination", ", ".join(f"{k}={v}" for k, v in kw.items()), dict(kw)))
    return rows


def run_ablation(cfg: QualityConfig, zoos: Mapping[int, zoo_mod.Zoo], data, log: Callable[[str], None]) -> dict[str, Any]:
    t = max(cfg.task_counts)
    seeds = cfg.ablation_seeds or cfg.seeds
    out: dict[str, Any] = {"T": t, "seeds": list(seeds), "methods": {}}
    for method in cfg.ablation_methods:
        rows = ablation_settings(cfg, method)
        scores = {i: [] for i in range(len(rows))}
        plain = []
        for seed in seeds:
            ev = Evaluator(cfg.zoo, zoos[seed], data, t, seed)
            plain.append(evaluate_method(ev, method, False, cfg.alphas, test=False)["val_mean"])
            for i, (name, value, kw) in enumerate(rows):
                scores[i].append(evaluate_method(ev, method, True, cfg.alphas, kw, test=False)["val_mean"])
                log(f"    ablation {method} seed {seed} {name}={value}: val {100 * scores[i][-1]:.2f}")
        table = [
            {"hyperparameter": name, "value": value, "pact_kwargs": kw, "val": scores[i]}
            for i, (name, value, kw) in enumerate(rows)
        ]
        out["methods"][method] = {"plain_val": plain, "rows": table}
        best = max(table, key=lambda r: np.mean(r["val"]))
        log(
            f"  ablation {method}: no PACT {100 * np.mean(plain):.2f}, defaults {100 * np.mean(table[0]['val']):.2f}, "
            f"best {best['hyperparameter']}={best['value']} {100 * np.mean(best['val']):.2f} (val, T={t})"
        )
    return out


# --------------------------------------------------------------------------
# Quality bars


def quality_bars(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's bars, checked on the largest T (means over seeds)."""
    t = str(max(int(k) for k in results["per_T"]))
    seeds = results["per_T"][t]

    def mean(fn):
        return float(np.mean([fn(s) for s in seeds.values()]))

    ft = np.mean([s["finetuned"]["per_task"] for s in seeds.values()], axis=0)
    pre = np.mean([s["pretrained"]["per_task"] for s in seeds.values()], axis=0)
    gap = ft - pre
    bars = [{
        "bar": f"fine-tuned models clearly beat the pre-trained encoder + probe: mean gap >= 10 points and "
               f">= 5 points on every task (T={t})",
        "value": f"mean gap {100 * float(np.mean(gap)):.1f} points, smallest {100 * float(np.min(gap)):.1f}",
        "holds": bool(np.mean(gap) >= 0.10 and np.min(gap) >= 0.05),
    }]
    methods = seeds[next(iter(seeds))]["methods"]

    def acc(m):
        return mean(lambda s: s["methods"][m]["plain"]["mean"])

    if "task_arithmetic" in methods:
        ta_norm = mean(lambda s: s["methods"]["task_arithmetic"]["plain"]["normalized"])
        bars.append({
            "bar": f"task arithmetic clearly below the fine-tuned models: normalised accuracy <= 90% (T={t})",
            "value": f"{100 * ta_norm:.1f}%",
            "holds": bool(ta_norm <= 0.90),
        })
        for svd_m in ("tsv", "iso_c", "iso_cts"):
            for ref in ("task_arithmetic", "ties"):
                if svd_m in methods and ref in methods:
                    bars.append({
                        "bar": f"{svd_m} ahead of {ref} (literature ordering; T={t}, mean test accuracy)",
                        "value": f"{100 * acc(svd_m):.1f} vs {100 * acc(ref):.1f}",
                        "holds": bool(acc(svd_m) > acc(ref)),
                    })
    return bars


# --------------------------------------------------------------------------
# Driver


def run(
    cfg: QualityConfig,
    cache: Path | None = None,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Builds or loads the zoos, evaluates every method, optionally the ablation.

    ``checkpoint(results)`` is called with the main results before the
    (long) ablation starts, so they are written even if it is interrupted.
    """
    t_start = time.perf_counter()
    data = zoo_mod.make_data(cfg.zoo)
    log(f"data ready ({time.perf_counter() - t_start:.0f} s)")
    zoos, build = {}, {}
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        zoos[seed], cached = zoo_mod.get_zoo(cfg.zoo, seed, cache, data=data, log=log)
        build[seed] = {"cached": cached, "seconds": time.perf_counter() - t0, **zoos[seed].meta["timings"]}
        log(f"zoo seed {seed}: {'cached' if cached else 'built'} ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    per_t: dict[str, dict[str, Any]] = {}
    for t in () if cfg.ablation_only else cfg.task_counts:
        per_t[str(t)] = {}
        for seed in cfg.seeds:
            per_t[str(t)][str(seed)] = evaluate_zoo(cfg, zoos[seed], data, seed, t, log)
    eval_s = time.perf_counter() - t0
    results: dict[str, Any] = {
        "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:]) if sys.argv and "quality" in sys.argv[0] else None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {
            "seeds": list(cfg.seeds), "task_counts": list(cfg.task_counts), "methods": list(cfg.methods),
            "alphas": list(cfg.alphas), "alphas_extend": list(ALPHAS_EXTEND), "method_kwargs": {k: dict(v) for k, v in METHOD_KWARGS.items()},
            "fixed_alpha": dict(FIXED_ALPHA), "zoo": dataclasses.asdict(cfg.zoo), "zoo_digest": cfg.zoo.digest(),
            "pact_perspective": {
                p: [m for m in cfg.methods if recipes.default_perspective(m) == p] for p in ("subspace", "scalar")
            },
        },
        "tasks": [{"name": t.name, "classes": t.num_classes, "analogue": t.analogue, "pretrain_bit": t.pretrain_bit}
                  for t in cfg.zoo.task_list],
        "zoo": {**zoo_mod.describe(cfg.zoo, zoos[cfg.seeds[0]]), "build": {str(k): v for k, v in build.items()}},
        "per_T": per_t,
        "timings": {"eval_s": eval_s},
    }
    if cfg.ablation or cfg.ablation_only:
        if checkpoint is not None and not cfg.ablation_only:
            checkpoint({**results, "bars": quality_bars(results),
                        "timings": {**results["timings"], "total_s": time.perf_counter() - t_start}})
        t0 = time.perf_counter()
        results["ablation"] = run_ablation(cfg, zoos, data, log)
        results["timings"]["ablation_s"] = time.perf_counter() - t0
    results["bars"] = quality_bars(results) if per_t else []
    results["timings"]["total_s"] = time.perf_counter() - t_start
    return results


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores; "
            f"Python {platform.python_version()}, jax {jax.__version__} ({jax.devices()[0].platform})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=None, help="task counts T (default: 4 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="zoo seeds (default: 0 1 2)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="methods (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny zoo and settings (the CI test); seconds")
    p.add_argument("--ablation", action="store_true", help="also run PACT's hyperparameter ablation (T = max --tasks)")
    p.add_argument("--ablation-only", action="store_true",
                   help="run only the ablation (default output benchmarks/results_ablation.md)")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=None, help="seeds for the ablation (default: --seeds)")
    p.add_argument("--cache", type=Path, default=None, help="zoo cache (default: $PACT_JAX_CACHE/zoo or ~/.cache/pact_jax/zoo)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown output; the JSON and PNG are written next to it (default: "
                        "benchmarks/results_quality.md, or results_ablation.md with --ablation-only)")
    return p


def config_from_args(args: argparse.Namespace) -> QualityConfig:
    cfg = QUICK if args.quick else QualityConfig()
    changes: dict[str, Any] = {"ablation": args.ablation, "ablation_only": args.ablation_only}
    if args.tasks:
        bad = [t for t in args.tasks if not 1 <= t <= cfg.zoo.num_tasks]
        if bad:
            raise ValueError(f"--tasks {bad}: the zoo has {cfg.zoo.num_tasks} tasks.")
        changes["task_counts"] = tuple(args.tasks)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.methods:
        changes["methods"] = tuple(args.methods)
    if args.ablation_seeds:
        changes["ablation_seeds"] = tuple(args.ablation_seeds)
    return dataclasses.replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    command = "python -m benchmarks.quality" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    out = args.out or Path(__file__).parent / ("results_ablation.md" if args.ablation_only else "results_quality.md")

    def write(res: dict[str, Any]) -> list[Path]:
        res["command"] = command
        return report.write(res, out)

    results = run(cfg, args.cache, log=lambda s: print(s, flush=True),
                  checkpoint=lambda r: print("main results written to " + ", ".join(map(str, write(r))), flush=True))
    paths = write(results)
    print()
    print(report.summary(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
