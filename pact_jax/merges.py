"""Merging methods: functions of stacked task vectors ``(T, ...)``.

A *merger* maps ``stacked -> delta`` (the merged update before ``alpha``; see
:func:`pact_jax.apply_delta`). A *transform* maps ``stacked -> stacked``
(:func:`dare` here, :func:`pact_jax.pact`). Every function takes
``rules: LeafRules``: leaves matched by ``rules.freeze`` get ``delta = 0``,
leaves matched by ``rules.average`` get the task mean, and transforms leave
both untouched.

Non-matrix leaves (biases, norms, and 1-D leaves in general) in the SVD-based
methods (:func:`tsv`, :func:`iso_c`, :func:`iso_cts`) are merged by the task
mean, as in the reference implementations of those papers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pact_jax import buckets, linalg
from pact_jax.tree import (
    DEFAULT_RULES,
    LeafRules,
    PyTree,
    check_fraction,
    leaf_key,
    leaves_with_paths,
    validate_stacked,
)

__all__ = ["average", "task_arithmetic", "ties", "dare", "tsv", "iso_c", "iso_cts"]


def _merge_by_kind(
    stacked: PyTree,
    rules: LeafRules,
    kernel: Callable[..., jax.Array],
    *,
    view: str,
    static: dict[str, Any] | None = None,
    non_matrix: Callable[[jax.Array], jax.Array] = lambda x: x.mean(0),
    key: jax.Array | None = None,
) -> PyTree:
    """Shared traversal of the mergers.

    ``view='matrix'``: matrix leaves go to ``kernel(tau (T, m, n)) -> (m, n)``
    (``kernel(tau, leaf_key)`` when ``key`` is given: ``key`` folded with the
    leaf's path), other leaves to ``non_matrix``. ``view='flat'``: every non-frozen,
    non-averaged leaf goes to ``kernel(tau (T, N)) -> (N,)``.
    ``static`` holds the kernel's hyperparameters (static under jit); anything
    derived from the shape is computed inside the kernel, so each kernel
    compiles once per distinct shape.
    """
    t = validate_stacked(stacked)
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
            out[i] = leaf.mean(0)
        elif view == "matrix" and kind == "matrix":
            x = leaf.reshape(t, *rules.matrix_shape(path, shape))
            jobs.append(((x,) if key is None else (x, leaf_key(key, path)), static or {}))
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


def _elementwise(stacked: PyTree, rules: LeafRules, fn: Callable[[jax.Array], jax.Array]) -> PyTree:
    """``fn(tau (T, ...)) -> (...)`` on every leaf, with the freeze/average rules."""
    return _merge_by_kind(stacked, rules, None, view="none", non_matrix=fn)


# --------------------------------------------------------------------------
# Averaging and Task Arithmetic


def average(stacked: PyTree, *, rules: LeafRules = DEFAULT_RULES) -> PyTree:
    """Weight averaging: ``delta = (1/T) sum_t tau_t`` (with ``alpha = 1``, the mean model)."""
    return _elementwise(stacked, rules, lambda x: x.mean(0))


def task_arithmetic(stacked: PyTree, *, rules: LeafRules = DEFAULT_RULES) -> PyTree:
    """Task Arithmetic (Ilharco et al. 2023): ``delta = sum_t tau_t``."""
    return _elementwise(stacked, rules, lambda x: x.sum(0))


# --------------------------------------------------------------------------
# TIES and DARE


def _ties_kernel(tau: jax.Array, *, density: float) -> jax.Array:
    """TIES on one flattened leaf ``tau (T, N) -> (N,)``.

    1. trim: per task keep the ``k = max(1, round(density * N))`` largest
       ``|tau_t|`` entries (entries equal to the ``k``-th largest magnitude are
       kept too);
    2. elect: ``gamma = sign(sum_t trimmed_t)``;
    3. disjoint mean over the tasks whose trimmed entry is non-zero and has
       sign ``gamma`` (0 where no task agrees).
    """
    keep = max(1, round(density * tau.shape[-1]))
    mag = jnp.abs(tau)
    threshold = linalg.kth_largest(mag, keep)[:, None]
    trimmed = jnp.where(mag >= threshold, tau, 0.0)
    elected = jnp.sign(trimmed.sum(0))
    agree = (jnp.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(0)
    total = jnp.where(agree, trimmed, 0.0).sum(0)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def ties(stacked: PyTree, density: float = 0.2, *, rules: LeafRules = DEFAULT_RULES) -> PyTree:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

    Trimming is per leaf and per task: ``k = max(1, round(density * N))`` of
    the leaf's ``N`` entries survive. Applied to every leaf (matrices, biases,
    norms) except the frozen/averaged ones.

    Args:
      stacked: task vectors, leaves ``(T, ...)``.
      density: fraction of entries kept per task, in ``(0, 1]``.
    """
    density = check_fraction(density, "density")
    return _merge_by_kind(stacked, rules, _ties_kernel, view="flat", static={"density": density})


def dare(
    key: jax.Array, stacked: PyTree, p: float = 0.9, *, rules: LeafRules = DEFAULT_RULES
) -> PyTree:
    """DARE (Yu et al. 2024): drop each entry with probability ``p``, rescale the rest by ``1/(1-p)``.

    A transform ``stacked -> stacked``; follow it with a merger (TA or TIES).
    Each leaf draws its mask from :func:`pact_jax.tree.leaf_key` (``key``
    folded with its path), so the result depends only on ``key`` and paths. ``p = 1`` drops everything.

    Args:
      key: PRNG key.
      stacked: task vectors, leaves ``(T, ...)``.
      p: drop probability in ``(0, 1]``.
    """
    p = check_fraction(p, "p")
    validate_stacked(stacked)
    items = leaves_with_paths(stacked)
    out = [leaf for _, leaf in items]
    jobs, index = [], []
    for i, (path, leaf) in enumerate(items):
        if rules.kind(path, leaf.shape[1:]) not in ("freeze", "average"):
            jobs.append(((leaf, leaf_key(key, path)), {"p": p}))
            index.append(i)
    for i, res in zip(index, buckets.run_bucketed(_dare_kernel, jobs)):
        out[i] = res
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(stacked), out)


