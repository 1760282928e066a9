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


def batched_kernel(kernel: Kernel, static: tuple[tuple[str, Hashable], ...]) -> Callable[..., Any]:
    """``jax.jit(jax.vmap(kernel))`` with ``static`` keyword arguments bound.

    Cached on ``(kernel, static)``: pass module-level kernels so that repeated
    merges reuse compilations.
    """
    cache_key = (kernel, static)
    if cache_key not in _BATCHED:
        _BATCHED[cache_key] = jax.jit(jax.vmap(functools.partial(kernel, **dict(static))))
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
        for j, i in enumerate(members):
            results[i] = jax.tree_util.tree_map(lambda o, j=j: o[j], out)
    return results
