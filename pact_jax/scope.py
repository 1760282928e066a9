"""Which matrices PACT and SIFT filter: the authors' rule, as keywords.

The authors filter every exactly-2-D weight except names containing
``text_projection``, optionally only those whose names contain one of some
include patterns and none of some exclude patterns (include first), and then
only the first ``pact_layer_ratio`` fraction of them in model order. Every
other leaf passes through unchanged (the merger still merges it).

Here patterns are regular expressions (:func:`re.search` on ``/``-joined
paths, so a plain name is a substring match), the candidate leaves are the
matrix views of :class:`pact_jax.LeafRules` (``only_2d=True``: the release's
exactly-2-D rule), and *model order* is the natural order of the paths
(numbers compared as numbers: ``block_2`` before ``block_10``), since Flax
parameter dicts carry no definition order.

A ``layer_ratio`` below 1 depends on the whole model, so a merge that runs
group of leaves by group (streaming, ``budget_bytes``) must resolve it first
with :func:`select_matrices` over every leaf and pass ``paths=``; the CLI does.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pact_jax.tree import (
    LeafRules,
    PactInputError,
    PyTree,
    check_finite,
    check_floating,
    check_same_structure,
    leaves_with_paths,
    validate_stacked,
)

DEFAULT_EXCLUDE: tuple[str, ...] = ("text_projection",)

Patterns = str | Sequence[str] | None


def patterns(value: Patterns, name: str) -> tuple[str, ...]:
    """``value`` as a tuple of regular expressions; ``ValueError`` naming ``name`` (a keyword or a flag)
    when one is not a string or does not compile."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    for p in items:
        if not isinstance(p, str):
            raise ValueError(f"{name} must be a regular expression or a list of them, got {p!r}.")
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{name} {p!r} is not a regular expression: {e}") from e
    return items


def natural_key(path: str) -> list[Any]:
    """Sort key of a path with numbers compared as numbers (``layers_2`` < ``layers_10``)."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path)]


def check_scope(include: Patterns, exclude: Patterns, layer_ratio: float) -> None:
    patterns(include, "include")
    patterns(exclude, "exclude")
    if isinstance(layer_ratio, bool) or not isinstance(layer_ratio, (int, float)) or not 0 <= layer_ratio <= 1:
        raise ValueError(f"layer_ratio must lie in [0, 1], got {layer_ratio!r}.")


def select_matrices(
    shapes: Mapping[str, Sequence[int]],
    rules: LeafRules,
    *,
    only_2d: bool = False,
    include: Patterns = None,
    exclude: Patterns = DEFAULT_EXCLUDE,
    layer_ratio: float = 1.0,
) -> tuple[str, ...]:
    """The paths PACT / SIFT filter, in model order.

    Args:
      shapes: every leaf's path -> per-model shape (without a task axis).
      rules: candidates are the leaves ``rules.kind`` calls ``'matrix'``.
      only_2d: only leaves that are exactly 2-D (the release's rule; a Flax
        DenseGeneral ``(d, heads, head_dim)`` or a conv kernel is then skipped).
      include: keep only paths matching one of these patterns.
      exclude: drop paths matching one of these (default: ``text_projection``).
      layer_ratio: keep the first ``round(layer_ratio * n)`` of the ``n``
        remaining matrices in model order (the authors' ``pact_layer_ratio``).
    """
    check_scope(include, exclude, layer_ratio)
    inc, exc = patterns(include, "include"), patterns(exclude, "exclude")
    paths = [
        p for p, s in shapes.items()
        if rules.kind(p, tuple(s)) == "matrix" and (not only_2d or len(s) == 2)
    ]
    if inc:
        paths = [p for p in paths if any(re.search(q, p) for q in inc)]
    paths = [p for p in paths if not any(re.search(q, p) for q in exc)]
    paths.sort(key=natural_key)
    cutoff = max(0, min(len(paths), int(round(len(paths) * layer_ratio))))
    return tuple(paths[:cutoff])


def resolve_paths(
    shapes: Mapping[str, Sequence[int]],
    rules: LeafRules,
    *,
    paths: Collection[str] | None,
    only_2d: bool,
    include: Patterns,
    exclude: Patterns,
    layer_ratio: float,
) -> frozenset[str]:
    """``paths`` if given (only those of ``shapes`` count), else :func:`select_matrices`."""
    if paths is not None:
        if isinstance(paths, str):
            raise ValueError("paths must be a collection of leaf paths, not one string.")
        return frozenset(paths)
    return frozenset(select_matrices(shapes, rules, only_2d=only_2d, include=include, exclude=exclude,
                                     layer_ratio=layer_ratio))


def matrix_leaves(
    pretrained: PyTree,
    stacked: PyTree,
    rules: LeafRules,
    select: Any,
    *,
    flat: bool = False,
) -> tuple[list[tuple[str, Any]], list[tuple[int, str, jax.Array, jax.Array]]]:
    """Validates ``pretrained`` and ``stacked`` and returns ``(items, chosen)``.

    ``items``: ``stacked``'s ``[(path, leaf)]``; ``chosen``: ``[(index, path,
    w0 (m, n), tau (T, m, n))]`` for the matrix leaves in ``select(shapes)``
    (a callable of ``{path: shape}`` returning the chosen paths), in matrix
    view; ``flat=True``: every chosen leaf, as ``w0 (N,)``, ``tau (T, N)``.
    """
    check_floating(pretrained, "pretrained")
    check_finite(pretrained, "pretrained")
    check_same_structure(pretrained, stacked, "pretrained", "stacked task vectors")
    t = validate_stacked(stacked)
    items = leaves_with_paths(stacked)
    w0s = [leaf for _, leaf in leaves_with_paths(pretrained)]
    for (path, tau), w0 in zip(items, w0s):
        if tau.shape[1:] != jnp.shape(w0):
            raise PactInputError(
                f"leaf '{path}': task vectors have shape {tau.shape} but pretrained has {jnp.shape(w0)}; "
                "expected (T, *pretrained.shape)."
            )
    chosen = select({path: tuple(jnp.shape(w0)) for (path, _), w0 in zip(items, w0s)})
    matrices = []
    for i, ((path, tau), w0) in enumerate(zip(items, w0s)):
        if flat and path in chosen:
            matrices.append((i, path, jnp.asarray(w0).reshape(-1), tau.reshape(t, -1)))
        elif path in chosen and rules.kind(path, jnp.shape(w0)) == "matrix":
            m, n = rules.matrix_shape(path, jnp.shape(w0))
            matrices.append((i, path, jnp.asarray(w0).reshape(m, n), tau.reshape(t, m, n)))
    return items, matrices
