"""Shape buckets: one jitted, vmapped kernel call per distinct leaf shape.

A merge touches hundreds of leaves but only a handful of distinct shapes (a
ViT-B has four matrix shapes). Leaves whose kernel arguments have equal shapes,
dtypes and static hyperparameters are stacked on a new leading axis and handed
to ``jax.jit(jax.vmap(kernel))`` once, so each shape compiles once and the
per-layer work runs inside XLA instead of a Python loop of SVDs.

Under :func:`placement` (used by :mod:`pact_jax.sharding` inside ``jax.jit``)
every stacked argument and output passes through a placement function, e.g.
``jax.lax.with_sharding_constraint`` to spread a bucket's layers over devices.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pact_jax import linalg

# Peak bytes of merging a group of leaves / bytes of its float32 stacked task
# vectors (the fine-tuned leaves as read, the task vectors, the transform's
# output, the SVD workspace). Sampled RSS, T=8, 16 leaves of 128x128, after a
# warm-up: PACT(scalar) + TIES 3.6, PACT(subspace) + TSV 4.7.
WORKING_SET_FACTOR = 5.0

Kernel = Callable[..., Any]
Placement = Callable[[Any, bool], Any]

# Set by `placement`; read by `run_bucketed` at trace time.
_PLACEMENT: contextvars.ContextVar[Placement | None] = contextvars.ContextVar(
    "pact_jax_bucket_placement", default=None
)

TASK_ARG = "tau"
"""By convention, a kernel parameter with this name is a per-leaf task-vector
array ``(T, ...)``; its stack is ``(L, T, ...)`` (see :func:`placement`)."""


@contextlib.contextmanager
def placement(place: Placement) -> Iterator[None]:
    """While active, :func:`run_bucketed` passes each stacked argument and each
    output leaf ``x (L, ...)`` (``L`` = leaves in the bucket) through
    ``place(x, has_task_axis)``, where ``has_task_axis`` says ``x`` is
    ``(L, T, ...)`` (a kernel argument named :data:`TASK_ARG`).

    Meant for sharding constraints, so enter it *inside* the traced function
    (``jax.jit`` caches traces and does not see this context). See
    :func:`pact_jax.sharding.bucket_sharding`.
    """
    token = _PLACEMENT.set(place)
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


def _task_arg_flags(kernel: Kernel, n: int) -> list[bool]:
    params = list(inspect.signature(kernel).parameters)[:n]
    return [name == TASK_ARG for name in params] + [False] * (n - len(params))


# One jitted function per (kernel, static hyperparameters); its own jit cache
# then holds one executable per distinct bucket shape.
_BATCHED: dict[tuple[Kernel, tuple], Callable[..., Any]] = {}


def batched_kernel(kernel: Kernel, static: tuple[tuple[str, Hashable], ...], robust: bool = False) -> Callable[..., Any]:
    """``jax.jit(jax.vmap(kernel))`` with ``static`` keyword arguments bound.

    Cached on ``(kernel, static, robust)``: pass module-level kernels so that
    repeated merges reuse compilations. ``robust``: traced under
    :func:`pact_jax.linalg.robust_svd` (LAPACK's slower, convergent SVD).
    """
    cache_key = (kernel, static) if not robust else (kernel, static + (("__robust_svd", True),))
    if cache_key not in _BATCHED:
        vk = jax.vmap(functools.partial(kernel, **dict(static)))
        if robust:
            def traced_robust(*args: Any) -> Any:
                with linalg.robust_svd():  # read while jit traces this function
                    return vk(*args)

            _BATCHED[cache_key] = jax.jit(traced_robust)
        else:
            _BATCHED[cache_key] = jax.jit(vk)
    return _BATCHED[cache_key]


def compile_count(kernel: Kernel) -> int:
    """How many executables ``kernel`` has been compiled into so far, over all
    hyperparameters: one per distinct bucket shape (and argument dtypes)."""
    return sum(fn._cache_size() for (k, _), fn in _BATCHED.items() if k is kernel)


def _signature(args: Sequence[Any]) -> tuple:
    return tuple(None if a is None else (tuple(jnp.shape(a)), jnp.result_type(a)) for a in args)


def _stack(xs: Sequence[Any]) -> Any:
    return None if xs[0] is None else jnp.stack(xs)


def run_bucketed(
    kernel: Kernel,
    jobs: Sequence[tuple[Sequence[Any], Mapping[str, Hashable]]],
) -> list[Any]:
    """Runs ``kernel(*args, **static)`` for every job, bucketed by shape.

    Args:
      kernel: a function of one leaf's arrays (``None`` allowed for an absent
        optional argument) returning a pytree of arrays.
      jobs: ``[(args, static), ...]`` one per leaf.

    Returns:
      The kernel's outputs, in the order of ``jobs``.
    """
    buckets: dict[tuple, list[int]] = {}
    for i, (args, static) in enumerate(jobs):
        sig = (_signature(args), tuple(sorted(static.items())))
        buckets.setdefault(sig, []).append(i)
    results: list[Any] = [None] * len(jobs)
    for (_, static_items), members in buckets.items():
        columns = zip(*(jobs[i][0] for i in members))
        stacked_args = [_stack(list(col)) for col in columns]
        place = _PLACEMENT.get()
        if place is not None:
            flags = _task_arg_flags(kernel, len(stacked_args))
            stacked_args = [None if a is None else place(a, f) for a, f in zip(stacked_args, flags)]
        out = batched_kernel(kernel, static_items)(*stacked_args)
        if place is not None:
            out = jax.tree_util.tree_map(lambda o: place(o, False), out)
        else:
            out = _retry_non_finite(kernel, static_items, stacked_args, out)
        for j, i in enumerate(members):
            results[i] = jax.tree_util.tree_map(lambda o, j=j: o[j], out)
    return results


def _finite_rows(tree: Any, n: int) -> np.ndarray | None:
    """``(n,)`` whether every float entry of row ``i`` of each array of ``tree`` is finite
    (``None`` under tracing, where values are unknown)."""
    ok = np.ones(n, bool)
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            return None
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and jnp.size(leaf):
            ok &= np.asarray(jnp.isfinite(jnp.reshape(leaf, (n, -1))).all(axis=1))
    return ok


def _retry_non_finite(kernel: Kernel, static_items: tuple, args: Sequence[Any], out: Any) -> Any:
    """Recomputes, under :func:`pact_jax.linalg.robust_svd`, the rows of a bucket whose inputs are
    finite but whose output is not: LAPACK's divide-and-conquer SVD can return NaN silently on
    rank-deficient input. Eager calls only: under an outer ``jax.jit`` values are unknown here."""
    n = len(jax.tree_util.tree_leaves(out)[0])
    out_ok = _finite_rows(out, n)
    if out_ok is None or out_ok.all():
        return out
    in_ok = _finite_rows([a for a in args if a is not None], n)
    redo = np.flatnonzero(~out_ok & in_ok) if in_ok is not None else np.array([], int)
    if not len(redo):
        return out
    sub = [None if a is None else a[redo] for a in args]
    fixed = batched_kernel(kernel, static_items, robust=True)(*sub)
    return jax.tree_util.tree_map(lambda o, f: o.at[redo].set(f), out, fixed)


# --------------------------------------------------------------------------
# Groups of leaves within a memory budget (streaming merges, chain(budget_bytes=))


def _is_float(s: Any) -> bool:
    return bool(jnp.issubdtype(s.dtype, jnp.floating))


def working_set_bytes(meta: Mapping[str, Any], paths: Sequence[str], num_tasks: int) -> int:
    """Estimated peak bytes of merging the leaves ``paths`` of ``meta`` (path ->
    anything with ``.shape``) for ``num_tasks`` tasks: :data:`WORKING_SET_FACTOR`
    times their float32 stacked task vectors."""
    elems = sum(int(np.prod(meta[p].shape)) for p in paths)
    return int(WORKING_SET_FACTOR * num_tasks * elems * 4)


def plan_groups(
    meta: Mapping[str, Any],
    num_tasks: int,
    budget_bytes: int | None,
) -> list[list[str]]:
    """Groups of float leaf paths, each merged in one go.

    ``meta`` maps leaf paths to anything with ``.shape`` and ``.dtype``
    (``jax.ShapeDtypeStruct``, arrays). Leaves are bucketed by shape (so a
    group feeds whole vmapped buckets to the kernels). Without a budget there
    is one group. With one, a bucket too large for the budget is split into
    near-equal chunks, and small buckets are packed together first-fit, each
    group's :func:`working_set_bytes` within ``budget_bytes`` unless a single
    leaf alone exceeds it.
    """
    floats = [p for p, s in meta.items() if _is_float(s)]
    if budget_bytes is None:
        return [floats] if floats else []
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}.")
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for p in floats:
        by_shape.setdefault(tuple(meta[p].shape), []).append(p)
    chunks: list[list[str]] = []
    for paths in by_shape.values():
        per_leaf = working_set_bytes(meta, paths[:1], num_tasks)
        fit = max(1, budget_bytes // max(per_leaf, 1))
        n_chunks = -(-len(paths) // fit)
        # Near-equal chunks: at most two batch sizes per shape to compile.
        chunks.extend(list(c) for c in np.array_split(np.asarray(paths, dtype=object), n_chunks))
    groups: list[list[str]] = []
    loads: list[int] = []
    for chunk in sorted(chunks, key=lambda c: -working_set_bytes(meta, c, num_tasks)):
        cost = working_set_bytes(meta, chunk, num_tasks)
        for i, load in enumerate(loads):
            if load + cost <= budget_bytes:
                groups[i].extend(chunk)
                loads[i] += cost
                break
        else:
            groups.append(list(chunk))
            loads.append(cost)
    return groups