def _dare_kernel(tau: jax.Array, key: jax.Array, *, p: float) -> jax.Array:
    """Drop-and-rescale one leaf ``tau (T, ...)``; bucketed so that each
    distinct shape compiles the random bit generator once."""
    keep = jax.random.bernoulli(key, 1.0 - p, tau.shape)
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    return jnp.where(keep, tau * scale, 0.0).astype(tau.dtype)


# --------------------------------------------------------------------------
# SVD-based mergers


def tsv_rank(m: int, n: int, t: int) -> int:
    """Singular triplets kept per task by TSV-M: ``max(1, floor(min(m, n) / T))``."""
    return max(1, min(m, n) // t)


def _tsv_kernel(
    tau: jax.Array,
    key: jax.Array | None = None,
    *,
    svd: linalg.SvdMethod = "exact",
    oversample: int = 10,
    power_iters: int = 2,
) -> jax.Array:
    """TSV-M on one matrix ``tau (T, m, n) -> (m, n)``.

    ``tau_t ~= U_t S_t V_t^T`` (top ``rank = tsv_rank(m, n, T)``, exact or
    randomized SVD); ``U = [U_1 .. U_T]``,
    ``V = [V_1 .. V_T]``, ``S = diag(S_1 .. S_T)``;
    ``delta = polar(U) S polar(V)^T``. Triplets with ``s`` at rounding level
    (:func:`pact_jax.linalg.significant`, scale ``max_t s_t,1``) are dropped.
    """
    t, m, n = tau.shape
    rank = tsv_rank(m, n, t)
    u, s, vh = linalg.truncated_svd(
        tau, rank, method=svd, key=key, oversample=oversample, power_iters=power_iters
    )
    keep = linalg.significant(s, s.max(), max(m, n)).astype(u.dtype)  # (T, rank)
    u, vh = u * keep[:, None, :], vh * keep[:, :, None]
    u_cat = jnp.moveaxis(u, 0, 1).reshape(m, t * rank)
    v_cat = jnp.moveaxis(jnp.swapaxes(vh, 1, 2), 0, 1).reshape(n, t * rank)
    s_cat = s.reshape(t * rank)
    return (linalg.polar(u_cat) * s_cat) @ linalg.polar(v_cat).T


def tsv(
    stacked: PyTree,
    *,
    svd: linalg.SvdMethod = "exact",
    key: jax.Array | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025).

    Per matrix leaf ``(T, m, n)``: the top ``k = floor(min(m, n)/T)`` singular
    triplets of each task vector, concatenated and decorrelated by the
    orthogonal polar factor: ``delta = polar(U) diag(S) polar(V)^T``.
    Non-matrix leaves: task mean.

    Args:
      svd: ``'exact'`` or ``'randomized'`` (only the top ``k`` triplets are
        needed, so a sketch of ``k + oversample`` columns suffices; see
        :func:`pact_jax.linalg.randomized_svd`).
      key: PRNG key, required for ``svd='randomized'``; each leaf uses
        :func:`pact_jax.tree.leaf_key`.
      oversample, power_iters: randomized SVD knobs.
    """
    if svd not in ("exact", "randomized"):
        raise ValueError(f"svd must be 'exact' or 'randomized', got {svd!r}.")
    if svd == "randomized" and key is None:
        raise ValueError("tsv(svd='randomized') needs a PRNG key: key=jax.random.key(0).")
    static = {"svd": svd, "oversample": oversample, "power_iters": power_iters}
    return _merge_by_kind(
        stacked, rules, _tsv_kernel, view="matrix", static=static, key=key if svd == "randomized" else None
    )


def _iso_c_kernel(tau: jax.Array) -> jax.Array:
    """Iso-C on one matrix: ``sum_t tau_t = U S V^T -> mean(S) U V^T``.

    Over the significant triplets only (:func:`pact_jax.linalg.significant`):
    for a rank-deficient sum the null-space singular vectors are arbitrary.
    """
    _, m, n = tau.shape
    u, s, vh = linalg.exact_svd(tau.sum(0))
    keep = linalg.significant(s, s[0], max(m, n)).astype(u.dtype)
    return _masked_mean(s, keep) * ((u * keep) @ vh)


def _masked_mean(s: jax.Array, keep: jax.Array) -> jax.Array:
    """Mean of ``s`` over ``keep`` (0/1 weights); 0 when nothing is kept."""
    return (s * keep).sum() / jnp.maximum(keep.sum(), 1.0)


def iso_c(stacked: PyTree, *, rules: LeafRules = DEFAULT_RULES) -> PyTree:
    """Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025).

    Per matrix leaf: SVD of the task sum, every singular value replaced by
    their mean: ``delta = mean(S) U V^T``. Non-matrix leaves: task mean.
    """
    return _merge_by_kind(stacked, rules, _iso_c_kernel, view="matrix")


def iso_cts_split(m: int, n: int, t: int, common_fraction: float) -> tuple[int, int]:
    """``(k, s)``: common-subspace size and directions per task of Iso-CTS.

    ``r = min(m, n)``; the task-specific part ``r - floor(r * f)`` is rounded
    to a multiple of ``T`` so each task gets ``s`` directions and ``k = r - T s``.
    """
    r = min(m, n)
    specific = round((r - int(r * common_fraction)) / t) * t
    specific = min(specific, (r // t) * t)
    return r - specific, specific // t


def _iso_cts_kernel(tau: jax.Array, *, common_fraction: float) -> jax.Array:
    """Iso-CTS on one matrix ``tau (T, m, n) -> (m, n)``.

    ``sum_t tau_t = U S V^T``; common part ``U[:, :k], S[:k], V[:, :k]``; each
    task's residual ``tau_t - U_k U_k^T tau_t`` gives its top ``s`` triplets;
    all factors are concatenated, orthogonalised by the polar factor, and every
    singular value replaced by the mean of the concatenated ones. Triplets at
    rounding level (:func:`pact_jax.linalg.significant`, scale: the sum's
    largest singular value) are dropped, as in :func:`iso_c`.
    """
    t, m, n = tau.shape
    common, per_task = iso_cts_split(m, n, t, common_fraction)
    u, s, vh = linalg.exact_svd(tau.sum(0))
    keep = linalg.significant(s[:common], s[0], max(m, n)).astype(u.dtype)
    uk = u[:, :common] * keep
    us, ss, vs, keeps = [uk], [s[:common]], [vh[:common].T], [keep]
    if per_task > 0:
        residual = tau - uk @ (uk.T @ tau)
        ut, st, vht = linalg.exact_svd(residual, per_task)
        us.append(jnp.moveaxis(ut, 0, 1).reshape(m, t * per_task))
        ss.append(st.reshape(t * per_task))
        vs.append(jnp.moveaxis(jnp.swapaxes(vht, 1, 2), 0, 1).reshape(n, t * per_task))
        keeps.append(linalg.significant(ss[-1], s[0], max(m, n)).astype(u.dtype))
    keep_all = jnp.concatenate(keeps)
    u_all = linalg.polar(jnp.concatenate(us, axis=1) * keep_all)
    v_all = linalg.polar(jnp.concatenate(vs, axis=1) * keep_all)
    return _masked_mean(jnp.concatenate(ss), keep_all) * (u_all @ v_all.T)


def iso_cts(
    stacked: PyTree, common_fraction: float = 0.8, *, rules: LeafRules = DEFAULT_RULES
) -> PyTree:
    """Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al. 2025).

    Per matrix leaf: the top ``k ~= common_fraction * min(m, n)`` directions of
    the task sum plus ``s = (min(m, n) - k)/T`` directions per task from the
    part of each task vector orthogonal to them (:func:`iso_cts_split`),
    orthogonalised, with isotropic singular values. Non-matrix leaves: task mean.

    Args:
      common_fraction: share of the spectrum given to the common subspace, in
        ``[0, 1]``; 1 reduces to :func:`iso_c`.
    """
    common_fraction = check_fraction(common_fraction, "common_fraction", allow_zero=True)
    return _merge_by_kind(
        stacked, rules, _iso_cts_kernel, view="matrix", static={"common_fraction": common_fraction}
    )


MERGERS: dict[str, Callable[..., PyTree]] = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "tsv": tsv,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
}
