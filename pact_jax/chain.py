"""Composition of transforms and a merger into one pure merge function (optax-style).

Each step is a plain function; :func:`chain` calls it with those of the
arguments ``key``, ``pretrained``, ``stacked``, ``rules`` and ``task_spaces``
(given explicit task spaces, e.g. of LoRA adapters: ``merge.from_stacked``)
that its signature names. Bind hyperparameters with :func:`functools.partial`::

    merge = pact_jax.chain(
        pact_jax.pact,
        functools.partial(pact_jax.merges.ties, density=0.2),
        alpha=0.4,
    )
    params = jax.jit(merge)(pretrained, [ft_a, ft_b], key=jax.random.key(0))

With ``budget_bytes`` the chain runs on groups of same-shape leaves in turn
(:func:`pact_jax.buckets.plan_groups`), so only one group's task vectors and
workspace exist at a time; every transform and merger of pact_jax works leaf
by leaf and keys its randomness by leaf path, so the result is the same.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from pact_jax import buckets
from pact_jax.tree import (
    LeafRules,
    PyTree,
    apply_delta,
    check_alpha,
    check_same_leaves,
    check_task_list,
    leaves_with_paths,
    path_str,
    task_vectors,
)

_ARGS = ("key", "pretrained", "stacked", "rules", "task_spaces")


@dataclasses.dataclass(frozen=True)
class _Step:
    fn: Callable[..., PyTree]
    name: str
    takes: frozenset[str]
    needs_key: bool
    bound: frozenset[str] = frozenset()


def _bad_keywords(fn: Callable[..., PyTree]) -> str:
    """For a ``functools.partial`` binding keywords its function does not take: a sentence naming them."""
    func, bound = getattr(fn, "func", None), getattr(fn, "keywords", None)
    if func is None or not bound:
        return ""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return ""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return ""
    unknown = sorted(set(bound) - set(params))
    return f" {func.__name__} takes no keyword {', '.join(map(repr, unknown))}; it takes {sorted(params)}." if unknown else ""


def _step(fn: Callable[..., PyTree]) -> _Step:
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", repr(fn))
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        raise TypeError(f"chain step {name}: cannot read its signature ({e}).{_bad_keywords(fn)}") from e
    if "stacked" not in params:
        raise TypeError(
            f"chain step {name} takes no 'stacked' argument; steps are functions of "
            f"{_ARGS} such as pact_jax.pact or pact_jax.merges.tsv."
        )
    takes = frozenset(a for a in _ARGS if a in params)
    needs_key = "key" in params and params["key"].default is inspect.Parameter.empty
    return _Step(fn, name, takes, needs_key, frozenset(getattr(fn, "keywords", None) or ()))


def chain(
    *steps: Callable[..., PyTree],
    alpha: float = 1.0,
    rules: LeafRules | None = None,
    budget_bytes: int | None = None,
) -> Callable[..., PyTree]:
    """Composes transforms and a final merger into ``merge(pretrained, finetuned) -> params``.

    ``merge(pretrained, finetuned, *, key=None, alpha=alpha)`` computes
    ``tau = task_vectors(pretrained, finetuned)``, runs each transform
    ``tau <- step(...)``, then ``delta = merger(...)`` and returns
    ``apply_delta(pretrained, delta, alpha)``. It is pure and jit-able (with
    ``key`` as an argument). ``merge.delta(pretrained, finetuned, *, key=None)``
    returns ``delta`` alone, for sweeping ``alpha`` without recomputing it.
    ``merge.from_stacked(pretrained, stacked, *, key=None, alpha=alpha,
    task_spaces=None)`` and ``merge.delta_from_stacked(...)`` start from task
    vectors ``stacked`` (leaves ``(T, *W0_leaf.shape)``) instead, e.g. LoRA
    updates ``s B A`` (:mod:`pact_jax.lora`), whose difference to a rounded
    ``W0 + s B A`` would lose precision. ``task_spaces`` ``{path: (T, d_in, k)}``
    goes to every step whose signature names it (PACT: given explicit spaces,
    DESIGN §1a step 9), unless the step bound it with ``functools.partial``
    (``task_spaces=None`` bound: the step ignores what the merge is given).
    Non-float leaves (integer buffers such as ``position_ids``) are not merged:
    the result keeps their pre-trained value (their delta is zero), as the
    CLI does; their shapes and dtypes must agree across the inputs.

    Args:
      *steps: zero or more transforms ``(stacked -> stacked)`` followed by one
        merger ``(stacked -> delta)``.
      alpha: default scaling of the merged delta.
      rules: if given, passed as ``rules=`` to every step that takes it
        (overriding a value bound with ``functools.partial``).
      budget_bytes: if given, run the steps on groups of leaves in turn, each
        group's estimated working set
        (:func:`pact_jax.buckets.working_set_bytes`, about 5x its float32
        stacked task vectors) within this many bytes (a leaf larger than that
        alone). Peak memory then grows with the budget, not the model
        (measured in ``python -m benchmarks.speed``); useful when called
        eagerly (each bucket is its own compiled call), while one
        ``jax.jit`` around the merge leaves buffer reuse to XLA. Needs steps
        that work leaf by leaf, as all of pact_jax's do (a custom step that
        mixes leaves would see one group at a time). ``None``: one group.

    Step ``i`` that takes a ``key`` receives ``jax.random.split(key, n)[i]``;
    a step whose ``key`` has no default makes ``key`` required.
    """
    if not steps:
        raise TypeError("chain needs at least a merger, e.g. chain(pact_jax.merges.task_arithmetic).")
    check_alpha(alpha)
    described = [_step(s) for s in steps]
    key_names = [s.name for s in described if s.needs_key]

    def run(step: _Step, pretrained: PyTree, stacked: PyTree, key: jax.Array | None, spaces=None) -> PyTree:
        kwargs = {"stacked": stacked}
        if spaces is not None and "task_spaces" in step.takes and "task_spaces" not in step.bound:
            kwargs["task_spaces"] = spaces
        if "pretrained" in step.takes:
            kwargs["pretrained"] = pretrained
        if "key" in step.takes and key is not None:
            kwargs["key"] = key
        if "rules" in step.takes and rules is not None:
            kwargs["rules"] = rules
        return step.fn(**kwargs)

    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0):
        raise ValueError(f"budget_bytes must be a positive int (bytes) or None, got {budget_bytes!r}.")

    def run_stacked(pretrained: PyTree, stacked: PyTree, keys: list, spaces=None) -> PyTree:
        for step, k in zip(described[:-1], keys[:-1]):
            stacked = run(step, pretrained, stacked, k, spaces)
        return run(described[-1], pretrained, stacked, keys[-1], spaces)

    def run_steps(pretrained: PyTree, finetuned: Sequence[PyTree], keys: list) -> PyTree:
        return run_stacked(pretrained, task_vectors(pretrained, finetuned), keys)

    def split_key(key: jax.Array | None) -> list:
        if key is None and key_names:
            raise ValueError(f"steps {key_names} need a PRNG key: call merge(..., key=jax.random.key(0)).")
        return [None] * len(described) if key is None else list(jax.random.split(key, len(described)))

    def float_delta(pretrained: PyTree, finetuned: Sequence[PyTree], key: jax.Array | None) -> PyTree:
        keys = split_key(key)
        if budget_bytes is None:
            return run_steps(pretrained, finetuned, keys)
        return _grouped(run_steps, pretrained, finetuned, keys, budget_bytes)

    def delta_from_stacked(pretrained: PyTree, stacked: PyTree, *, key: jax.Array | None = None,
                           task_spaces: Mapping[str, jax.Array] | None = None) -> PyTree:
        keys = split_key(key)
        if budget_bytes is None:
            return run_stacked(pretrained, stacked, keys, task_spaces)
        return _grouped_stacked(run_stacked, pretrained, stacked, keys, task_spaces, budget_bytes)

    def from_stacked(pretrained: PyTree, stacked: PyTree, *, key: jax.Array | None = None,
                     alpha: float | jax.Array = alpha, task_spaces: Mapping[str, jax.Array] | None = None) -> PyTree:
        return apply_delta(pretrained, delta_from_stacked(pretrained, stacked, key=key, task_spaces=task_spaces), alpha)

    def delta(pretrained: PyTree, finetuned: Sequence[PyTree], *, key: jax.Array | None = None) -> PyTree:
        held = _held_paths(pretrained, finetuned)
        if not held:
            return float_delta(pretrained, finetuned, key)
        d = float_delta(_without(pretrained, held), [_without(ft, held) for ft in finetuned], key)
        return jax.tree_util.tree_map(lambda w0, x: jnp.zeros_like(w0) if x is None else x, pretrained, d)

    def merge(
        pretrained: PyTree,
        finetuned: Sequence[PyTree],
        *,
        key: jax.Array | None = None,
        alpha: float | jax.Array = alpha,
    ) -> PyTree:
        held = _held_paths(pretrained, finetuned)
        if not held:
            return apply_delta(pretrained, float_delta(pretrained, finetuned, key), alpha)
        base = _without(pretrained, held)
        out = apply_delta(base, float_delta(base, [_without(ft, held) for ft in finetuned], key), alpha)
        return jax.tree_util.tree_map(lambda w0, x: w0 if x is None else x, pretrained, out)

    merge.delta = delta  # type: ignore[attr-defined]
    merge.from_stacked = from_stacked  # type: ignore[attr-defined]
    merge.delta_from_stacked = delta_from_stacked  # type: ignore[attr-defined]
    merge.alpha, merge.rules = alpha, rules  # type: ignore[attr-defined]  # the defaults, for callers such as merge_adapters
    merge.steps = tuple(s.fn for s in described)  # type: ignore[attr-defined]
    # Whether a step takes the task_spaces a merge is given (callers skip computing them otherwise).
    merge.uses_task_spaces = any("task_spaces" in s.takes and "task_spaces" not in s.bound for s in described)  # type: ignore[attr-defined]
    merge.__doc__ = f"Merge with chain({', '.join(s.name for s in described)}), alpha={alpha}."
    return merge


def _held_paths(pretrained: PyTree, finetuned: Sequence[PyTree]) -> set[str]:
    """Paths of the non-float leaves (integer buffers such as ``position_ids``, step counters): they are
    not merged but kept at the pre-trained value, as the CLI does. Their structure, shapes and dtypes must
    still agree across the inputs (checked here; the float leaves are checked by ``task_vectors``)."""
    held = {p for p, x in leaves_with_paths(pretrained) if not jnp.issubdtype(jnp.result_type(x), jnp.floating)}
    if held and isinstance(finetuned, Sequence) and not isinstance(finetuned, (str, bytes, dict)):
        for i, ft in enumerate(finetuned):
            check_same_leaves(pretrained, ft, "pretrained", f"finetuned[{i}]")
    return held


def _without(tree: PyTree, paths: set[str]) -> PyTree:
    """``tree`` with the leaves at ``paths`` replaced by ``None`` (empty sub-trees: other paths unchanged)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: None if path_str(p) in paths else x, tree)


