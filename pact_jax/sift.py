"""SIFT, the PACT authors' ablation baseline (DESIGN.md §1a step 8).

Every chosen matrix's task vectors lose their whole component in the
pre-trained core: ``tau_t <- tau_t - strength * tau_t V0K V0K^T``, with ``V0K``
the top ``K`` input-side singular vectors of ``W0`` (as in PACT's step 1). It
is PACT with every task protecting the full core, with no task-specific
exemption, and composes in :func:`pact_jax.chain` the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import Any, Literal

import jax

from pact_jax import buckets, linalg, scope, subspace
from pact_jax.pact import _sides, resolve_rank
from pact_jax.tree import DEFAULT_RULES, LeafRules, PyTree, check_fraction, leaf_key

__all__ = ["sift"]


def sift(
    pretrained: PyTree,
    stacked: PyTree,
    *,
    pretrained_rank: int | float = 0.8,
    pretrained_energy: float | None = None,
    side: Literal["input", "output", "left", "right"] = "input",
    strength: float = 1.0,
    core: Literal["pretrained", "axes"] = "pretrained",
    svd: linalg.SvdMethod = "exact",
    key: jax.Array | None = None,
    oversample: int = 0,
    power_iters: int = 2,
    only_2d: bool = False,
    include: scope.Patterns = None,
    exclude: scope.Patterns = scope.DEFAULT_EXCLUDE,
    layer_ratio: float = 1.0,
    paths: Collection[str] | None = None,
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """SIFT: remove each task vector's component in the pre-trained core.

    Per chosen matrix ``W0 (m, n)``, ``tau (T, m, n)`` (torch frame, input
    space = columns): ``tau_t <- tau_t - strength tau_t V0K V0K^T``. Keywords
    as in :func:`pact_jax.pact` (``K``: ``pretrained_rank`` /
    ``pretrained_energy``; ``side``; ``core``; randomized ``svd`` with ``key``;
    which matrices: ``only_2d``, ``include``, ``exclude``, ``layer_ratio``,
    ``paths``). Other leaves are returned unchanged.

    Returns:
      Stacked task vectors of the same structure, shapes and dtypes.
    """
    if side not in ("input", "output", "left", "right"):
        raise ValueError(f"side must be 'input', 'output', 'left' or 'right', got {side!r}.")
    if svd not in ("exact", "randomized"):
        raise ValueError(f"svd must be 'exact' or 'randomized', got {svd!r}.")
    if svd == "randomized" and key is None:
        raise ValueError("sift(svd='randomized') needs a PRNG key: key=jax.random.key(0).")
    if core not in ("pretrained", "axes"):
        raise ValueError(f"core must be 'pretrained' or 'axes', got {core!r}.")
    strength = check_fraction(strength, "strength", allow_zero=True)
    if pretrained_energy is not None:
        pretrained_energy = check_fraction(pretrained_energy, "pretrained_energy")
    if isinstance(include, list) or isinstance(exclude, list):
        include = tuple(include) if isinstance(include, list) else include
        exclude = tuple(exclude) if isinstance(exclude, list) else exclude
    select = functools.partial(scope.resolve_paths, rules=rules, paths=paths, only_2d=only_2d,
                               include=include, exclude=exclude, layer_ratio=layer_ratio)
    items, matrices = scope.matrix_leaves(pretrained, stacked, rules, select)
    jobs = []
    for _, path, w0, tau in matrices:
        m, n = w0.shape
        static: dict[str, Any] = dict(
            side=_sides(side, rules, path)[0],
            pretrained_rank=resolve_rank(pretrained_rank, m, n, "pretrained_rank", path),
            pretrained_energy=pretrained_energy, core=core, svd=svd, oversample=oversample,
            power_iters=power_iters, strength=strength,
        )
        jobs.append(((w0, tau, None if key is None else leaf_key(key, path)), static))
    out = [leaf for _, leaf in items]
    for (i, *_), (new, _) in zip(matrices, buckets.run_bucketed(subspace.sift_kernel, jobs)):
        out[i] = new.reshape(items[i][1].shape).astype(items[i][1].dtype)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(stacked), out)
