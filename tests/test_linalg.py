"""Tests of :mod:`pact_jax.linalg` against NumPy (float64) references.

Inputs are float32 (the library's compute dtype); references see the same
values upcast to float64. Singular vectors have a sign (and, for repeated
singular values, a rotation) ambiguity, so subspaces are compared through
their orthogonal projectors ``U U^T``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pact_jax import linalg

RTOL = 1e-4
ATOL = 1e-4


# ==========================================================================
# Helpers (plain NumPy)


def np_orthonormal(rng: np.random.Generator, m: int, c: int) -> np.ndarray:
    """``(m, c)`` with orthonormal columns (``c <= m``)."""
    q, r = np.linalg.qr(rng.standard_normal((m, c)))
    return q * np.sign(np.diag(r))[None, :]


def np_with_spectrum(rng: np.random.Generator, m: int, n: int, s: np.ndarray) -> np.ndarray:
    """``U diag(s) V^T`` with random orthonormal ``U (m, len(s))``, ``V (n, len(s))``."""
    p = len(s)
    return (np_orthonormal(rng, m, p) * s[None, :]) @ np_orthonormal(rng, n, p).T


def np_low_rank(rng: np.random.Generator, m: int, n: int, rank: int) -> np.ndarray:
    """Exactly rank ``rank`` with well separated singular values in ``[1, 10]``."""
    return np_with_spectrum(rng, m, n, np.geomspace(10.0, 1.0, rank))


def np_projector(u: np.ndarray) -> np.ndarray:
    return u @ np.swapaxes(u, -1, -2)


def f32(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


SHAPES = [(12, 7), (7, 12), (9, 9)]


# ==========================================================================
# exact_svd / truncated_svd


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_svd_reconstructs_and_matches_numpy(shape):
    rng = np.random.default_rng(0)
    x = f32(rng.standard_normal(shape))
    u, s, vh = linalg.exact_svd(x)
    p = min(shape)
    chex.assert_shape(u, (shape[0], p))
    chex.assert_shape(s, (p,))
    chex.assert_shape(vh, (p, shape[1]))
    np.testing.assert_allclose(f64(u) @ np.diag(f64(s)) @ f64(vh), f64(x), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(f64(s), np.linalg.svd(f64(x), compute_uv=False), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(f64(u).T @ f64(u), np.eye(p), atol=ATOL)
    np.testing.assert_allclose(f64(vh) @ f64(vh).T, np.eye(p), atol=ATOL)


@pytest.mark.parametrize("method", ["exact", "truncated"])
def test_exact_and_truncated_svd_are_batched_and_truncate(method):
    rng = np.random.default_rng(1)
    rank = 3
    x = f32(rng.standard_normal((2, 3, 10, 8)))
    if method == "exact":
        out = linalg.exact_svd(x, rank)
    else:
        out = linalg.truncated_svd(x, rank, method="exact")
    chex.assert_shape(out.u, (2, 3, 10, rank))
    chex.assert_shape(out.s, (2, 3, rank))
    chex.assert_shape(out.vh, (2, 3, rank, 8))
    for i in range(2):
        for j in range(3):
            xn = f64(x[i, j])
            un, sn, vhn = np.linalg.svd(xn, full_matrices=False)
            np.testing.assert_allclose(f64(out.s[i, j]), sn[:rank], atol=ATOL, rtol=RTOL)
            # The truncated product is the best rank-`rank` approximation.
            best = un[:, :rank] @ np.diag(sn[:rank]) @ vhn[:rank]
            approx = f64(out.u[i, j]) @ np.diag(f64(out.s[i, j])) @ f64(out.vh[i, j])
            np.testing.assert_allclose(approx, best, atol=ATOL, rtol=RTOL)
            np.testing.assert_allclose(
                np_projector(f64(out.u[i, j])), np_projector(un[:, :rank]), atol=ATOL, rtol=RTOL
            )


def test_uses_gram_rule():
    o = linalg.GRAM_OVERSAMPLE
    assert linalg.uses_gram((200, 90), 45 - o)
    assert not linalg.uses_gram((200, 90), 46 - o)  # rank + oversample above min(m, n) / 2
    assert not linalg.uses_gram((200, 90), None)
    assert linalg.uses_gram((3, 90, 200), 45 - o)  # batch axes do not count


def _np_top(x: np.ndarray, rank: int):
    u, s, vh = np.linalg.svd(f64(x), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (2, 80, 80)])
@pytest.mark.parametrize("rank", [3, 20])
def test_exact_svd_gram_path_matches_numpy(shape, rank):
    """Small ranks take the Gram path (eigh + Rayleigh-Ritz); it must agree with a
    float64 LAPACK SVD like the full SVD does, on a decaying and on a flat spectrum."""
    assert linalg.uses_gram(shape, rank)
    rng = np.random.default_rng(rank)
    batch, (m, n) = shape[:-2], shape[-2:]
    p = min(m, n)
    decaying = [np_with_spectrum(rng, m, n, np.geomspace(100.0, 0.01, p)) for _ in range(int(np.prod(batch)))]
    for x in (np.stack(decaying).reshape(shape), rng.standard_normal(shape)):
        out = linalg.exact_svd(f32(x), rank)
        chex.assert_shape((out.u, out.s, out.vh), ((*batch, m, rank), (*batch, rank), (*batch, rank, n)))
        for idx in np.ndindex(*batch):
            u, s, vh = _np_top(x[idx], rank)
            gu, gs, gvh = f64(out.u[idx]), f64(out.s[idx]), f64(out.vh[idx])
            np.testing.assert_allclose(gs, s, rtol=1e-5, atol=1e-5 * s[0])
            np.testing.assert_allclose(gu.T @ gu, np.eye(rank), atol=1e-5)
            np.testing.assert_allclose(gvh @ gvh.T, np.eye(rank), atol=1e-5)
            best = (u * s) @ vh
            np.testing.assert_allclose((gu * gs) @ gvh, best, atol=2e-4 * s[0])
            # Subspaces within the float32 sensitivity eps * s_max / gap at `rank`.
            gap = (s[-1] - np.linalg.svd(f64(x[idx]), compute_uv=False)[rank]) / s[0]
            tol = max(1e-5, 50 * np.finfo(np.float32).eps / gap)
            np.testing.assert_allclose(np_projector(gu), np_projector(u), atol=tol)


@pytest.mark.parametrize("shape", [(100, 160), (160, 100)])
def test_exact_svd_gram_path_on_rank_deficient_input(shape):
    """Below the true rank, singular values stay at rounding level (as with LAPACK),
    so :func:`linalg.significant` still finds the rank; a Gram matrix alone would
    report ``sqrt(eps) * s_max``."""
    rng = np.random.default_rng(3)
    x = np_low_rank(rng, *shape, 6)
    rank = 20
    assert linalg.uses_gram(shape, rank)
    out = linalg.exact_svd(f32(x), rank)
    keep = linalg.significant(out.s, out.s[0], max(shape))
    assert int(keep.sum()) == 6
    np.testing.assert_array_less(f64(out.s[6:]), 1e-5 * float(out.s[0]))
    np.testing.assert_allclose(f64(out.u).T @ f64(out.u), np.eye(rank), atol=1e-5)
    np.testing.assert_allclose(np_projector(f64(out.u[:, :6])), np_projector(_np_top(x, 6)[0]), atol=1e-5)


def test_exact_svd_gram_path_zero_and_bfloat16_input():
    zero = linalg.exact_svd(jnp.zeros((80, 120)), 10)
    assert np.all(np.isfinite(f64(zero.u))) and np.all(f64(zero.s) == 0)
    x = np.random.default_rng(4).standard_normal((80, 120))
    out = linalg.exact_svd(jnp.asarray(x, jnp.bfloat16), 10)
    assert out.u.dtype == out.s.dtype == out.vh.dtype == jnp.float32
    ref = _np_top(f64(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), 10)[1]
    np.testing.assert_allclose(f64(out.s), ref, rtol=1e-5)


@pytest.mark.parametrize("rank", [0, 9, 2.0])
def test_exact_svd_bad_rank_raises(rank):
    x = jnp.ones((8, 10))
    with pytest.raises(ValueError, match="rank"):
        linalg.exact_svd(x, rank)


def test_truncated_svd_bad_method_or_missing_key_raises():
    x = jnp.ones((6, 5))
    with pytest.raises(ValueError, match="key"):
        linalg.truncated_svd(x, 2, method="randomized")
    with pytest.raises(ValueError, match="svd must be"):
        linalg.truncated_svd(x, 2, method="lanczos")


# ==========================================================================
# randomized_svd


@pytest.mark.parametrize("shape, true_rank, rank", [((30, 20), 5, 5), ((20, 30), 6, 4), ((24, 24), 3, 3)])
def test_randomized_svd_exact_on_low_rank_input(shape, true_rank, rank):
    rng = np.random.default_rng(2)
    xn = np_low_rank(rng, *shape, true_rank)
    x = f32(xn)
    out = linalg.randomized_svd(jax.random.key(0), x, rank, oversample=2, power_iters=1)
    chex.assert_shape(out.u, (shape[0], rank))
    chex.assert_shape(out.s, (rank,))
    chex.assert_shape(out.vh, (rank, shape[1]))
    un, sn, vhn = np.linalg.svd(xn, full_matrices=False)
    np.testing.assert_allclose(f64(out.s), sn[:rank], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np_projector(f64(out.u)), np_projector(un[:, :rank]), atol=1e-4)
    np.testing.assert_allclose(np_projector(f64(out.vh).T), np_projector(vhn[:rank].T), atol=1e-4)
    if rank == true_rank:
        np.testing.assert_allclose(f64(out.u) @ np.diag(f64(out.s)) @ f64(out.vh), xn, atol=1e-4)


def test_randomized_svd_is_batched_over_leading_axes():
    rng = np.random.default_rng(3)
    rank = 3
    xn = np.stack([np.stack([np_low_rank(rng, 16, 12, rank) for _ in range(3)]) for _ in range(2)])
    out = linalg.randomized_svd(jax.random.key(1), f32(xn), rank, oversample=4, power_iters=1)
    chex.assert_shape(out.u, (2, 3, 16, rank))
    chex.assert_shape(out.s, (2, 3, rank))
    chex.assert_shape(out.vh, (2, 3, rank, 12))
    for i in range(2):
        for j in range(3):
            un, sn, _ = np.linalg.svd(xn[i, j], full_matrices=False)
            np.testing.assert_allclose(f64(out.s[i, j]), sn[:rank], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np_projector(f64(out.u[i, j])), np_projector(un[:, :rank]), atol=1e-4)
            np.testing.assert_allclose(
                f64(out.u[i, j]) @ np.diag(f64(out.s[i, j])) @ f64(out.vh[i, j]), xn[i, j], atol=1e-4
            )


def test_randomized_svd_is_deterministic_for_a_fixed_key():
    rng = np.random.default_rng(4)
    x = f32(rng.standard_normal((20, 15)))  # full rank: the result depends on the sketch
    a = linalg.randomized_svd(jax.random.key(7), x, 4, oversample=2, power_iters=0)
    b = linalg.randomized_svd(jax.random.key(7), x, 4, oversample=2, power_iters=0)
    chex.assert_trees_all_equal(a, b)
    c = linalg.randomized_svd(jax.random.key(8), x, 4, oversample=2, power_iters=0)
    assert not np.allclose(f64(a.s), f64(c.s)), "a different key should give a different sketch on a full-rank input"


def test_randomized_svd_bfloat16_input_returns_float32():
    rng = np.random.default_rng(5)
    xn = np_low_rank(rng, 16, 12, 3)
    x = jnp.asarray(xn, dtype=jnp.bfloat16)
    out = linalg.randomized_svd(jax.random.key(0), x, 3)
    for name, arr in zip(("u", "s", "vh"), out):
        assert arr.dtype == jnp.float32, f"randomized_svd({name}) of bfloat16 input has dtype {arr.dtype}"
    # And it decomposes the (bfloat16-rounded) input.
    xr = f64(x.astype(jnp.float32))
    np.testing.assert_allclose(
        f64(out.s), np.linalg.svd(xr, compute_uv=False)[:3], rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("rank", [0, -1, 14, 100])
def test_randomized_svd_bad_rank_raises(rank):
    x = jnp.ones((13, 17))
    with pytest.raises(ValueError, match="rank"):
        linalg.randomized_svd(jax.random.key(0), x, rank)
    with pytest.raises(ValueError, match="rank"):
        linalg.truncated_svd(x, rank, method="randomized", key=jax.random.key(0))


def test_randomized_svd_negative_knobs_raise():
    x = jnp.ones((8, 6))
    with pytest.raises(ValueError):
        linalg.randomized_svd(jax.random.key(0), x, 2, oversample=-1)
    with pytest.raises(ValueError):
        linalg.randomized_svd(jax.random.key(0), x, 2, power_iters=-1)


def test_power_iterations_help_on_a_slowly_decaying_spectrum():
    rng = np.random.default_rng(6)
    m, n, rank = 48, 40, 5
    s_true = 1.0 / np.sqrt(np.arange(1, min(m, n) + 1))  # slow decay: a plain sketch is poor
    xn = np_with_spectrum(rng, m, n, s_true)
    x = f32(xn)
    key = jax.random.key(3)

    def errors(power_iters):
        out = linalg.randomized_svd(key, x, rank, oversample=2, power_iters=power_iters)
        sv_err = np.max(np.abs(f64(out.s) - s_true[:rank]) / s_true[:rank])
        approx = f64(out.u) @ np.diag(f64(out.s)) @ f64(out.vh)
        fro_err = np.linalg.norm(xn - approx)
        return sv_err, fro_err

    optimal_fro = np.sqrt(np.sum(s_true[rank:] ** 2))
    sv0, fro0 = errors(0)
    sv3, fro3 = errors(3)
    assert sv3 <= sv0, f"power iterations made singular values worse: {sv3:.3g} > {sv0:.3g}"
    assert sv3 < 0.5 * sv0 or sv0 < 1e-5, (
        f"power iterations gave no clear improvement of singular values: {sv0:.3g} -> {sv3:.3g}"
    )
    assert fro3 <= fro0 + 1e-6, f"power iterations made the rank-{rank} error worse: {fro3:.4g} > {fro0:.4g}"
    assert fro3 >= optimal_fro - 1e-4, "an approximation beat the Eckart-Young optimum: the error metric is wrong"
    assert fro3 <= 1.02 * optimal_fro, f"with power iterations, error {fro3:.4g} vs optimum {optimal_fro:.4g}"


# ==========================================================================
# polar


@pytest.mark.parametrize("shape", [(10, 4), (4, 10), (6, 6)])
def test_polar_is_orthonormal_and_matches_numpy(shape):
    rng = np.random.default_rng(7)
    xn = rng.standard_normal(shape)
    q = f64(linalg.polar(f32(xn)))
    chex.assert_shape(q, shape)
    m, c = shape
    if m >= c:
        np.testing.assert_allclose(q.T @ q, np.eye(c), atol=ATOL)
    if m <= c:
        np.testing.assert_allclose(q @ q.T, np.eye(m), atol=ATOL)
    p, _, qt = np.linalg.svd(xn, full_matrices=False)
    np.testing.assert_allclose(q, p @ qt, atol=ATOL, rtol=RTOL)


def test_polar_is_the_closest_orthonormal_matrix():
    rng = np.random.default_rng(8)
    m, c = 12, 5
    xn = rng.standard_normal((m, c))
    q = f64(linalg.polar(f32(xn)))
    best = np.linalg.norm(xn - q)
    # Random orthonormal candidates, and small rotations of the answer, are all farther.
    for _ in range(50):
        cand = np_orthonormal(rng, m, c)
        assert np.linalg.norm(xn - cand) >= best - 1e-5
    for _ in range(20):
        a = 1e-2 * rng.standard_normal((c, c))
        rot = np.linalg.qr(np.eye(c) + (a - a.T))[0]
        cand = q @ rot
        assert np.linalg.norm(xn - cand) >= best - 1e-5


def test_polar_is_batched():
    rng = np.random.default_rng(9)
    xn = rng.standard_normal((2, 3, 9, 4))
    q = f64(linalg.polar(f32(xn)))
    chex.assert_shape(q, (2, 3, 9, 4))
    for i in range(2):
        for j in range(3):
            p, _, qt = np.linalg.svd(xn[i, j], full_matrices=False)
            np.testing.assert_allclose(q[i, j], p @ qt, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape,rank", [((12, 8), 5), ((8, 12), 3), ((10, 10), 7)])
def test_polar_of_rank_deficient_input_is_the_unique_partial_isometry(shape, rank):
    # Rank-deficient x has no unique full polar factor; we return P_r Q_r^T, which must
    # not depend on rounding: float32 and float64 agree, and it is a partial isometry
    # with the range and co-range of x.
    rng = np.random.default_rng(10)
    m, c = shape
    xn = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, c))
    q = f64(linalg.polar(f32(xn)))
    p, _, qt = np.linalg.svd(xn, full_matrices=False)
    expected = p[:, :rank] @ qt[:rank]
    np.testing.assert_allclose(q, expected, atol=ATOL)
    np.testing.assert_allclose(q @ q.T @ q, q, atol=ATOL)  # partial isometry
    np.testing.assert_allclose(q @ q.T @ xn, xn, atol=1e-3 * np.abs(xn).max())  # range of x
    np.testing.assert_allclose(np.linalg.matrix_rank(q, tol=1e-3), rank)


def test_polar_rtol_sets_the_cut_off():
    x = jnp.diag(jnp.array([1.0, 1e-3, 1e-6]))
    np.testing.assert_allclose(np.asarray(linalg.polar(x)), np.eye(3), atol=1e-7)
    np.testing.assert_allclose(np.asarray(linalg.polar(x, rtol=1e-4)), np.diag([1.0, 1.0, 0.0]), atol=1e-7)


# ==========================================================================
# span_basis


@pytest.mark.parametrize("m, c, rank", [(20, 12, 5), (10, 16, 4), (8, 8, 8)])
def test_span_basis_is_a_projector_of_the_right_dimension(m, c, rank):
    rng = np.random.default_rng(10)
    xn = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, c))
    basis, dim = linalg.span_basis(f32(xn), 1e-3)
    b = f64(basis)
    chex.assert_shape(basis, (m, min(m, c)))
    assert int(dim) == rank, f"span of a rank-{rank} matrix reported as dimension {int(dim)}"
    p = b @ b.T
    np.testing.assert_allclose(p, p.T, atol=1e-5, err_msg="B B^T is not symmetric")
    np.testing.assert_allclose(p @ p, p, atol=1e-4, err_msg="B B^T is not idempotent")
    # The projector onto the column span of x (NumPy reference).
    un, _, _ = np.linalg.svd(xn, full_matrices=False)
    np.testing.assert_allclose(p, np_projector(un[:, :rank]), atol=1e-4)
    np.testing.assert_allclose(p @ xn, xn, atol=1e-4 * np.abs(xn).max())
    # Kept columns orthonormal, the rest exactly zero.
    np.testing.assert_allclose(b[:, :rank].T @ b[:, :rank], np.eye(rank), atol=1e-4)
    assert np.all(b[:, rank:] == 0.0), "columns beyond the rank are not exactly zero"


def test_span_basis_batched_and_tolerance():
    rng = np.random.default_rng(11)
    ranks = [[1, 2, 3], [4, 0, 2]]
    xn = np.zeros((2, 3, 9, 6))
    for i in range(2):
        for j in range(3):
            r = ranks[i][j]
            if r:
                xn[i, j] = rng.standard_normal((9, r)) @ rng.standard_normal((r, 6))
    basis, dim = linalg.span_basis(f32(xn), 1e-3)
    chex.assert_shape(basis, (2, 3, 9, 6))
    np.testing.assert_array_equal(np.asarray(dim), np.array(ranks))
    for i in range(2):
        for j in range(3):
            r = ranks[i][j]
            b = f64(basis[i, j])
            assert np.all(b[:, r:] == 0.0)
            p = b @ b.T
            np.testing.assert_allclose(p @ p, p, atol=1e-4)
            np.testing.assert_allclose(p @ xn[i, j], xn[i, j], atol=1e-4 * max(1.0, np.abs(xn[i, j]).max()))
    # A tolerance above every singular value keeps nothing.
    basis, dim = linalg.span_basis(f32(xn), 1e6)
    assert np.all(np.asarray(dim) == 0)
    assert np.all(np.asarray(basis) == 0.0)


# ==========================================================================
# energy_rank_mask


def np_energy_rank_mask(s: np.ndarray, energy, total=None) -> np.ndarray:
    """Fewest leading singular values whose energy reaches ``energy * total``
    (all of them if the target is never reached); ``energy=None``: all."""
    s = np.asarray(s, dtype=np.float64)
    out = np.zeros(s.shape, dtype=bool)
    for idx in np.ndindex(*s.shape[:-1]):
        row = s[idx]
        if energy is None:
            out[idx] = True
            continue
        tot = np.sum(row**2) if total is None else float(np.asarray(total)[idx] if np.ndim(total) else total)
        target = energy * tot
        count = len(row)
        acc = 0.0
        for i, v in enumerate(row):
            acc += v * v
            if acc >= target:
                count = i + 1
                break
        out[idx][:count] = True
    return out


@pytest.mark.parametrize("energy", [None, 0.2, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("with_total", [False, True])
def test_energy_rank_mask_matches_numpy(energy, with_total):
    rng = np.random.default_rng(12)
    s = np.sort(rng.uniform(0.1, 3.0, size=(4, 10)), axis=-1)[:, ::-1].copy()
    total = None
    if with_total:
        # As if s were a truncation of a longer spectrum: the total is larger.
        total = np.sum(s**2, axis=-1) + rng.uniform(0.0, 20.0, size=4)
    got = linalg.energy_rank_mask(f32(s), energy, None if total is None else f32(total))
    assert got.dtype == jnp.bool_
    chex.assert_shape(got, s.shape)
    np.testing.assert_array_equal(np.asarray(got), np_energy_rank_mask(s, energy, total))
    # Always a leading block with at least one element.
    g = np.asarray(got)
    assert np.all(g[:, 0])
    assert np.all(np.diff(g.astype(int), axis=-1) <= 0)


def test_energy_rank_mask_hand_example():
    s = jnp.asarray([2.0, 1.0, 1.0, 0.5])  # energies 4, 1, 1, 0.25 (total 6.25)
    np.testing.assert_array_equal(np.asarray(linalg.energy_rank_mask(s, 0.6)), [True, False, False, False])
    np.testing.assert_array_equal(np.asarray(linalg.energy_rank_mask(s, 0.7)), [True, True, False, False])
    np.testing.assert_array_equal(np.asarray(linalg.energy_rank_mask(s, 0.9)), [True, True, True, False])
    np.testing.assert_array_equal(
        np.asarray(linalg.energy_rank_mask(s, 0.9, total=jnp.asarray(100.0))), [True] * 4
    )


# ==========================================================================
# k-th largest / smallest by bit bisection


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_kth_largest_and_smallest_match_sort(n):
    rng = np.random.default_rng(n)
    x = np.abs(rng.normal(size=(3, 2, n))).astype(np.float32)
    x[0, 0, : n // 2] = 0.0  # zeros
    x[1, 1] = np.round(x[1, 1], 1)  # many ties
    x[2, 0, -1] = np.inf
    ref = np.sort(x, axis=-1)
    for k in sorted({1, 2, n // 3 + 1, n}):
        if k > n:
            continue
        np.testing.assert_array_equal(np.asarray(linalg.kth_largest(jnp.asarray(x), k)), ref[..., -k])
        np.testing.assert_array_equal(np.asarray(linalg.kth_smallest(jnp.asarray(x), k)), ref[..., k - 1])


def test_kth_largest_handles_subnormals_and_huge_values():
    x = np.array([[1e-45, 3e-41, 1e-38, 3.4e38, 0.0, 1.0]], np.float32)
    ref = np.sort(x, axis=-1)
    for k in range(1, 7):
        assert float(linalg.kth_largest(jnp.asarray(x), k)[0]) == ref[0, -k]
