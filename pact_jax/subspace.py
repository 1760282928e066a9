"""PACT's subspace perspective and SIFT on one matrix: the math (DESIGN.md §1a).

Every kernel here works in the *torch frame*: the protected space is the
column space of ``tau (T, a, d)`` (``d`` = the layer's input dimension for a
torch ``(d_out, d_in)`` weight). :mod:`pact_jax.pact` transposes Flax kernels
``(d_in, d_out)`` into that frame, so the same code serves both layouts.

Notation, per matrix ``W0 (a, d)`` and task vectors ``tau_t (a, d)``:

1. ``V0K (d, K)``: top ``K`` right singular vectors of ``W0`` (the pre-trained core).
2. ``V_t (d, k)``: top ``k`` right singular vectors of ``tau_t`` (task t's explicit space).
3. ``R_t`` = span of ``(I - V_t V_t^T) V0K`` (task t's implicit reliance space).
4. ``P_j`` = span of ``{R_i : i != j}``; ``tau_j <- tau_j - strength * tau_j P_j P_j^T``.

:func:`filter_kernel` computes steps 3-4 exactly without forming any ``R_t``
(each is ``K``-dimensional, ``K = 0.8 min(a, d)``): with ``S = span(V0K) + span{V_t}``
and ``N`` an orthonormal basis of the part of ``span{V_t}`` outside ``V0K``,

  * ``S ⊖ R_t = Y_t = span(V_t) ⊕ (N ∩ V_t^⊥)``, and ``N ∩ V_t^⊥ = N ⊖ A_t`` with
    ``A_t`` the range of ``(I - V0K V0K^T) V_t``: so
    ``P_{Y_t} = V_t V_t^T + N N^T - A_t A_t^T``;
  * everything but ``S ⊖ U`` happens inside ``U = span{V_t} + span(N)``
    (``dim U <= 2 T k``), and ``S ⊖ U`` lies in every ``R_t``;
  * the complement of ``P_j`` in ``S`` is ``Z_j = ∩_{i != j} Y_i``: the null space of
    the stacked ``[I_U - P_{Y_i}]_{i != j}``, whose singular values are exactly those
    of the concatenated reliance bases (restricted to ``U``), so the same relative
    rank cut-off applies;
  * ``tau_j (I - P_j P_j^T) = tau_j - tau_j (V0K V0K^T + N N^T) + tau_j G_j G_j^T``
    with ``G_j`` an orthonormal basis of ``Z_j``.

So the cost is one SVD of ``W0``, ``T`` top-``k`` SVDs, products with ``V0K``, and
SVDs of ``(T u, u)`` matrices, ``u <= 2 T k``, instead of an SVD of a
``d x (T - 1) K`` matrix per task. :func:`release_kernel` is the direct
transcription (explicit bases, SVD or the release's QR), kept for the release's
behaviour, for PACT with a cosine threshold, and as an in-library cross-check.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pact_jax import linalg

# Frobenius norm under which the release treats (I - V_t V_t^T) V0K as empty.
RELEASE_EMPTY_NORM = 1e-6


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _masked_columns(u: jax.Array, keep: jax.Array) -> jax.Array:
    return u * keep[..., None, :].astype(u.dtype)


def pretrained_core(
    w0: jax.Array,
    key: jax.Array | None,
    *,
    rank: int,
    energy: float | None,
    core: str,
    svd: str,
    oversample: int,
    power_iters: int,
    complement: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Step 1: ``V0K (d, rank)`` from ``w0 (a, d)``; columns orthonormal or zero.

    ``core='axes'`` is the release's full-fine-tune pipeline, which passes
    ``W0 = 0``: its "core" is the first ``rank`` coordinate axes.
    ``energy``: keep the fewest leading directions whose ``sum s_i^2`` reaches
    ``energy * ||W0||_F^2`` (the authors' adaptive ``tau_pre``), zeroing the rest.
    Also returns ``V0perp (d, d - rank')``, an orthonormal basis of the rest of
    ``R^d`` (``V0perp V0perp^T = I - V0K V0K^T``), when ``complement`` is asked
    for and ``core`` and the exact SVD give one (``a >= d``); else ``None``.
    Products with it are cheaper than with ``V0K`` when ``d - K < K``.
    """
    a, d = w0.shape[-2:]
    eye = jnp.eye(d, dtype=w0.dtype)
    if core == "axes":
        return eye[:, :rank], (eye[:, rank:] if complement else None)
    if svd == "randomized":
        f = linalg.randomized_svd(key, w0, rank, oversample=oversample, power_iters=power_iters)
        keep = linalg.energy_rank_mask(f.s, energy, total=jnp.sum(jnp.square(w0)))
        return _masked_columns(_t(f.vh), keep), None
    full = complement and a >= d
    f = linalg.exact_svd(w0, None if full else rank)
    keep = linalg.energy_rank_mask(f.s[..., :rank], energy, total=jnp.sum(jnp.square(w0)))
    v0k = _masked_columns(_t(f.vh[..., :rank, :]), keep)
    if not full:
        return v0k, None
    rest = jnp.concatenate([~keep, jnp.ones((d - rank,), bool)])  # (d,): the directions not in V0K
    return v0k, _masked_columns(_t(f.vh), rest)


