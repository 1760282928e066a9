"""Shape buckets: one jitted, vmapped kernel call per distinct leaf shape.

A merge touches hundreds of leaves but only a handful of distinct shapes (a
ViT-B has four matrix shapes). Leaves whose kernel arguments have equal shapes,
dtypes and static hyperparameters are stacked on a new leading axis and handed
to ``jax.jit(jax.vmap(kernel))`` once, so each shape compiles once and the
per-layer work runs inside XLA instead of a Python loop of SVDs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Kernel = Callable[..., Any]


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
        out = batched_kernel(kernel, static_items)(*stacked_args)
        for j, i in enumerate(members):
            results[i] = jax.tree_util.tree_map(lambda o, j=j: o[j], out)
    return results
