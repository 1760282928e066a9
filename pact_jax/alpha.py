"""Choosing the merge coefficient ``alpha`` on validation data, as the PACT authors do.

The merged delta is computed once (``merge.delta(pretrained, finetuned)`` of
:func:`pact_jax.chain`); only ``W0 + alpha * delta`` changes along the search::

    merge = pact_jax.chain(pact_jax.merges.tsv)
    delta = merge.delta(pretrained, finetuned)
    found = pact_jax.search_alpha(val_accuracy, pretrained, delta, pact_jax.alpha_grid("tsv"))
    params = pact_jax.apply_delta(pretrained, delta, found.alpha)

The protocol (DESIGN.md §1a step 6, the authors' code):

1. the grid is ``linspace(lo, hi, 31)[1:]`` (30 points, ``lo`` excluded), with
   ``(lo, hi)`` per method and pre-processing (:data:`AUTHORS_RANGES`);
2. it is walked in increasing order; after ``patience`` (3) consecutive points
   without a better validation *average accuracy* (``stop_on``) the walk
   stops;
3. of the points walked, the best validation *normalized accuracy*
   (``select_by``) wins (the first one on ties); the test split is then
   evaluated at that alpha alone.

:func:`search_alpha` also says whether the winner sits at an end of the grid,
so a caller can widen the grid when it is the largest value tried.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np

from pact_jax.tree import PyTree, apply_delta

__all__ = ["AUTHORS_RANGES", "AlphaSearch", "alpha_grid", "search_alpha", "search_curve"]

Score = Union[float, Mapping[str, float]]

# (method, transform) -> (lo, hi, scale of the authors' merged delta). "sum": the authors' delta is
# on pact_jax's scale; "mean": the authors merge the task MEAN where pact_jax's task_arithmetic merges
# the SUM, so their alpha is T times pact_jax's (alpha_grid divides by num_tasks).
AUTHORS_RANGES: Mapping[tuple[str, str | None], tuple[float, float, str]] = {
    ("task_arithmetic", None): (0.0, 1.0, "sum"),
    ("tsv", None): (0.0, 5.0, "sum"),
    ("iso_c", None): (0.0, 5.0, "sum"),
    ("iso_cts", None): (0.0, 5.0, "sum"),
    ("task_arithmetic", "pact"): (2.5, 7.5, "mean"),
    ("tsv", "pact"): (1.0, 6.0, "sum"),
    ("iso_c", "pact"): (1.0, 6.0, "sum"),
    ("iso_cts", "pact"): (1.0, 6.0, "sum"),
    ("task_arithmetic", "sift"): (3.0, 8.0, "mean"),
    ("iso_c", "sift"): (2.0, 7.0, "sum"),
}
AUTHORS_POINTS = 30  # linspace(lo, hi, 31)[1:]


def alpha_grid(
    method: str, transform: str | None = None, num_tasks: int | None = None, *, points: int = AUTHORS_POINTS
) -> tuple[float, ...]:
    """The authors' alpha grid for ``method`` after ``transform``, on pact_jax's scale.

    ``linspace(lo, hi, points + 1)[1:]`` with ``(lo, hi)`` from
    :data:`AUTHORS_RANGES` (``points=30``: the authors' 31-point linspace
    without its first value). The authors' PACT-TA and SIFT-TA merge the task
    MEAN; pact_jax's ``task_arithmetic`` is the SUM, so those grids are divided
    by ``num_tasks`` (required for them, ignored otherwise).

    Args:
      method: a merger name of :data:`pact_jax.recipes.METHODS` (``'task_arithmetic'``,
        ``'tsv'``, ``'iso_c'``, ``'iso_cts'``).
      transform: ``None`` (the plain method), ``'pact'`` or ``'sift'``.
      num_tasks: ``T``, for the grids the authors define on the task mean.
      points: number of grid points.

    Raises:
      ValueError: no authors' range for ``(method, transform)`` (the message
        lists those that exist: the authors give none for, e.g., TIES or SIFT
        with TSV-M / Iso-CTS; pick a range yourself and build it with
        ``numpy.linspace``), or ``num_tasks`` missing where needed.
    """
    key = (method, transform)
    if key not in AUTHORS_RANGES:
        known = ", ".join(f"{m}" + (f"+{t}" if t else "") for m, t in AUTHORS_RANGES)
        raise ValueError(f"no authors' alpha range for method={method!r}, transform={transform!r}; known: {known}.")
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"points must be a positive int, got {points!r}.")
    lo, hi, scale = AUTHORS_RANGES[key]
    grid = np.linspace(lo, hi, points + 1)[1:]
    if scale == "mean":
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(
                f"{method}+{transform}: the authors' range [{lo}, {hi}] scales the task MEAN; pact_jax's "
                f"{method} merges the SUM, so pass num_tasks (T) to get the grid divided by T; got {num_tasks!r}."
            )
        grid = grid / num_tasks
    return tuple(float(a) for a in grid)


@dataclasses.dataclass(frozen=True)
class AlphaSearch:
    """Outcome of :func:`search_alpha`.

    Attributes:
      alpha: the chosen alpha.
      score: its ``select_by`` score (the metric itself when it is a float).
      alphas: the grid points walked, in order (a prefix of ``grid``).
      scores: the ``select_by`` score at each point walked.
      grid: the whole grid given.
      best_index: index of ``alpha`` in ``alphas``.
      stopped_early: whether the walk stopped before the end of the grid.
      metrics: the mappings returned at each point walked, when the metric is
        a mapping; ``None`` for a float metric.
    """

    alpha: float
    score: float
    alphas: tuple[float, ...]
    scores: tuple[float, ...]
    grid: tuple[float, ...]
    best_index: int
    stopped_early: bool
    metrics: tuple[Mapping[str, float], ...] | None = None

    @property
    def at_low_end(self) -> bool:
        """The best is the grid's smallest value."""
        return self.best_index == 0

    @property
    def at_high_end(self) -> bool:
        """The best is the grid's largest value (widen the grid upwards)."""
        return self.best_index == len(self.grid) - 1

    @property
    def at_end(self) -> bool:
        """The best sits at either end of the grid."""
        return self.at_low_end or self.at_high_end

    def curve(self, name: str) -> tuple[float, ...]:
        """The values of the named metric at the points walked (mapping metrics only)."""
        if self.metrics is None:
            raise ValueError("the metric was a float; the curve is .scores.")
        return tuple(float(m[name]) for m in self.metrics)