def task_spaces(
    tau: jax.Array,
    key: jax.Array | None,
    *,
    rank: int,
    energy: float | None,
    svd: str,
    oversample: int,
    power_iters: int,
) -> jax.Array:
    """Step 2: ``V (T, d, rank)``, the top right singular vectors of each ``tau_t (a, d)``.

    Directions whose singular value is at rounding level (a zero or low-rank
    task vector) are zeroed: their singular vectors are arbitrary. ``energy``:
    the fewest leading directions reaching ``energy * ||tau_t||_F^2`` (``tau_task``).
    """
    _, a, d = tau.shape
    if svd == "randomized":
        f = linalg.randomized_svd(key, tau, rank, oversample=oversample, power_iters=power_iters)
    else:
        f = linalg.exact_svd(tau, rank)
    keep = linalg.significant(f.s, f.s[:, :1], max(a, d))
    keep &= linalg.energy_rank_mask(f.s, energy, total=jnp.sum(jnp.square(tau), axis=(1, 2)))
    return _masked_columns(_t(f.vh), keep)


def _orth(x: jax.Array, tol: float) -> tuple[jax.Array, jax.Array]:
    """Orthonormal basis of ``range(x)`` for ``x (..., d, c)`` whose columns have norm <= 1:
    left singular vectors with ``s > tol`` (absolute: the scale is 1), others zeroed; and the mask."""
    u, s, _ = linalg.svd(x)
    keep = s > tol
    return _masked_columns(u, keep), keep


def _others(t: int, exclude_self: bool) -> jax.Array:
    """``(T, T)`` weights: receiver ``j`` protects the spaces of tasks ``i`` with weight 1."""
    return (1.0 - jnp.eye(t)) if exclude_self else jnp.ones((t, t))


