"""PACT as the authors published it (DESIGN.md §1a): ``pact()``'s defaults, the
release's QR, SIFT, and the exact subspace algorithm of :mod:`pact_jax.subspace`.

References: ``tests/np_pact_reference.py`` (float64, the authors' loop with
explicit bases). Inputs have separated spectra so that every subspace is well
defined: W0 ``U diag(10 * 0.97^i) V^T``, task vectors low rank + a smaller
noise floor, with ratios >= 1.2 around the 10th singular value.
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pact_jax
from np_pact_reference import np_core_rank, np_pact_torch, np_sift_torch
from pact_jax import LeafRules, subspace

REL = 1e-3  # the bound: per task ||library - reference|| / ||tau_t||


def with_spectrum(rng, m, n, s):
    u = np.linalg.qr(rng.standard_normal((m, m)))[0][:, : len(s)]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0][:, : len(s)]
    return (u * s) @ v.T


def torch_case(seed: int, d_out: int, d_in: int, n_tasks: int, task_rank: int = 12):
    """``w0 (d_out, d_in)`` and ``deltas (T, d_out, d_in)`` in torch layout, float32-representable."""
    rng = np.random.default_rng(seed)
    p = min(d_out, d_in)
    w0 = with_spectrum(rng, d_out, d_in, 10.0 * 0.97 ** np.arange(p))
    s_task = 0.1 * 0.8 ** np.arange(task_rank)
    deltas = np.stack([with_spectrum(rng, d_out, d_in, s_task) + 1e-4 * rng.standard_normal((d_out, d_in))
                       for _ in range(n_tasks)])
    return w0.astype(np.float32).astype(np.float64), deltas.astype(np.float32).astype(np.float64)


def flax_tree(w0, deltas, name="layer"):
    """A Flax tree with the transposed (``(d_in, d_out)``) kernel, plus a bias left alone."""
    t = deltas.shape[0]
    pre = {name: {"kernel": jnp.asarray(w0.T, jnp.float32), "bias": jnp.ones((w0.shape[0],), jnp.float32)}}
    stacked = {name: {"kernel": jnp.asarray(np.swapaxes(deltas, 1, 2), jnp.float32),
                      "bias": jnp.ones((t, w0.shape[0]), jnp.float32)}}
    return pre, stacked


def assert_close_per_task(got_flax, want_torch, deltas, rel=REL, what=""):
    got = np.swapaxes(np.asarray(got_flax, np.float64), 1, 2)
    for t in range(deltas.shape[0]):
        err = np.linalg.norm(got[t] - want_torch[t]) / np.linalg.norm(deltas[t])
        assert err <= rel, f"{what}: task {t} differs from the reference by {err:.3g} (> {rel})"


# (T, d_out, d_in) with K + (T - 1) k < d_in
PAPER_CASES = [(2, 64, 64), (2, 48, 80), (4, 64, 96), (4, 100, 120), (8, 48, 128), (8, 96, 160)]


@pytest.mark.parametrize("case", PAPER_CASES, ids=lambda c: f"T{c[0]}-{c[1]}x{c[2]}")
def test_defaults_are_the_authors_algorithm(case):
    t, d_out, d_in = case
    w0, deltas = torch_case(t, d_out, d_in, t)
    assert np_core_rank(0.8, d_out, d_in) + (t - 1) * 10 < d_in
    want, dims = np_pact_torch(w0, deltas)
    pre, stacked = flax_tree(w0, deltas)
    got = pact_jax.pact(pre, stacked)
    assert_close_per_task(got["layer"]["kernel"], want, deltas, what=f"pact() T={t} {d_out}x{d_in}")
    np.testing.assert_array_equal(np.asarray(got["layer"]["bias"]), np.asarray(stacked["layer"]["bias"]))
    stats = pact_jax.lbw_statistics(pre, stacked)["layer/kernel"]
    st = stats["left"]  # a Flax kernel's input space is its rows
    assert int(st["pretrained_dims"]) == dims["pretrained_dims"]
    np.testing.assert_array_equal(st["reliance_dims"], dims["reliance_dims"])
    np.testing.assert_array_equal(st["protect_dims"], dims["protect_dims"])
    np.testing.assert_array_equal(st["task_dims"], [10] * t)
    removed = 1 - np.linalg.norm(want, axis=(1, 2)) ** 2 / np.linalg.norm(deltas, axis=(1, 2)) ** 2
    np.testing.assert_allclose(stats["energy_removed"], removed, atol=1e-4)


@pytest.mark.parametrize("t", [4, 8])
def test_release_qr_zeroes_where_the_release_does_and_the_default_does_not(t):
    # torch 96 x 160: K = 76, (T - 1) K >= 160 while K + (T - 1) k < 160.
    w0, deltas = torch_case(10 + t, 96, 160, t)
    pre, stacked = flax_tree(w0, deltas)
    kernel = lambda tree: np.swapaxes(np.asarray(tree["layer"]["kernel"], np.float64), 1, 2)  # noqa: E731
    norms = np.linalg.norm(deltas, axis=(1, 2))
    for zero_core in (False, True):
        want, _ = np_pact_torch(w0, deltas, method="qr", zero_core=zero_core)
        assert np.all(np.linalg.norm(want, axis=(1, 2)) / norms < 1e-6), "the reference release should zero"
        got = kernel(pact_jax.pact(pre, stacked, orthonormalize="qr", core="axes" if zero_core else "pretrained"))
        assert np.all(np.linalg.norm(got, axis=(1, 2)) / norms < 1e-5)
    got = kernel(pact_jax.pact(pre, stacked, **pact_jax.pact_preset("release")))
    assert np.all(np.linalg.norm(got, axis=(1, 2)) / norms < 1e-5)
    kept = np.linalg.norm(kernel(pact_jax.pact(pre, stacked)), axis=(1, 2)) / norms
    assert np.all(kept > 0.05), f"the fixed default should keep part of every task vector, kept {kept}"


@pytest.mark.parametrize("zero_core", [False, True])
def test_release_qr_equals_the_fix_while_bases_are_full_rank(zero_core):
    """With (T - 1) K < d_in every basis has full column rank, so QR and the rank-revealing SVD span the same."""
    w0, deltas = torch_case(3, 64, 64, 2)
    pre, stacked = flax_tree(w0, deltas)
    core = "axes" if zero_core else "pretrained"
    want, _ = np_pact_torch(w0, deltas, method="qr", zero_core=zero_core)
    got = pact_jax.pact(pre, stacked, orthonormalize="qr", core=core)
    assert_close_per_task(got["layer"]["kernel"], want, deltas, what="qr")
    fixed = pact_jax.pact(pre, stacked, core=core)
    assert_close_per_task(fixed["layer"]["kernel"], want, deltas, what="svd vs qr")


def test_sift_matches_reference_and_composes_in_chain():
    w0, deltas = torch_case(4, 48, 80, 3)
    pre, stacked = flax_tree(w0, deltas)
    got = pact_jax.sift(pre, stacked)
    assert_close_per_task(got["layer"]["kernel"], np_sift_torch(w0, deltas), deltas, what="sift")
    chex.assert_trees_all_equal_shapes_and_dtypes(got, stacked)
    fts = [jax.tree_util.tree_map(lambda w, d, i=i: w + d[i], pre, stacked) for i in range(3)]
    merge = pact_jax.chain(pact_jax.sift, pact_jax.merges.task_arithmetic)
    expected = pact_jax.apply_delta(pre, pact_jax.merges.task_arithmetic(got), 1.0)
    chex.assert_trees_all_close(merge(pre, fts), expected, atol=1e-5)


def test_output_side_and_torch_layout_follow_the_checkpoint():
    w0, deltas = torch_case(5, 96, 128, 2)  # K + k < d on both sides
    pre, stacked = flax_tree(w0, deltas)
    torch_pre = {"layer": {"kernel": jnp.asarray(w0, jnp.float32)}}
    torch_stacked = {"layer": {"kernel": jnp.asarray(deltas, jnp.float32)}}
    torch_rules = LeafRules(layout="torch")
    flax_in = np.asarray(pact_jax.pact(pre, stacked)["layer"]["kernel"])
    torch_in = np.asarray(pact_jax.pact(torch_pre, torch_stacked, rules=torch_rules)["layer"]["kernel"])
    np.testing.assert_allclose(np.swapaxes(flax_in, 1, 2), torch_in, atol=2e-6)
    flax_out = np.asarray(pact_jax.pact(pre, stacked, side="output")["layer"]["kernel"])
    torch_out = np.asarray(pact_jax.pact(torch_pre, torch_stacked, side="output", rules=torch_rules)["layer"]["kernel"])
    np.testing.assert_allclose(np.swapaxes(flax_out, 1, 2), torch_out, atol=2e-6)
    assert np.abs(flax_out - flax_in).max() > 1e-3, "input and output sides should differ"
    # and the output side is the authors' algorithm on the transposed matrices
    want, _ = np_pact_torch(w0.T, np.swapaxes(deltas, 1, 2))
    assert_close_per_task(np.swapaxes(flax_out, 1, 2), want, np.swapaxes(deltas, 1, 2), what="output side")


def _kernels(v0k, v, tau, **kw):
    fast = subspace.filter_kernel(v0k, v, tau, **kw)
    slow = subspace.release_kernel(v0k, v, tau, orthonormalize="svd", align_threshold=None, **kw)
    return fast, slow


@pytest.mark.parametrize("case", ["generic", "inside_core", "zero_task", "all_tasks", "energy", "everything"])
def test_subspace_algorithm_equals_the_direct_one(case):
    """:func:`subspace.filter_kernel` (work in span{V_t} + N) equals explicit bases, also where
    ranks drop: task directions inside the core, a zero task vector, self-protection, masked
    core columns, and a protect space that is all of R^d."""
    rng = np.random.default_rng(7)
    t, a, d, big_k, k = 4, 40, 56, 30, 6
    w0, deltas = torch_case(7, a, d, t, task_rank=8)
    tau = jnp.asarray(deltas, jnp.float32)
    opts = dict(svd="exact", oversample=0, power_iters=2)
    v0k, _ = subspace.pretrained_core(jnp.asarray(w0, jnp.float32), None, rank=big_k, energy=None,
                                      core="pretrained", **opts)
    kw = dict(exclude_self=True, strength=1.0, tol=1e-4)
    if case == "inside_core":  # task 0's explicit directions lie in V0K exactly
        basis = np.asarray(v0k)[:, :k] @ np.linalg.qr(rng.standard_normal((k, k)))[0]
        tau = tau.at[0].set(jnp.asarray(rng.standard_normal((a, k)) @ basis.T, jnp.float32))
    if case == "zero_task":
        tau = tau.at[1].set(0.0)
    if case == "all_tasks":
        kw["exclude_self"] = False
    if case == "energy":
        v0k = v0k * (jnp.arange(big_k) < 17)
    if case == "everything":
        big_k = 40
        v0k, _ = subspace.pretrained_core(jnp.asarray(w0, jnp.float32), None, rank=big_k, energy=None,
                                          core="pretrained", **opts)
    v = subspace.task_spaces(tau, None, rank=k, energy=None, **opts)
    (fast, fst), (slow, sst) = _kernels(v0k, v, tau, **kw)
    norms = np.maximum(np.linalg.norm(np.asarray(tau), axis=(1, 2)), 1e-12)
    err = np.linalg.norm(np.asarray(fast - slow), axis=(1, 2)) / norms
    assert err.max() < 1e-4, f"{case}: {err}"
    for name in ("pretrained_dims", "reliance_dims", "protect_dims", "task_dims"):
        np.testing.assert_array_equal(np.asarray(fst[name]), np.asarray(sst[name]), err_msg=f"{case} {name}")
    if case == "zero_task":
        assert int(fst["task_dims"][1]) == 0
    if case == "everything":
        assert np.all(np.asarray(fst["protect_dims"]) == d) and err.max() < 1e-4
        assert np.abs(np.asarray(fast)).max() < 1e-4 * np.abs(np.asarray(tau)).max()


def test_filter_removes_an_orthogonal_projection():
    """out_j = tau_j (I - P_j) with P_j an orthogonal projector: the removed part is orthogonal
    to what is kept, and filtering the kept part again with the same spaces changes nothing."""
    w0, deltas = torch_case(8, 40, 64, 3)
    tau = jnp.asarray(deltas, jnp.float32)
    opts = dict(svd="exact", oversample=0, power_iters=2)
    v0k, _ = subspace.pretrained_core(jnp.asarray(w0, jnp.float32), None, rank=32, energy=None,
                                      core="pretrained", **opts)
    v = subspace.task_spaces(tau, None, rank=10, energy=None, **opts)
    kw = dict(exclude_self=True, strength=1.0, tol=1e-4)
    out, _ = subspace.filter_kernel(v0k, v, tau, **kw)
    removed = np.asarray(tau - out, np.float64)
    kept = np.asarray(out, np.float64)
    for j in range(3):
        assert abs(np.sum(removed[j] * kept[j])) < 1e-5 * np.sum(deltas[j] ** 2)
    again, _ = subspace.filter_kernel(v0k, v, out, **kw)
    np.testing.assert_allclose(np.asarray(again), kept, atol=1e-5 * np.abs(kept).max())


def test_randomized_steps_match_exact_on_low_rank_input():
    """Randomized SVD (the authors' svd_lowrank) is exact when the sketch covers the rank."""
    rng = np.random.default_rng(9)
    d_out, d_in, t = 60, 90, 3
    w0 = with_spectrum(rng, d_out, d_in, 10.0 * 0.8 ** np.arange(12))
    deltas = np.stack([with_spectrum(rng, d_out, d_in, 0.1 * 0.7 ** np.arange(5)) for _ in range(t)])
    pre, stacked = flax_tree(w0, deltas)
    kw = dict(pretrained_rank=12, task_rank=5)
    exact = pact_jax.pact(pre, stacked, **kw)
    rand = pact_jax.pact(pre, stacked, svd="randomized", key=jax.random.key(0), **kw)
    assert_close_per_task(rand["layer"]["kernel"], np.swapaxes(np.asarray(exact["layer"]["kernel"]), 1, 2),
                          deltas, rel=1e-3, what="randomized vs exact")


def test_adaptive_preset_picks_ranks_by_energy():
    w0, deltas = torch_case(11, 40, 64, 2)
    pre, stacked = flax_tree(w0, deltas)
    st = pact_jax.lbw_statistics(pre, stacked, **pact_jax.pact_preset("adaptive"))["layer/kernel"]["left"]
    s0 = np.linalg.svd(w0, compute_uv=False)
    want_k = int(np.nonzero(np.cumsum(s0**2) >= 0.85 * np.sum(s0**2))[0][0]) + 1
    assert int(st["pretrained_dims"]) == want_k
    for t in range(2):
        s = np.linalg.svd(deltas[t], compute_uv=False)
        assert int(st["task_dims"][t]) == int(np.nonzero(np.cumsum(s**2) >= 0.95 * np.sum(s**2))[0][0]) + 1


def test_warns_when_the_protect_space_is_everything():
    w0, deltas = torch_case(12, 64, 64, 4)  # K = 51, 51 + 30 >= 64
    pre, stacked = flax_tree(w0, deltas)
    with pytest.warns(UserWarning, match="layer/kernel"):
        out = pact_jax.pact(pre, stacked)
    assert float(np.abs(np.asarray(out["layer"]["kernel"])).max()) < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pact_jax.pact(pre, stacked, **pact_jax.pact_preset("light"))


def test_presets_are_copies_and_unknown_names_fail():
    light = pact_jax.pact_preset("light")
    light["strength"] = 0.9
    assert pact_jax.PACT_PRESETS["light"]["strength"] == 0.1
    with pytest.raises(ValueError, match="unknown PACT preset"):
        pact_jax.pact_preset("papr")


@pytest.mark.parametrize("kwargs", [dict(orthonormalize="gram"), dict(core="zero"),
                                    dict(orthonormalize="qr", align_threshold=0.5), dict(task_energy=1.5),
                                    dict(span_tol=1.0), dict(layer_ratio=1.2), dict(include="(")])
def test_bad_settings_raise(kwargs):
    w0, deltas = torch_case(13, 16, 24, 2)
    pre, stacked = flax_tree(w0, deltas)
    with pytest.raises(ValueError):
        pact_jax.pact(pre, stacked, **kwargs)