def _check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(a) for a in grid)
    except (TypeError, ValueError) as e:
        raise ValueError(f"grid must be a sequence of numbers ({e}).") from e
    if not values:
        raise ValueError("grid is empty.")
    if not all(math.isfinite(a) for a in values):
        raise ValueError(f"grid has non-finite values: {values}.")
    bad = [i for i in range(1, len(values)) if values[i] <= values[i - 1]]
    if bad:
        i = bad[0]
        raise ValueError(
            f"grid must be strictly increasing; grid[{i - 1}]={values[i - 1]} >= grid[{i}]={values[i]}."
        )
    return values


def _check_patience(patience: int | None) -> None:
    if patience is None:
        return
    if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 1:
        raise ValueError(f"patience must be an int >= 1 or None (walk the whole grid), got {patience!r}.")


def _pick(score: Any, name: str | None, role: str, alpha: float) -> float:
    if isinstance(score, Mapping):
        if name is None:
            raise ValueError(
                f"the metric returned a mapping ({sorted(score)}); name the entry for {role} "
                f"(stop_on= / select_by=)."
            )
        if name not in score:
            raise ValueError(f"{role}={name!r} is not among the metric's entries {sorted(score)}.")
        value = score[name]
    else:
        if name is not None:
            raise ValueError(f"{role}={name!r} given, but the metric returned a single number, not a mapping.")
        value = score
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric at alpha={alpha}: {role} value {value!r} is not a number.") from e
    if math.isnan(value):
        raise ValueError(f"metric at alpha={alpha}: {role} value is NaN.")
    return value


