"""Isotropic merging (Marczak et al., ICML 2025): Iso-C and Iso-CTS, and the
Newton–Schulz polar factor that Iso-C may use instead of an SVD.

Non-matrix leaves are merged by the task mean, as in the paper's reference
implementation.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp

from pact_jax import linalg
from pact_jax.merges._common import _check_bool, _merge_by_kind
from pact_jax.tree import DEFAULT_RULES, LeafRules, PyTree, check_fraction


PolarMethod = Literal["svd", "newton_schulz"]


def newton_schulz_polar(x: jax.Array, steps: int) -> jax.Array:
    """``steps`` Newton–Schulz iterations towards the orthogonal polar factor of ``x (m, n)``.

    ``X_0 = x / ||x||_F`` (all singular values in ``(0, 1]``), then
    ``X <- X (3 I - X^T X) / 2`` (written as ``(3 I - X X^T) X / 2`` when
    ``m < n``, the same map on the smaller Gram matrix). Each singular value
    follows ``s <- (3 s - s^3) / 2``, which converges to 1 for ``s`` in
    ``(0, sqrt(3))`` and keeps 0 at 0; a small ``s`` grows only by 1.5x per
    step, so few steps leave the small singular values of a large matrix well
    below 1. ``x = 0`` gives 0. Matmuls at float32 precision (``HIGHEST``).
    """
    m, n = x.shape
    norm = jnp.linalg.norm(x)
    y = x / jnp.where(norm > 0, norm, 1.0)
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)

    def step(_, y):
        if m >= n:
            return 0.5 * dot(y, 3.0 * jnp.eye(n, dtype=y.dtype) - dot(y.T, y))
        return 0.5 * dot(3.0 * jnp.eye(m, dtype=y.dtype) - dot(y, y.T), y)

    return jax.lax.fori_loop(0, steps, step, y)


def _iso_c_kernel(
    tau: jax.Array,
    *,
    polar: PolarMethod = "svd",
    ns_steps: int = 5,
    layerwise_scaling: bool = False,
) -> jax.Array:
    """Iso-C on one matrix: ``sum_t tau_t = U S V^T -> mean(S) U V^T``.

    ``polar='svd'``: over the significant triplets only
    (:func:`pact_jax.linalg.significant`): for a rank-deficient sum the
    null-space singular vectors are arbitrary. ``polar='newton_schulz'``:
    ``X = newton_schulz_polar(sum, ns_steps)``, ``delta = (<X, sum>_F / min(m, n)) X``
    (``<UV^T, U S V^T> = sum(S)``: the mean singular value without an SVD, over
    all ``min(m, n)``). ``layerwise_scaling``: ``delta *= ||sum||_F / ||delta||_F``
    (0 when ``delta = 0``).
    """
    _, m, n = tau.shape
    total = tau.sum(0)
    if polar == "svd":
        u, s, vh = linalg.exact_svd(total)
        keep = linalg.significant(s, s[0], max(m, n)).astype(u.dtype)
        delta = _masked_mean(s, keep) * ((u * keep) @ vh)
    else:
        x = newton_schulz_polar(total, ns_steps)
        delta = (jnp.vdot(x, total) / min(m, n)) * x
    if layerwise_scaling:
        norm = jnp.linalg.norm(delta)
        delta = delta * jnp.where(norm > 0, jnp.linalg.norm(total) / jnp.where(norm > 0, norm, 1.0), 0.0)
    return delta


def _masked_mean(s: jax.Array, keep: jax.Array) -> jax.Array:
    """Mean of ``s`` over ``keep`` (0/1 weights); 0 when nothing is kept."""
    return (s * keep).sum() / jnp.maximum(keep.sum(), 1.0)


def iso_c(
    stacked: PyTree,
    *,
    layerwise_scaling: bool = False,
    polar: PolarMethod = "svd",
    ns_steps: int = 5,
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025).

    Per matrix leaf: SVD of the task sum, every singular value replaced by
    their mean: ``delta = mean(S) U V^T``. Non-matrix leaves: task mean.

    Args:
      layerwise_scaling: ``False`` (default, the Iso paper): as above.
        ``True`` (the PACT authors' Iso-C config, ``enable_layerwise_scaling``):
        each matrix's delta is rescaled to the Frobenius norm of the plain
        sum, ``delta *= ||sum_t tau_t||_F / ||delta||_F`` (0-safe). With
        ``polar='svd'`` this makes every singular value the root mean square
        of ``S`` instead of its mean.
      polar: ``'svd'`` (default): ``U V^T`` and ``mean(S)`` from the SVD of the
        sum. ``'newton_schulz'`` (the PACT authors' ``isoc_ns``):
        ``X = newton_schulz_polar(sum, ns_steps)`` (start ``sum/||sum||_F``,
        ``X <- X (3I - X^T X)/2``) and ``delta = (<X, sum>_F / min(m, n)) X``;
        no SVD. Few steps do not converge for the small singular values of a
        large matrix (:func:`newton_schulz_polar`), so this is a different
        merge, not an approximation of ``'svd'``, unless ``ns_steps`` is large.
      ns_steps: Newton–Schulz iterations (``polar='newton_schulz'``), >= 1.
    """
    _check_bool(layerwise_scaling, "layerwise_scaling")
    if polar not in ("svd", "newton_schulz"):
        raise ValueError(f"polar must be 'svd' or 'newton_schulz', got {polar!r}.")
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"ns_steps must be an integer >= 1, got {ns_steps!r}.")
    static: dict[str, Any] = {}
    if polar != "svd":
        static.update(polar=polar, ns_steps=ns_steps)
    if layerwise_scaling:
        static["layerwise_scaling"] = True
    return _merge_by_kind(stacked, rules, _iso_c_kernel, view="matrix", static=static)


