"""Composition of transforms and a merger into one pure merge function (optax-style).

Each step is a plain function; :func:`chain` calls it with those of the
arguments ``key``, ``pretrained``, ``stacked`` and ``rules`` that its
signature names. Bind hyperparameters with :func:`functools.partial`::

    merge = pact_jax.chain(
        functools.partial(pact_jax.pact, task_rank=0.05),
        functools.partial(pact_jax.merges.ties, density=0.2),
        alpha=0.4,
    )
    params = jax.jit(merge)(pretrained, [ft_a, ft_b], key=jax.random.key(0))
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence

import jax

from pact_jax.tree import LeafRules, PyTree, apply_delta, task_vectors

_ARGS = ("key", "pretrained", "stacked", "rules")


@dataclasses.dataclass(frozen=True)
class _Step:
    fn: Callable[..., PyTree]
    name: str
    takes: frozenset[str]
    needs_key: bool


def _step(fn: Callable[..., PyTree]) -> _Step:
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", repr(fn))
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        raise TypeError(f"chain step {name}: cannot read its signature ({e}).") from e
    if "stacked" not in params:
        raise TypeError(
            f"chain step {name} takes no 'stacked' argument; steps are functions of "
            f"{_ARGS} such as pact_jax.pact or pact_jax.merges.tsv."
        )
    takes = frozenset(a for a in _ARGS if a in params)
    needs_key = "key" in params and params["key"].default is inspect.Parameter.empty
    return _Step(fn, name, takes, needs_key)


def chain(
    *steps: Callable[..., PyTree],
    alpha: float = 1.0,
    rules: LeafRules | None = None,
) -> Callable[..., PyTree]:
    """Composes transforms and a final merger into ``merge(pretrained, finetuned) -> params``.

    ``merge(pretrained, finetuned, *, key=None, alpha=alpha)`` computes
    ``tau = task_vectors(pretrained, finetuned)``, runs each transform
    ``tau <- step(...)``, then ``delta = merger(...)`` and returns
    ``apply_delta(pretrained, delta, alpha)``. It is pure and jit-able (with
    ``key`` as an argument). ``merge.delta(pretrained, finetuned, *, key=None)``
    returns ``delta`` alone, for sweeping ``alpha`` without recomputing it.

    Args:
      *steps: zero or more transforms ``(stacked -> stacked)`` followed by one
        merger ``(stacked -> delta)``.
      alpha: default scaling of the merged delta.
      rules: if given, passed as ``rules=`` to every step that takes it
        (overriding a value bound with ``functools.partial``).

    Step ``i`` that takes a ``key`` receives ``jax.random.split(key, n)[i]``;
    a step whose ``key`` has no default makes ``key`` required.
    """
    if not steps:
        raise TypeError("chain needs at least a merger, e.g. chain(pact_jax.merges.task_arithmetic).")
    described = [_step(s) for s in steps]
    key_names = [s.name for s in described if s.needs_key]

    def run(step: _Step, pretrained: PyTree, stacked: PyTree, key: jax.Array | None) -> PyTree:
        kwargs = {"stacked": stacked}
        if "pretrained" in step.takes:
            kwargs["pretrained"] = pretrained
        if "key" in step.takes and key is not None:
            kwargs["key"] = key
        if "rules" in step.takes and rules is not None:
            kwargs["rules"] = rules
        return step.fn(**kwargs)

    def delta(pretrained: PyTree, finetuned: Sequence[PyTree], *, key: jax.Array | None = None) -> PyTree:
        if key is None and key_names:
            raise ValueError(f"steps {key_names} need a PRNG key: call merge(..., key=jax.random.key(0)).")
        keys = [None] * len(described) if key is None else list(jax.random.split(key, len(described)))
        stacked = task_vectors(pretrained, finetuned)
        for step, k in zip(described[:-1], keys[:-1]):
            stacked = run(step, pretrained, stacked, k)
        return run(described[-1], pretrained, stacked, keys[-1])

    def merge(
        pretrained: PyTree,
        finetuned: Sequence[PyTree],
        *,
        key: jax.Array | None = None,
        alpha: float | jax.Array = alpha,
    ) -> PyTree:
        return apply_delta(pretrained, delta(pretrained, finetuned, key=key), alpha)

    merge.delta = delta  # type: ignore[attr-defined]
    merge.__doc__ = f"Merge with chain({', '.join(s.name for s in described)}), alpha={alpha}."
    return merge
