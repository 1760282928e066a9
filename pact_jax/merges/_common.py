"""What every merger shares: the traversal of a stacked pytree and the argument checks.

:func:`_merge_by_kind` walks the leaves of the task vectors ``(T, ...)``,
applies ``rules`` (frozen leaves -> 0, averaged leaves -> the (weighted) task
mean) and sends the rest, bucketed by shape (:mod:`pact_jax.buckets`), to a
method's kernel. The checks turn user arguments (per-task weights, fractions,
flags, the entry-wise ``convention``) into the static values the kernels are
compiled for, or raise a ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from pact_jax import buckets
from pact_jax.tree import (
    LeafRules,
    PyTree,
    check_fraction,
    leaf_key,
    leaves_with_paths,
    validate_stacked,
)


def _merge_by_kind(
    stacked: PyTree,
    rules: LeafRules,
    kernel: Callable[..., jax.Array],
    *,
    view: str,
    static: dict[str, Any] | None = None,
    static_for: Callable[[str], dict[str, Any]] | None = None,
    non_matrix: Callable[[jax.Array], jax.Array] = lambda x: x.mean(0),
    key: jax.Array | None = None,
    mean: Callable[[jax.Array], jax.Array] = lambda x: x.mean(0),
    check_tasks: Callable[[int], None] | None = None,
) -> PyTree:
    """Shared traversal of the mergers.

    ``view='matrix'``: matrix leaves go to ``kernel(tau (T, m, n)) -> (m, n)``
    (``kernel(tau, leaf_key)`` when ``key`` is given: ``key`` folded with the
    leaf's path), other leaves to ``non_matrix``. ``view='flat'``: every non-frozen,
    non-averaged leaf goes to ``kernel(tau (T, N)) -> (N,)``.
    ``static`` holds the kernel's hyperparameters (static under jit); anything
    derived from the shape is computed inside the kernel, so each kernel
    compiles once per distinct shape. ``static_for(path)`` adds per-leaf static
    hyperparameters to a matrix leaf's job (e.g. which side of its matrix view
    is the layer's output); buckets key on them, so leaves that differ only
    there compile separately. ``mean`` merges the leaves that ``rules.average``
    names (a weighted mean for weighted mergers); ``check_tasks(T)`` checks
    per-task hyperparameters against the number of tasks.
    """
    t = validate_stacked(stacked)
    if check_tasks is not None:
        check_tasks(t)
    items = leaves_with_paths(stacked)
    treedef = jax.tree_util.tree_structure(stacked)
    out: list[Any] = [None] * len(items)
    jobs, job_index = [], []
    for i, (path, leaf) in enumerate(items):
        shape = leaf.shape[1:]
        kind = rules.kind(path, shape)
        if kind == "freeze":
            out[i] = jnp.zeros(shape, leaf.dtype)
        elif kind == "average":
            out[i] = mean(leaf)
        elif view == "matrix" and kind == "matrix":
            x = leaf.reshape(t, *rules.matrix_shape(path, shape))
            job_static = dict(static or {})
            if static_for is not None:
                job_static.update(static_for(path))
            jobs.append(((x,) if key is None else (x, leaf_key(key, path)), job_static))
            job_index.append(i)
        elif view == "flat":
            x = leaf.reshape(t, -1)
            jobs.append(((x,), static or {}))
            job_index.append(i)
        else:
            out[i] = non_matrix(leaf)
    for i, res in zip(job_index, buckets.run_bucketed(kernel, jobs)):
        out[i] = res.reshape(items[i][1].shape[1:])
    return jax.tree_util.tree_unflatten(treedef, out)


def _elementwise(
    stacked: PyTree,
    rules: LeafRules,
    fn: Callable[[jax.Array], jax.Array],
    weights: tuple[float, ...] | None = None,
) -> PyTree:
    """``fn(tau (T, ...)) -> (...)`` on every leaf, with the freeze/average rules."""
    return _merge_by_kind(
        stacked, rules, None, view="none", non_matrix=fn, mean=_weighted_mean(weights), check_tasks=_check_len(weights)
    )


# --------------------------------------------------------------------------
# Argument checks

# How the entry-wise mergers break the choices that the papers leave open (docs/mergekit.md):
# 'pact_jax' (the default) or 'mergekit' (mergekit 0.1.5's rules, read from its source).
Convention = Literal["pact_jax", "mergekit"]
CONVENTIONS: tuple[str, ...] = ("pact_jax", "mergekit")


def _check_convention(convention: Any) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}.")
    return convention


def _check_weights(weights: Any) -> tuple[float, ...] | None:
    """Per-task weights as a tuple of finite floats (static: they select the compiled kernel)."""
    if weights is None:
        return None
    if isinstance(weights, (str, bytes, dict)) or not hasattr(weights, "__len__") or np.ndim(weights) != 1:
        raise ValueError(f"weights must be a sequence of numbers, one per task, got {weights!r}.")
    out = []
    for w in weights:
        if isinstance(w, (bool, str, bytes)) or not isinstance(w, (int, float, np.number, np.ndarray, jax.Array)):
            raise ValueError(f"weights must be numbers, got {w!r} in {list(weights)!r}.")
        out.append(float(w))
    if not out or not all(math.isfinite(w) for w in out):
        raise ValueError(f"weights must be one finite number per task, got {list(weights)!r}.")
    return tuple(out)


def _check_len(values: tuple[float, ...] | float | None, name: str = "weights") -> Callable[[int], None] | None:
    """A check that a per-task tuple has one entry per task (None for a scalar or no value)."""
    if not isinstance(values, tuple):
        return None

    def check(t: int) -> None:
        if len(values) != t:
            raise ValueError(f"{name} has {len(values)} entries, but there are {t} task vectors: give one per task.")

    return check


def _per_task_fraction(value: Any, name: str, *, allow_zero: bool = False) -> float | tuple[float, ...]:
    """A fraction, or one fraction per task (a tuple; equal values collapse to one float)."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        return check_fraction(value, name, allow_zero=allow_zero)
    values = tuple(check_fraction(v, f"{name} (per task)", allow_zero=allow_zero) for v in value)
    if not values:
        raise ValueError(f"{name} must be a number or one number per task, got {value!r}.")
    return values[0] if len(set(values)) == 1 else values


def _all_checks(*checks: Callable[[int], None] | None) -> Callable[[int], None] | None:
    present = [c for c in checks if c is not None]
    if not present:
        return None

    def check(t: int) -> None:
        for c in present:
            c(t)

    return check


def _weighted_sum(x: jax.Array, weights: tuple[float, ...] | None) -> jax.Array:
    """``sum_t w_t x_t`` over the task axis of ``x (T, ...)``; ``sum_t x_t`` for no weights."""
    if weights is None:
        return x.sum(0)
    return jnp.tensordot(jnp.asarray(weights, x.dtype), x, axes=1)


def _weight_total(weights: tuple[float, ...], what: str) -> float:
    total = math.fsum(weights)
    if abs(total) < 1e-8:
        raise ValueError(f"{what}: the weights {list(weights)} sum to 0, so their normalised sum is undefined.")
    return total


def _weighted_mean(weights: tuple[float, ...] | None) -> Callable[[jax.Array], jax.Array]:
    """The merge of the leaves ``rules.average`` names: the (weighted) task mean."""
    if weights is None:
        return lambda x: x.mean(0)

    def mean(x: jax.Array) -> jax.Array:
        return _weighted_sum(x, weights) / _weight_total(weights, "the weighted mean of an averaged leaf")

    return mean


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value