def _grouped(
    run_steps: Callable[..., PyTree], pretrained: PyTree, finetuned: Sequence[PyTree], keys: list, budget_bytes: int
) -> PyTree:
    """``run_steps`` on sub-trees of the leaves of each group of :func:`buckets.plan_groups`;
    the other leaves are ``None`` (empty sub-trees), so paths, rules and per-leaf keys are unchanged."""
    # Structure, shapes and dtypes over the whole tree first; each group's
    # task_vectors then checks its own values for NaN/Inf (one pass, not two).
    check_task_list(pretrained, finetuned, finite=False)
    items = leaves_with_paths(pretrained)
    groups = buckets.plan_groups(dict(items), len(finetuned), budget_bytes)
    merged: dict[str, object] = {}
    for group in groups:
        members = set(group)

        def sub(tree: PyTree, members=members) -> PyTree:
            return jax.tree_util.tree_map_with_path(lambda p, x: x if path_str(p) in members else None, tree)

        out = run_steps(sub(pretrained), [sub(ft) for ft in finetuned], keys)
        merged.update(leaves_with_paths(out))
        del out
    treedef = jax.tree_util.tree_structure(pretrained)
    return jax.tree_util.tree_unflatten(treedef, [merged[p] for p, _ in items])


def _grouped_stacked(
    run_stacked: Callable[..., PyTree], pretrained: PyTree, stacked: PyTree, keys: list,
    spaces: Mapping[str, jax.Array] | None, budget_bytes: int,
) -> PyTree:
    """:func:`_grouped` for a merge that starts from stacked task vectors."""
    items = leaves_with_paths(pretrained)
    t = {int(jnp.shape(x)[0]) for _, x in leaves_with_paths(stacked)}
    groups = buckets.plan_groups(dict(items), max(t, default=1), budget_bytes)
    merged: dict[str, object] = {}
    for group in groups:
        members = set(group)

        def sub(tree: PyTree, members=members) -> PyTree:
            return jax.tree_util.tree_map_with_path(lambda p, x: x if path_str(p) in members else None, tree)

        part = None if spaces is None else {p: v for p, v in spaces.items() if p in members}
        merged.update(leaves_with_paths(run_stacked(sub(pretrained), sub(stacked), keys, part)))
    treedef = jax.tree_util.tree_structure(pretrained)
    return jax.tree_util.tree_unflatten(treedef, [merged[p] for p, _ in items])
