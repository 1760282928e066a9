"""Quality benchmark: what PACT (and SIFT) add to each merging method, the verdict table.

    python -m benchmarks.quality                 # 3 seeds, T = 4 and 8, every method x setting (+ zoo build if not cached)
    python -m benchmarks.quality --quick         # tiny settings, seconds (the CI test)

For each seed's zoo (:mod:`benchmarks.zoo`) and each task count ``T`` (the
first ``T`` tasks), each method merges the ``T`` fine-tuned encoders under
each *setting* (:data:`SETTINGS`), through :func:`pact_jax.recipes.make_merge`:

* task arithmetic, TSV-M, Iso-C, Iso-CTS x {``none``; ``paper``: PACT with
  the paper's defaults (preset ``'paper'``); ``release``: PACT as the authors
  released it (preset ``'release'``: plain QR bases, ``W0 = 0`` core);
  ``light``: PACT's light preset; ``sift``: SIFT, the authors' ablation
  baseline};
* TIES and DARE-TIES x {``none``; ``scalar``: PACT's scalar-weight
  perspective, *our own extension* (DESIGN.md §1b)};
* weight averaging, ``alpha = 1`` (the mean model): a baseline row.

The merged delta is computed once per (method, setting); ``alpha`` is then
chosen on the validation split (:func:`alpha_plan`):

* the authors' protocol (:mod:`pact_jax.alpha`) wherever they give a range:
  ``linspace(lo, hi, 31)[1:]`` walked in increasing order, early stop after 3
  points without a better validation mean accuracy, best by validation
  normalised accuracy (settings ``none``, ``paper``, ``release``, ``sift``;
  SIFT before TSV-M / Iso-CTS has no authors' range: PACT's range for that
  method is used, and the results say so);
* the whole grid (no early stop, best by validation normalised accuracy) on a
  range chosen here, wide enough to hold the plain and the PACT optimum, for
  ``light``, TIES and DARE-TIES;
* for every setting, when the best alpha is the grid's largest value, the
  grid is widened to twice its top (same number of points, all walked), and
  when it is the grid's first value, the same number of points is walked
  below it, down towards 0 (a method whose best alpha lies below the
  authors' range would otherwise be compared at the wrong scale, e.g. task
  arithmetic on the real ViT); the record says so.

The test split is evaluated at the chosen alpha only. Task ``t`` is always
evaluated with its own fine-tuned head (heads are not merged).

Cost: the transform of a setting gives the same filtered task vectors
whatever merger follows, so it runs once per (seed, T, setting) and each
merger is applied to its output (:func:`setting_delta`; the recipe's own
chain, tested equal to ``make_merge``'s delta); the share of ``||tau||^2``
it removes comes from the same run. Alphas are evaluated
:attr:`AlphaProtocol.chunk` at a time in one jitted sweep.

Baselines: each fine-tuned model on its own task, and the pre-trained encoder
with each task's linear-probe head (trained on the frozen pre-trained
encoder before fine-tuning; the "zero-shot" row).

Normalised accuracy of task ``t`` = merged accuracy / fine-tuned accuracy on
``t`` (validation: the fine-tuned model's validation accuracy); tables give
mean +- sample std over seeds and the paired difference to ``none``.

Writes ``benchmarks/results_quality.md`` (``--out``; ``--quick`` writes to a
temporary folder unless ``--out``), the same numbers as
JSON next to it, and a PNG of normalised accuracy per method and setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
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
from pact_jax import alpha as alpha_mod
from pact_jax import recipes
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

# Setting -> the transform keywords of recipes.make_merge.
SETTINGS: Mapping[str, Mapping[str, Any]] = {
    "none": {},
    "paper": {"pact_preset": "paper"},
    "release": {"pact_preset": "release"},
    "light": {"pact_preset": "light"},
    "sift": {"use_sift": True},
    "scalar": {"use_pact": True},  # the scalar-weight perspective the recipe picks for TIES / DARE-TIES
}
SETTING_LABELS: Mapping[str, str] = {
    "none": "none",
    "paper": "PACT (paper default)",
    "release": "PACT (as released)",
    "light": "PACT light",
    "sift": "SIFT",
    "scalar": "scalar PACT (our own extension)",
}
SUBSPACE_SETTINGS: tuple[str, ...] = ("none", "paper", "release", "light", "sift")
SCALAR_SETTINGS: tuple[str, ...] = ("none", "scalar")
# Which transform's range of the authors a setting uses (None: the plain method's).
AUTHORS_TRANSFORM: Mapping[str, str | None] = {"none": None, "paper": "pact", "release": "pact", "sift": "sift"}
PATIENCE = 3  # the authors' early stop
GRID_POINTS = 30  # linspace(lo, hi, 31)[1:]
# Full grids (no range of the authors): (0, hi]. TIES / DARE-TIES: pact_jax's scale of one task vector;
# their best alpha was 0.1-0.5 on the ViT zoo, 0.5-1.5 on MiniLM with the earlier grid.
FULL_GRID_HI: Mapping[str, float] = {"ties": 2.0, "dare_ties": 2.0}
CHUNK = 3  # alphas per jitted validation sweep (early stopping is applied point by point within)


def settings_for(method: str, allowed: Sequence[str] = tuple(SETTINGS)) -> tuple[str, ...]:
    """The settings that run for ``method`` (``none`` always, for the paired differences)."""
    if method in FIXED_ALPHA:
        return ("none",)
    plan = SCALAR_SETTINGS if method in recipes.SCALAR_METHODS else SUBSPACE_SETTINGS
    return tuple(s for s in plan if s == "none" or s in allowed)


@dataclasses.dataclass(frozen=True)
class AlphaProtocol:
    """Sizes of the alpha searches: ``points`` per authors' grid (30: their ``linspace(lo, hi, 31)[1:]``),
    ``full_points`` per whole-grid search (``None``: ``points``), ``chunk`` alphas per jitted sweep."""

    points: int = GRID_POINTS
    full_points: int | None = None
    chunk: int = CHUNK


@dataclasses.dataclass(frozen=True)
class AlphaPlan:
    """How alpha is chosen for one (method, setting, T)."""

    grid: tuple[float, ...]
    patience: int | None  # None: the whole grid
    source: str  # where the range comes from (said in the report)

    def describe(self) -> dict[str, Any]:
        """``lo`` is the open end of the range ``(lo, hi]`` (one step below the first point)."""
        step = self.grid[1] - self.grid[0] if len(self.grid) > 1 else 0.0
        return {"lo": round(self.grid[0] - step, 12), "hi": self.grid[-1], "points": len(self.grid),
                "patience": self.patience, "source": self.source}


def alpha_plan(method: str, setting: str, t: int, points: int = GRID_POINTS, full_points: int | None = None) -> AlphaPlan:
    """The grid and early stop for ``method`` under ``setting`` with ``T = t`` tasks (module docstring).

    ``points``: points of the authors' grids; ``full_points``: of the whole-grid searches (default ``points``).
    """
    if method in FIXED_ALPHA:
        return AlphaPlan((FIXED_ALPHA[method],), None, "fixed (the mean model)")
    if setting in AUTHORS_TRANSFORM and method not in recipes.SCALAR_METHODS:
        transform = AUTHORS_TRANSFORM[setting]
        if (method, transform) in alpha_mod.AUTHORS_RANGES:
            grid = alpha_mod.alpha_grid(method, transform, t, points=points)
            name = method + (f"+{transform}" if transform else "")
            return AlphaPlan(grid, PATIENCE, f"authors' range for {name}")
        grid = alpha_mod.alpha_grid(method, "pact", t, points=points)
        return AlphaPlan(grid, PATIENCE, f"authors' PACT range for {method} (no authors' {transform} range for it)")
    if method in FULL_GRID_HI:
        hi = FULL_GRID_HI[method]
    else:  # light: wide enough for the plain and the PACT optimum
        hi = max(alpha_mod.alpha_grid(method, None, points=1)[-1], alpha_mod.alpha_grid(method, "pact", t, points=1)[-1])
    n = points if full_points is None else full_points
    grid = tuple(float(a) for a in np.linspace(0.0, hi, n + 1)[1:])
    return AlphaPlan(grid, None, "full grid (0, hi] chosen here")


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    zoo: zoo_mod.ZooConfig = zoo_mod.ZooConfig()
    seeds: tuple[int, ...] = (0, 1, 2)
    task_counts: tuple[int, ...] = (4, 8)
    methods: tuple[str, ...] = METHODS
    settings: tuple[str, ...] = tuple(SETTINGS)
    alpha: AlphaProtocol = AlphaProtocol()


QUICK = QualityConfig(
    zoo=zoo_mod.QUICK,
    seeds=(0,),
    task_counts=(4,),
    methods=("average", "task_arithmetic", "tsv", "ties"),
    settings=("none", "paper", "light", "sift", "scalar"),
    alpha=AlphaProtocol(points=4, chunk=2),
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
        stacked = zoo_mod._stack(self.fts)
        self.finetuned = np.asarray(per_task(stacked, self.heads, *self.test, self.ncls))
        self.finetuned_val = np.asarray(per_task(stacked, self.heads, *self.val, self.ncls))
        self.pretrained = np.asarray(shared(self.pre, probe_heads, *self.test, self.ncls))

    def sweep_tasks(self, delta: PyTree, alphas: Sequence[float]) -> np.ndarray:
        """Validation accuracy per task at each alpha, ``(len(alphas), T)``: one jitted call."""
        return np.asarray(_sweep_fn(self._shared)(self.pre, delta, jnp.asarray(alphas, jnp.float32), self.heads,
                                                  *self.val, self.ncls))

    def sweep(self, delta: PyTree, alphas: Sequence[float]) -> np.ndarray:
        """Mean validation accuracy at each alpha, ``(len(alphas),)``."""
        return self.sweep_tasks(delta, alphas).mean(axis=1)

    def val_scores(self, acc: np.ndarray) -> dict[str, float]:
        """``{'mean', 'normalized'}`` of one ``(T,)`` validation accuracy vector (the authors' two criteria)."""
        return {"mean": float(acc.mean()), "normalized": float(np.mean(acc / np.maximum(self.finetuned_val, 1e-6)))}

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
        return jax.lax.map(lambda a: shared(pact_jax.apply_delta(pre, delta, a), heads, x, y, ncls), alphas)

    return jax.jit(sweep)


def merge_key(seed: int, method: str) -> jax.Array:
    """The PRNG key of a merge (DARE, randomized SVD): from the seed and the method name (the same for
    every setting of a method, so DARE drops the same entries with and without a transform)."""
    return jax.random.fold_in(jax.random.key(seed), sum(ord(c) * 31**i for i, c in enumerate(method)) % (2**31))


def recipe(method: str, setting: str) -> dict[str, Any]:
    """The keywords of :func:`pact_jax.recipes.make_merge` for ``method`` under ``setting``."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {list(SETTINGS)}.")
    return {**SETTINGS[setting], "method_kwargs": dict(METHOD_KWARGS.get(method, {}))}


def merged_delta(ev: TaskEvaluator, method: str, setting: str = "none") -> PyTree:
    """``merge.delta`` of :func:`pact_jax.recipes.make_merge` for the evaluator's models."""
    kw = recipe(method, setting)
    merge = recipes.make_merge(method, rules=ev.rules, **kw)
    key = merge_key(ev.seed, method) if recipes.needs_key(method, **kw) else None
    return jax.block_until_ready(merge.delta(ev.pre, ev.fts, key=key))


def _sq_norms(tree: PyTree) -> np.ndarray:
    """``(T,)`` squared norms of a stacked tree."""
    return sum(np.sum(np.square(np.asarray(x, np.float64)).reshape(x.shape[0], -1), axis=1)
               for x in jax.tree_util.tree_leaves(tree))


def _transform(ev: TaskEvaluator, method: str, setting: str) -> tuple[str | None, dict[str, Any]]:
    kw = recipe(method, setting)
    kw.pop("method_kwargs")
    transform, t_kw = recipes.transform_settings(method, **kw)
    return transform, dict(t_kw)


def transformed(ev: TaskEvaluator, method: str, setting: str) -> tuple[PyTree, float] | None:
    """``(filtered task vectors, share of ||tau||^2 removed)`` of the setting's transform (PACT or SIFT)
    with the keywords the recipe gives it (:func:`pact_jax.recipes.transform_settings`); ``None``
    without a transform. Kept on the evaluator for the setting last asked for: the same keywords
    give the same filtered vectors whatever merger follows (preset ``'paper'`` before TA, TSV-M,
    Iso-C and Iso-CTS; scalar PACT before TIES and DARE-TIES), so it runs once per setting."""
    transform, t_kw = _transform(ev, method, setting)
    if transform is None:
        return None
    randomized = t_kw.get("svd") == "randomized"
    ident = (transform, repr(sorted(t_kw.items())), method if randomized else None)
    cached = ev.__dict__.get("_transformed")
    if cached is None or cached[0] != ident:
        ev.__dict__.pop("_transformed", None)  # one filtered copy of the task vectors at a time
        if randomized:
            t_kw.setdefault("key", merge_key(ev.seed, method))
        stacked = pact_jax.task_vectors(ev.pre, ev.fts)
        cleaned = jax.block_until_ready(getattr(pact_jax, transform)(ev.pre, stacked, rules=ev.rules, **t_kw))
        removed = _sq_norms(jax.tree_util.tree_map(lambda a, b: a - b, stacked, cleaned))
        ev.__dict__["_transformed"] = cached = (ident, cleaned, float(np.mean(removed / _sq_norms(stacked))))
    return cached[1], cached[2]


def energy_removed(ev: TaskEvaluator, method: str, setting: str) -> float | None:
    """Share of the task vectors' squared norm that the setting's transform (PACT or SIFT) removes,
    mean over tasks; ``None`` without a transform."""
    out = transformed(ev, method, setting)
    return None if out is None else out[1]


def pact_energy_removed(ev: TaskEvaluator, method: str, setting: str = "paper") -> float | None:
    """:func:`energy_removed` (kept under its earlier name)."""
    return energy_removed(ev, method, setting)


def shares_transform(method: str, setting: str) -> bool:
    """Whether :func:`setting_delta` may merge the shared :func:`transformed` vectors: a transform
    is on, nothing is random (the recipe needs no key), and the merger is one function of the task
    vectors (not DARE-TIES, whose two steps ``make_merge`` builds)."""
    kw = recipe(method, setting)
    return bool(SETTINGS[setting]) and method != "dare_ties" and not recipes.needs_key(method, **kw)


def setting_delta(ev: TaskEvaluator, method: str, setting: str) -> PyTree:
    """The merged delta of ``method`` under ``setting``: :func:`merged_delta` (the recipe), computed
    from the shared filtered task vectors where :func:`shares_transform` allows. That is the
    recipe's own chain, ``transform -> merger`` with the same keywords and rules, with the
    transform's output computed once per setting (tested equal to :func:`merged_delta`)."""
    if not shares_transform(method, setting):
        return merged_delta(ev, method, setting)
    cleaned, _ = transformed(ev, method, setting)
    merger = functools.partial(pact_jax.merges.MERGERS[method], **METHOD_KWARGS.get(method, {}))

    def filtered(stacked):  # the transform step, its output already computed
        return cleaned

    merge = pact_jax.chain(filtered, merger, rules=ev.rules)
    return jax.block_until_ready(merge.delta(ev.pre, ev.fts))


def choose_alpha(ev: TaskEvaluator, delta: PyTree, plan: AlphaPlan, chunk: int = CHUNK) -> dict[str, Any]:
    """Walks ``plan`` on the validation split (early stop on the mean accuracy, best by the normalised
    accuracy); when the best is the grid's largest value, walks on to twice that value (the same
    number of points, no early stop); when it is the grid's first value, walks the same number of
    points below it, down towards 0 (no early stop). The best of everything walked is taken."""

    def evaluate_many(alphas: tuple[float, ...]) -> list[dict[str, float]]:
        padded = tuple(alphas) + (alphas[-1],) * (chunk - len(alphas))  # one compiled shape
        return [ev.val_scores(a) for a in ev.sweep_tasks(delta, padded)[: len(alphas)]]

    def walk(grid: tuple[float, ...]) -> alpha_mod.AlphaSearch:
        return alpha_mod.search_curve(evaluate_many, grid, patience=None, stop_on="mean", select_by="normalized",
                                      chunk=chunk)

    found = alpha_mod.search_curve(evaluate_many, plan.grid, patience=plan.patience, stop_on="mean",
                                   select_by="normalized", chunk=chunk)
    alphas, metrics = list(found.alphas), list(found.metrics)
    widened_to = refined_to = None
    n = len(plan.grid)
    if found.at_high_end and n > 1:
        hi = plan.grid[-1]
        more = walk(tuple(float(a) for a in np.linspace(hi, 2 * hi, n + 1)[1:]))
        alphas += more.alphas
        metrics += more.metrics
        widened_to = alphas[-1]
    first = int(np.argmax([m["normalized"] for m in metrics])) == 0
    if first and n > 1 and plan.grid[0] > 0:
        lo = plan.grid[0]
        more = walk(tuple(float(a) for a in np.linspace(0.0, lo, n + 1)[1:-1]))
        alphas = list(more.alphas) + alphas  # increasing alpha throughout
        metrics = list(more.metrics) + metrics
        refined_to = alphas[0]
    norm = [m["normalized"] for m in metrics]
    best = int(np.argmax(norm))  # the first maximum: the smallest alpha among ties
    at_end = "high" if best == len(alphas) - 1 and found.at_high_end else "low" if best == 0 else None
    return {
        "alpha": alphas[best], "val_mean": metrics[best]["mean"], "val_normalized": metrics[best]["normalized"],
        "grid": plan.describe(), "widened_to": widened_to, "refined_to": refined_to, "at_end": at_end,
        "stopped_early": found.stopped_early,
        "curve": {"alpha": alphas, "val_mean": [m["mean"] for m in metrics], "val_normalized": norm},
    }


def evaluate_setting(
    ev: TaskEvaluator, method: str, setting: str, protocol: AlphaProtocol = AlphaProtocol(), test: bool = True
) -> dict[str, Any]:
    """Merge once, choose alpha on validation (:func:`alpha_plan`, :func:`choose_alpha`), report test there."""
    t0 = time.perf_counter()
    delta = setting_delta(ev, method, setting)
    merge_s = time.perf_counter() - t0
    plan = alpha_plan(method, setting, ev.t, protocol.points, protocol.full_points)
    t0 = time.perf_counter()
    if method in FIXED_ALPHA:
        scores = ev.val_scores(ev.sweep_tasks(delta, plan.grid * protocol.chunk)[0])  # the sweep's one shape
        out = {"alpha": plan.grid[0], "val_mean": scores["mean"], "val_normalized": scores["normalized"],
               "grid": plan.describe(), "widened_to": None, "at_end": None, "stopped_early": False,
               "curve": {"alpha": list(plan.grid), "val_mean": [scores["mean"]], "val_normalized": [scores["normalized"]]}}
    else:
        out = choose_alpha(ev, delta, plan, protocol.chunk)
    out.update(setting=setting, merge_s=merge_s, search_s=time.perf_counter() - t0)
    if test:
        acc = ev.test_acc(delta, out["alpha"])
        out.update(per_task=[float(a) for a in acc], mean=float(acc.mean()),
                   normalized=float(np.mean(acc / ev.finetuned)))
    out["energy_removed"] = energy_removed(ev, method, setting)
    return out


def evaluate_methods(
    ev: TaskEvaluator, methods: Sequence[str], settings: Sequence[str], log: Callable[[str], None],
    protocol: AlphaProtocol = AlphaProtocol(),
) -> dict[str, Any]:
    """Baselines and every (method, setting) on one evaluator: one ``per_T[t][seed]`` entry."""
    res: dict[str, Any] = {
        "finetuned": {"per_task": ev.finetuned.tolist(), "mean": float(ev.finetuned.mean()), "normalized": 1.0,
                      "val_per_task": ev.finetuned_val.tolist()},
        "pretrained": {
            "per_task": ev.pretrained.tolist(),
            "mean": float(ev.pretrained.mean()),
            "normalized": float(np.mean(ev.pretrained / ev.finetuned)),
        },
        # Rows stay method by method; the work goes setting by setting, so each transform runs once.
        "methods": {m: dict.fromkeys(settings_for(m, settings)) for m in methods},
    }
    for setting in SETTINGS:
        for method in methods:
            if setting not in res["methods"][method]:
                continue
            r = evaluate_setting(ev, method, setting, protocol)
            res["methods"][method][setting] = r
            e = r["energy_removed"]
            log(
                f"    T={ev.t} seed {ev.seed} {method:<16} {setting:<8} test {100 * r['mean']:5.1f} "
                f"(norm {100 * r['normalized']:5.1f}) alpha {r['alpha']:.3g} ({len(r['curve']['alpha'])} tried"
                + (f", widened to {r['widened_to']:.3g}" if r["widened_to"] else "")
                + (f", refined down to {r['refined_to']:.3g}" if r.get("refined_to") else "")
                + (f", best at the {r['at_end']} end" if r["at_end"] else "") + ")"
                + ("" if e is None else f", removes {100 * e:.1f}% of ||tau||^2")
                + f"  [{r['merge_s']:.1f} s merge, {r['search_s']:.1f} s alpha]"
            )
    ev.__dict__.pop("_transformed", None)
    return res


def evaluate_zoo(
    cfg: QualityConfig, zoo: zoo_mod.Zoo, data, seed: int, t: int, log: Callable[[str], None]
) -> dict[str, Any]:
    return evaluate_methods(Evaluator(cfg.zoo, zoo, data, t, seed), cfg.methods, cfg.settings, log, cfg.alpha)


def protocol_config(cfg_methods: Sequence[str], settings: Sequence[str], protocol: AlphaProtocol,
                    task_counts: Sequence[int]) -> dict[str, Any]:
    """What the report states about the settings and the alpha protocol (JSON ``config`` entries)."""
    return {
        "settings": list(settings),
        "setting_labels": dict(SETTING_LABELS),
        "recipes": {s: dict(SETTINGS[s]) for s in settings},
        "plan": {m: list(settings_for(m, settings)) for m in cfg_methods},
        "alpha_protocol": {
            "points": protocol.points, "full_points": protocol.full_points or protocol.points,
            "patience": PATIENCE, "chunk": protocol.chunk, "stop_on": "validation mean accuracy",
            "select_by": "validation normalised accuracy", "widen": "x2 when the best is the grid's top",
            "refine": "the same number of points below the first when the best is the grid's first point",
            "grids": {str(t): {m: {s: alpha_plan(m, s, t, protocol.points, protocol.full_points).describe()
                                   for s in settings_for(m, settings)}
                               for m in cfg_methods} for t in task_counts},
        },
        "method_kwargs": {k: dict(v) for k, v in METHOD_KWARGS.items()},
        "fixed_alpha": dict(FIXED_ALPHA),
        "pact_perspective": {p: [m for m in cfg_methods if recipes.default_perspective(m) == p]
                             for p in ("subspace", "scalar")},
    }


# --------------------------------------------------------------------------
# Quality bars


def quality_bars(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's bars, checked on the largest T (means over seeds; the methods without a transform)."""
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
        return mean(lambda s: s["methods"][m]["none"]["mean"])

    if "task_arithmetic" in methods:
        ta_norm = mean(lambda s: s["methods"]["task_arithmetic"]["none"]["normalized"])
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


def run(cfg: QualityConfig, cache: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Builds or loads the zoos and evaluates every (method, setting)."""
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
    for t in cfg.task_counts:
        per_t[str(t)] = {}
        for seed in cfg.seeds:
            t1 = time.perf_counter()
            per_t[str(t)][str(seed)] = evaluate_zoo(cfg, zoos[seed], data, seed, t, log)
            log(f"  T={t} seed {seed}: {time.perf_counter() - t1:.0f} s")
    eval_s = time.perf_counter() - t0
    results: dict[str, Any] = {
        "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:]) if sys.argv and "quality" in sys.argv[0] else None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {
            "seeds": list(cfg.seeds), "task_counts": list(cfg.task_counts), "methods": list(cfg.methods),
            **protocol_config(cfg.methods, cfg.settings, cfg.alpha, cfg.task_counts),
            "zoo": dataclasses.asdict(cfg.zoo), "zoo_digest": cfg.zoo.digest(),
        },
        "tasks": [{"name": t.name, "classes": t.num_classes, "analogue": t.analogue, "pretrain_bit": t.pretrain_bit}
                  for t in cfg.zoo.task_list],
        "zoo": {**zoo_mod.describe(cfg.zoo, zoos[cfg.seeds[0]]), "build": {str(k): v for k, v in build.items()}},
        "per_T": per_t,
        "timings": {"eval_s": eval_s},
    }
    results["bars"] = quality_bars(results)
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


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """``--methods``, ``--settings``, ``--points`` (shared with :mod:`benchmarks.minilm_suite`)."""
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="methods (default: all)")
    p.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS),
                   help="settings besides 'none', where they apply to a method (default: all)")
    p.add_argument("--points", type=int, default=None,
                   help=f"points per authors' alpha grid (default {GRID_POINTS}: their linspace(lo, hi, 31)[1:])")
    p.add_argument("--full-points", type=int, default=None,
                   help="points per whole-grid alpha search (PACT light, TIES, DARE-TIES; default: the suite's)")


def protocol_changes(args: argparse.Namespace, protocol: AlphaProtocol) -> dict[str, Any]:
    """The config changes of ``--methods``, ``--settings``, ``--points``, ``--full-points``."""
    changes: dict[str, Any] = {}
    if args.methods:
        changes["methods"] = tuple(args.methods)
    if args.settings:
        changes["settings"] = tuple(dict.fromkeys(("none", *args.settings)))
    sizes = {}
    for name, value in (("points", args.points), ("full_points", args.full_points)):
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value}: at least 1.")
            sizes[name] = value
    if sizes:
        changes["alpha"] = dataclasses.replace(protocol, **sizes)
    return changes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=None, help="task counts T (default: 4 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="zoo seeds (default: 0 1 2)")
    add_protocol_args(p)
    p.add_argument("--quick", action="store_true", help="tiny zoo and settings (the CI test); seconds")
    p.add_argument("--cache", type=Path, default=None, help="zoo cache (default: $PACT_JAX_CACHE/zoo or ~/.cache/pact_jax/zoo)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown output; the JSON and PNG are written next to it (default: benchmarks/results_quality.md; "
                        "a temporary folder with --quick)")
    return p


def config_from_args(args: argparse.Namespace) -> QualityConfig:
    cfg = QUICK if args.quick else QualityConfig()
    changes = protocol_changes(args, cfg.alpha)
    if args.tasks:
        bad = [t for t in args.tasks if not 1 <= t <= cfg.zoo.num_tasks]
        if bad:
            raise ValueError(f"--tasks {bad}: the zoo has {cfg.zoo.num_tasks} tasks.")
        changes["task_counts"] = tuple(args.tasks)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    return dataclasses.replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    command = "python -m benchmarks.quality" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    out = report.output_path(args.out, Path(__file__).parent / "results_quality.md", args.quick)
    results = run(cfg, args.cache, log=lambda s: print(s, flush=True))
    report.publish(results, out, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