def iso_cts_split(m: int, n: int, t: int, common_fraction: float) -> tuple[int, int]:
    """``(k, s)``: common-subspace size and directions per task of Iso-CTS.

    ``r = min(m, n)``; the task-specific part ``r - floor(r * f)`` is rounded
    to a multiple of ``T`` so each task gets ``s`` directions and ``k = r - T s``.
    """
    r = min(m, n)
    specific = round((r - int(r * common_fraction)) / t) * t
    specific = min(specific, (r // t) * t)
    return r - specific, specific // t


def _iso_cts_kernel(
    tau: jax.Array, *, common_fraction: float, common_side: Literal["left", "right"] = "left"
) -> jax.Array:
    """Iso-CTS on one matrix ``tau (T, m, n) -> (m, n)``.

    ``sum_t tau_t = U S V^T``; common part ``U[:, :k], S[:k], V[:, :k]``; each
    task's residual ``tau_t - U_k U_k^T tau_t`` (``common_side='left'``) or
    ``tau_t - tau_t V_k V_k^T`` (``'right'``) gives its top ``s`` triplets;
    all factors are concatenated, orthogonalised by the polar factor, and every
    singular value replaced by the mean of the concatenated ones. Triplets at
    rounding level (:func:`pact_jax.linalg.significant`, scale: the sum's
    largest singular value) are dropped, as in :func:`iso_c`.

    Everything but the residual is symmetric under transposition, so
    ``'right'`` is ``'left'`` on ``tau^T``, transposed back.
    """
    if common_side == "right":
        return _iso_cts_kernel(jnp.swapaxes(tau, 1, 2), common_fraction=common_fraction).T
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
    stacked: PyTree,
    common_fraction: float = 0.8,
    *,
    common_side: Literal["output", "input"] = "output",
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al. 2025).

    Per matrix leaf: the top ``k ~= common_fraction * min(m, n)`` directions of
    the task sum plus ``s = (min(m, n) - k)/T`` directions per task from the
    part of each task vector orthogonal to them (:func:`iso_cts_split`),
    orthogonalised, with isotropic singular values. Non-matrix leaves: task mean.

    Args:
      common_fraction: share of the spectrum given to the common subspace, in
        ``[0, 1]``; 1 reduces to :func:`iso_c`.
      common_side: the side on which the common subspace is removed from each
        task vector. ``'output'`` (default; the Iso paper's and the PACT
        authors' code: left singular vectors of a torch ``(d_out, d_in)``
        weight): ``tau_t - P tau_t`` with ``P`` the projector on the top-``k``
        output-side singular vectors of the sum. ``'input'``: on the input
        side. Which side of the matrix view that is follows
        ``rules.layout`` (:meth:`pact_jax.LeafRules.output_side`): on Flax
        ``(d_in, d_out)`` kernels ``'output'`` is the right side (columns).
        The default changed: earlier versions always used the left side of
        the matrix view, i.e. ``'input'`` on Flax kernels; pass
        ``common_side='input'`` to reproduce them.
    """
    common_fraction = check_fraction(common_fraction, "common_fraction", allow_zero=True)
    if common_side not in ("output", "input"):
        raise ValueError(f"common_side must be 'output' or 'input', got {common_side!r}.")
    side_of = rules.output_side if common_side == "output" else rules.input_side
    return _merge_by_kind(
        stacked,
        rules,
        _iso_cts_kernel,
        view="matrix",
        static={"common_fraction": common_fraction},
        static_for=lambda path: {"common_side": side_of(path)},
    )
