"""TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025).

Non-matrix leaves are merged by the task mean, as in the paper's reference
implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pact_jax import linalg
from pact_jax.merges._common import _check_bool, _merge_by_kind
from pact_jax.tree import DEFAULT_RULES, LeafRules, PyTree


def tsv_rank(m: int, n: int, t: int) -> int:
    """Singular triplets kept per task by TSV-M: ``max(1, floor(min(m, n) / T))``."""
    return max(1, min(m, n) // t)


def tsv_ranks(m: int, n: int, t: int, spread_remainder: bool = False) -> tuple[int, ...]:
    """Triplets kept by each of the ``T`` tasks.

    ``spread_remainder=False``: :func:`tsv_rank` for every task.
    ``spread_remainder=True`` (the PACT authors' PACT + TSV-M): with
    ``r = min(m, n)``, the first ``r mod T`` tasks keep ``floor(r/T) + 1``
    and the others ``floor(r/T)`` (at least 1 each), so all ``r`` directions
    are used.
    """
    if not spread_remainder:
        return (tsv_rank(m, n, t),) * t
    base, extra = divmod(min(m, n), t)
    return tuple(max(1, base + (i < extra)) for i in range(t))


def _tsv_kernel(
    tau: jax.Array,
    key: jax.Array | None = None,
    *,
    svd: linalg.SvdMethod = "exact",
    oversample: int = 10,
    power_iters: int = 2,
    spread_remainder: bool = False,
) -> jax.Array:
    """TSV-M on one matrix ``tau (T, m, n) -> (m, n)``.

    ``tau_t ~= U_t S_t V_t^T`` (top ``ranks[t]`` of :func:`tsv_ranks`, exact or
    randomized SVD, computed at the largest rank and masked to each task's own);
    ``U = [U_1 .. U_T]``, ``V = [V_1 .. V_T]``, ``S = diag(S_1 .. S_T)``;
    ``delta = polar(U) S polar(V)^T``. Triplets with ``s`` at rounding level
    (:func:`pact_jax.linalg.significant`, scale ``max_t s_t,1``) are dropped.
    A dropped triplet has zero columns in ``U`` and ``V``, hence in their polar
    factors, so it adds nothing.
    """
    t, m, n = tau.shape
    ranks = tsv_ranks(m, n, t, spread_remainder)
    rank = max(ranks)
    u, s, vh = linalg.truncated_svd(
        tau, rank, method=svd, key=key, oversample=oversample, power_iters=power_iters
    )
    keep = linalg.significant(s, s.max(), max(m, n))  # (T, rank)
    if min(ranks) < rank:
        own = jnp.arange(rank)[None, :] < jnp.asarray(ranks)[:, None]
        keep = keep & own
    keep = keep.astype(u.dtype)
    u, vh = u * keep[:, None, :], vh * keep[:, :, None]
    u_cat = jnp.moveaxis(u, 0, 1).reshape(m, t * rank)
    v_cat = jnp.moveaxis(jnp.swapaxes(vh, 1, 2), 0, 1).reshape(n, t * rank)
    s_cat = (s * keep).reshape(t * rank)
    return (linalg.polar(u_cat) * s_cat) @ linalg.polar(v_cat).T


def tsv(
    stacked: PyTree,
    *,
    svd: linalg.SvdMethod = "exact",
    key: jax.Array | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    spread_remainder: bool = False,
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
      spread_remainder: ``False`` (default, the TSV paper's and the authors'
        plain TSV-M): every task keeps ``max(1, floor(min(m, n)/T))`` triplets.
        ``True`` (the PACT authors' PACT + TSV-M): the first
        ``min(m, n) mod T`` tasks keep one more (:func:`tsv_ranks`).
    """
    if svd not in ("exact", "randomized"):
        raise ValueError(f"svd must be 'exact' or 'randomized', got {svd!r}.")
    if svd == "randomized" and key is None:
        raise ValueError("tsv(svd='randomized') needs a PRNG key: key=jax.random.key(0).")
    _check_bool(spread_remainder, "spread_remainder")
    static = {"svd": svd, "oversample": oversample, "power_iters": power_iters}
    if spread_remainder:  # only when set, so the default's compiled kernels are shared
        static["spread_remainder"] = True
    return _merge_by_kind(
        stacked, rules, _tsv_kernel, view="matrix", static=static, key=key if svd == "randomized" else None
    )