def search_curve(
    evaluate_many: Callable[[tuple[float, ...]], Sequence[Score]],
    grid: Sequence[float],
    *,
    patience: int | None = 3,
    stop_on: str | None = None,
    select_by: str | None = None,
    chunk: int = 1,
) -> AlphaSearch:
    """:func:`search_alpha` with a batched evaluation: ``evaluate_many(alphas) -> scores``.

    The grid is evaluated ``chunk`` points at a time (one call per chunk, e.g.
    one jitted sweep over alphas), and the protocol is applied to the points in
    order as if they came one at a time: the result is the same for any
    ``chunk``; points evaluated past the stopping point are discarded.
    """
    values = _check_grid(grid)
    _check_patience(patience)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}.")
    select_by = stop_on if select_by is None else select_by

    walked: list[float] = []
    metrics: list[Any] = []
    stop_vals: list[float] = []
    sel_vals: list[float] = []
    best_stop, since_best, stopped = -math.inf, 0, False
    i = 0
    while i < len(values) and not stopped:
        batch = values[i: i + chunk]
        out = list(evaluate_many(batch))
        if len(out) != len(batch):
            raise ValueError(f"evaluate_many returned {len(out)} scores for {len(batch)} alphas.")
        for a, s in zip(batch, out):
            walked.append(a)
            metrics.append(s)
            stop_vals.append(_pick(s, stop_on, "stop_on", a))
            sel_vals.append(_pick(s, select_by, "select_by", a))
            if stop_vals[-1] > best_stop:
                best_stop, since_best = stop_vals[-1], 0
            else:
                since_best += 1
            if patience is not None and since_best >= patience:
                stopped = len(walked) < len(values)
                break
        i += len(batch)

    best = int(np.argmax(sel_vals))  # the first maximum
    is_mapping = isinstance(metrics[0], Mapping)
    return AlphaSearch(
        alpha=walked[best],
        score=sel_vals[best],
        alphas=tuple(walked),
        scores=tuple(sel_vals),
        grid=values,
        best_index=best,
        stopped_early=stopped,
        metrics=tuple({k: float(v) for k, v in m.items()} for m in metrics) if is_mapping else None,
    )


def search_alpha(
    evaluate: Callable[[PyTree], Score],
    pretrained: PyTree,
    delta: PyTree,
    grid: Sequence[float],
    *,
    patience: int | None = 3,
    stop_on: str | None = None,
    select_by: str | None = None,
) -> AlphaSearch:
    """Chooses ``alpha`` for ``pretrained + alpha * delta`` on validation data (the authors' protocol).

    Walks ``grid`` in increasing order, scoring
    ``evaluate(pact_jax.apply_delta(pretrained, delta, alpha))``; stops after
    ``patience`` consecutive points whose ``stop_on`` score is not strictly
    better than the best so far; returns the walked point with the best
    ``select_by`` score (the first on ties).

    Args:
      evaluate: the validation metric of a parameter tree, higher is better:
        a float, or a mapping of named floats (e.g. ``{"mean": ..., "normalized": ...}``).
      pretrained: ``W0``.
      delta: the merged delta, ``merge.delta(pretrained, finetuned)``.
      grid: strictly increasing alphas, e.g. :func:`alpha_grid`.
      patience: consecutive non-improving points before stopping (the
        authors: 3); ``None`` walks the whole grid.
      stop_on: for a mapping metric, the entry that drives early stopping (the
        authors: validation average accuracy).
      select_by: for a mapping metric, the entry that picks the best (the
        authors: validation normalized accuracy); default ``stop_on``.

    Returns:
      :class:`AlphaSearch`: the best alpha and score, the curve walked, and
      whether the best is at an end of ``grid`` (``at_high_end``: widen it).

    Raises:
      ValueError: an empty or not strictly increasing grid, ``patience < 1``,
        a NaN score, or ``stop_on`` / ``select_by`` not matching the metric.
    """
    return search_curve(
        lambda alphas: [evaluate(apply_delta(pretrained, delta, a)) for a in alphas],
        grid,
        patience=patience,
        stop_on=stop_on,
        select_by=select_by,
    )