def energy_removed(tau: jax.Array, out: jax.Array) -> jax.Array:
    """Per task ``||tau_t - out_t||^2 / ||tau_t||^2`` for ``(T, ...)`` arrays (0 for a zero task vector)."""
    axes = tuple(range(1, tau.ndim))
    num = jnp.sum(jnp.square(tau - out), axis=axes)
    den = jnp.sum(jnp.square(tau), axis=axes)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def filter_kernel(
    v0k: jax.Array,
    v: jax.Array,
    tau: jax.Array,
    v0perp: jax.Array | None = None,
    *,
    exclude_self: bool,
    strength: float,
    tol: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Steps 3-4, exactly, in the small subspace ``U`` (see the module docstring).

    Args:
      v0k: ``(d, K)`` pre-trained core, columns orthonormal or zero.
      v: ``(T, d, k)`` task explicit spaces, columns orthonormal or zero.
      tau: ``(T, a, d)`` task vectors.
      v0perp: optional ``(d, d - K)`` basis of the complement of ``V0K``
        (:func:`pretrained_core`); only changes how ``tau V0K V0K^T`` is computed.
      exclude_self: receiver ``j`` protects the other tasks' spaces (else all).
      strength: share of the protected component removed.
      tol: relative rank cut-off of steps 3 and 4 (singular values of
        ``(I - V_t V_t^T) V0K`` at or below ``tol``, and of the concatenated
        reliance bases at or below ``tol * s_max``, count as zero).

    Returns:
      ``(filtered tau (T, a, d), stats)``.
    """
    t, d, k = v.shape
    n_others = t - 1 if exclude_self else t
    kept0 = jnp.sum(jnp.square(v0k), axis=0) > 0.5
    task_dims = jnp.sum(jnp.sum(jnp.square(v), axis=1) > 0.5, axis=-1)
    if n_others == 0:  # one task protecting only the others' spaces: nothing to protect
        zeros = jnp.zeros((t,), jnp.int32)
        stats = {"pretrained_dims": kept0.sum(), "task_dims": task_dims, "reliance_dims": zeros,
                 "protect_dims": zeros}
        return tau, stats
    v_cat = jnp.moveaxis(v, 0, 1).reshape(d, t * k)  # (d, Tk)
    # N: the part of every task's explicit space outside the core; A_t: task t's part.
    outside = v - v0k @ (_t(v0k) @ v)  # (T, d, k), columns of norm sin(angle to V0K)
    n_basis, n_keep = _orth(jnp.moveaxis(outside, 0, 1).reshape(d, t * k), tol)
    a_basis, a_keep = _orth(outside, tol)  # (T, d, k)
    # U = span{V_t} + span(N), with an orthonormal basis W (d, u), u = 2Tk (zero columns allowed).
    w, w_keep = _orth(jnp.concatenate([v_cat, n_basis], axis=1) / jnp.sqrt(2.0), tol)
    v_u, n_u, a_u = _t(w) @ v, _t(w) @ n_basis, _t(w) @ a_basis
    # I_U - P_{Y_t} = P_{R_t} on U. Dead (zero) columns of W keep a 1 on the diagonal, so
    # they never look like a shared null direction.
    p_y = v_u @ _t(v_u) + n_u @ _t(n_u) - a_u @ _t(a_u)  # (T, u, u)
    u_dim = w.shape[1]
    r_blocks = jnp.eye(u_dim, dtype=tau.dtype) - p_y  # (T, u, u)
    weights = _others(t, exclude_self).astype(tau.dtype)  # (receiver j, giver i)
    stacked = (weights[:, :, None, None] * r_blocks[None]).reshape(t, t * u_dim, u_dim)
    _, sig, zt = linalg.svd(stacked)  # (T, u), (T, u, u)
    # S ⊖ U (core directions orthogonal to every V_t) lies in every R_i: singular value sqrt(n_others).
    dim_s = kept0.sum() + n_keep.sum()
    dim_u = w_keep.sum()
    s_ref = jnp.maximum(sig[:, 0], jnp.where(dim_s > dim_u, jnp.sqrt(float(n_others)), 0.0))
    shared_null = sig <= tol * s_ref[:, None]  # (T, u): directions in no protected space
    g = w @ _masked_columns(_t(zt), shared_null)  # (T, d, u): orthonormal basis of Z_j
    in_core = tau - (tau @ v0perp) @ _t(v0perp) if v0perp is not None else (tau @ v0k) @ _t(v0k)
    removed = in_core + (tau @ n_basis) @ _t(n_basis) - (tau @ g) @ _t(g)
    out = tau - strength * removed
    stats = {
        "pretrained_dims": kept0.sum(),
        "task_dims": task_dims,
        # dim R_t = dim S - dim Y_t = K - k_t + rank(A_t)
        "reliance_dims": kept0.sum() - task_dims + a_keep.sum(-1),
        "protect_dims": dim_s - shared_null.sum(-1),
    }
    return out, stats


def release_kernel(
    v0k: jax.Array,
    v: jax.Array,
    tau: jax.Array,
    *,
    exclude_self: bool,
    strength: float,
    tol: float,
    orthonormalize: str,
    align_threshold: float | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Steps 3-4 as the authors' loop does them: explicit bases of every ``R_t`` and ``P_j``.

    ``orthonormalize='svd'``: rank-revealing bases (left singular vectors
    with ``s > tol``, resp. ``s > tol * s_max`` for the concatenation), the
    fix; equal to :func:`filter_kernel`. ``'qr'``: the release's reduced QR,
    which keeps ``min(d, columns)`` directions whatever the rank (so ``P_j``
    is everything once ``(T - 1) K >= d``), and an ``R_t`` whose input has
    Frobenius norm below :data:`RELEASE_EMPTY_NORM` is empty. ``align_threshold``
    (SVD only): keep only reliance directions whose singular value (the
    cosine between a core direction and task t's complement) reaches it.
    """
    t, d, k = v.shape
    m_t = v0k[None] - v @ (_t(v) @ v0k[None])  # (T, d, K)
    if orthonormalize == "qr":
        r, _ = jnp.linalg.qr(m_t)
        nonempty = jnp.sqrt(jnp.sum(jnp.square(m_t), axis=(1, 2))) >= RELEASE_EMPTY_NORM
        r = r * nonempty[:, None, None].astype(r.dtype)
        r_keep = jnp.broadcast_to(nonempty[:, None], r.shape[::2])
    else:
        u, s, _ = linalg.svd(m_t)
        r_keep = s > (tol if align_threshold is None else max(tol, align_threshold))
        r = _masked_columns(u, r_keep)
    pretrained_dims = (jnp.sum(jnp.square(v0k), axis=0) > 0.5).sum()
    task_dims = jnp.sum(jnp.sum(jnp.square(v), axis=1) > 0.5, axis=-1)
    givers = [[i for i in range(t) if not (exclude_self and i == j)] for j in range(t)]
    if not givers[0]:
        zeros = jnp.zeros((t,), jnp.int32)
        return tau, {"pretrained_dims": pretrained_dims, "task_dims": task_dims,
                     "reliance_dims": r_keep.sum(-1), "protect_dims": zeros}
    # The concatenation holds exactly the givers' bases (no zero blocks), as in the release.
    cat = r[jnp.asarray(givers)]  # (T, G, d, K')
    cat = jnp.moveaxis(cat, 1, 2).reshape(t, d, -1)
    if orthonormalize == "qr":
        p, _ = jnp.linalg.qr(cat)
        protect_dims = jnp.full((t,), p.shape[-1])
    else:
        u, s, _ = linalg.svd(cat)
        keep = s > tol * s[:, :1]
        p = _masked_columns(u, keep)
        protect_dims = keep.sum(-1)
    out = tau - strength * ((tau @ p) @ _t(p))
    stats = {"pretrained_dims": pretrained_dims, "task_dims": task_dims,
             "reliance_dims": r_keep.sum(-1), "protect_dims": protect_dims}
    return out, stats


def pact_kernel(
    w0: jax.Array,
    tau: jax.Array,
    key: jax.Array | None,
    spaces: jax.Array | None = None,
    *,
    sides: tuple[str, ...],
    pretrained_rank: int,
    task_rank: int,
    pretrained_energy: float | None,
    task_energy: float | None,
    core: str,
    svd: str,
    oversample: int,
    power_iters: int,
    exclude_self: bool,
    strength: float,
    tol: float,
    orthonormalize: str,
    align_threshold: float | None,
) -> tuple[jax.Array, dict[str, Any]]:
    """PACT on one matrix view ``w0 (m, n)``, ``tau (T, m, n)``, protecting ``sides``.

    ``'left'`` protects the row space (the input space of a Flax kernel),
    ``'right'`` the column space (of a torch weight); with both, the two
    filters are found from the input task vectors and applied in turn.
    Ranks are resolved integers (static). ``spaces (T, d, k)``: the task
    explicit spaces of the single side, given (PACT's LoRA variant: the row
    spaces of the adapters' ``A``) instead of step 2's SVD of ``tau``.
    """
    compute = jnp.promote_types(tau.dtype, jnp.float32)
    w0, tau = w0.astype(compute), tau.astype(compute)
    keys = [None] * len(sides) if key is None else list(jax.random.split(key, len(sides)))
    filters = []
    stats: dict[str, Any] = {}
    for side, side_key in zip(sides, keys):
        w_f, tau_f = (w0.T, _t(tau)) if side == "left" else (w0, tau)  # protected space = columns
        k0, k1 = (None, None) if side_key is None else jax.random.split(side_key)
        opts = dict(svd=svd, oversample=oversample, power_iters=power_iters)
        direct = orthonormalize == "svd" and align_threshold is None
        d = w_f.shape[-1]
        v0k, v0perp = pretrained_core(w_f, k0, rank=pretrained_rank, energy=pretrained_energy, core=core,
                                      complement=direct and d - pretrained_rank < pretrained_rank, **opts)
        if spaces is not None:
            v = spaces.astype(compute)
        else:
            v = task_spaces(tau_f, k1, rank=task_rank, energy=task_energy, **opts)
        filters.append((side, v0k, v0perp, v))
    out = tau
    for side, v0k, v0perp, v in filters:
        x = _t(out) if side == "left" else out
        if orthonormalize == "svd" and align_threshold is None:
            x, stats[side] = filter_kernel(v0k, v, x, v0perp, exclude_self=exclude_self, strength=strength,
                                           tol=tol)
        else:
            x, stats[side] = release_kernel(v0k, v, x, exclude_self=exclude_self, strength=strength, tol=tol,
                                            orthonormalize=orthonormalize, align_threshold=align_threshold)
        out = _t(x) if side == "left" else x
    stats["energy_removed"] = energy_removed(tau, out)
    return out, stats


def sift_kernel(
    w0: jax.Array,
    tau: jax.Array,
    key: jax.Array | None,
    *,
    side: str,
    pretrained_rank: int,
    pretrained_energy: float | None,
    core: str,
    svd: str,
    oversample: int,
    power_iters: int,
    strength: float,
) -> tuple[jax.Array, dict[str, Any]]:
    """SIFT on one matrix view: ``tau_t <- tau_t - strength * tau_t V0K V0K^T`` (step 8),
    ``V0K`` on the protected ``side`` of ``w0 (m, n)``."""
    compute = jnp.promote_types(tau.dtype, jnp.float32)
    w0, tau = w0.astype(compute), tau.astype(compute)
    w_f, tau_f = (w0.T, _t(tau)) if side == "left" else (w0, tau)
    v0k, _ = pretrained_core(w_f, key, rank=pretrained_rank, energy=pretrained_energy, core=core, svd=svd,
                             oversample=oversample, power_iters=power_iters)
    x = tau_f - strength * ((tau_f @ v0k) @ _t(v0k))
    out = _t(x) if side == "left" else x
    stats = {"pretrained_dims": (jnp.sum(jnp.square(v0k), axis=0) > 0.5).sum(),
             "energy_removed": energy_removed(tau, out)}
    return out, stats
