"""LoRA factors (pact_jax.lora), PACT's LoRA variant (pact(task_spaces=)), chain.from_stacked."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import pact_jax
from pact_jax import lora, merges
from pact_jax.tree import PactInputError
from np_pact_reference import np_lora_row_space, np_pact_torch

TORCH = pact_jax.LeafRules(layout="torch")


def factors(ranks, d_out, d_in, seed=0, scales=None):
    rng = np.random.default_rng(seed)
    scales = scales or [0.5 + i for i in range(len(ranks))]
    return [lora.LoraFactors(rng.normal(size=(r, d_in)), rng.normal(size=(d_out, r)), s) for r, s in zip(ranks, scales)]


def test_dense_delta_and_layouts():
    (f,) = factors([3], 5, 7)
    want = f.scale * f.b @ f.a
    np.testing.assert_allclose(lora.dense_delta(f), want, rtol=1e-5)
    np.testing.assert_allclose(lora.dense_delta(f, layout="flax"), want.T, rtol=1e-5)
    st = lora.stack_factors([{"w": f}, {}])["w"]
    np.testing.assert_allclose(lora.dense_delta(st), np.stack([want, np.zeros_like(want)]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layout"):
        lora.dense_delta(f, layout="jax")


def test_stack_factors_pads_ranks_and_absent_tasks():
    fs = factors([2, 4], 6, 5)
    st = lora.stack_factors([{"w": fs[0]}, {"w": fs[1], "v": fs[0]}, {}])
    assert st["w"].a.shape == (3, 4, 5) and st["w"].b.shape == (3, 6, 4)
    assert np.all(np.asarray(st["w"].a[0, 2:]) == 0) and np.all(np.asarray(st["v"].scale)[[0, 2]] == 0)
    dense = lora.dense_delta(st["w"])
    for t, f in enumerate(fs):
        np.testing.assert_allclose(dense[t], f.scale * f.b @ f.a, rtol=1e-5, atol=1e-5)
    with pytest.raises(PactInputError, match="'w'.*disagree"):
        lora.stack_factors([{"w": fs[0]}, {"w": factors([2], 6, 4)[0]}])


def test_row_space_is_an_orthonormal_basis_with_zero_columns_for_missing_rank():
    fs = factors([3, 1], 6, 9)
    st = lora.stack_factors([{"w": f} for f in fs] + [{}])["w"]
    v = np.asarray(lora.row_space(st.a))  # (3, 9, 3)
    assert v.shape == (3, 9, 3)
    for t, f in enumerate(fs):
        vt = v[t][:, np.linalg.norm(v[t], axis=0) > 0.5]
        assert vt.shape[1] == f.a.shape[0]
        np.testing.assert_allclose(vt.T @ vt, np.eye(vt.shape[1]), atol=1e-5)
        ref = np_lora_row_space(f.a)  # same span: projectors agree
        np.testing.assert_allclose(vt @ vt.T, ref @ ref.T, atol=1e-5)
    assert np.all(v[2] == 0)
    np.testing.assert_allclose(lora.column_space(st.b)[0].T @ lora.column_space(st.b)[0], np.eye(3), atol=1e-5)


@pytest.mark.parametrize("t, ranks, layout", [(3, (2, 4, 3), "torch"), (4, (4, 4, 1, 2), "flax")])
def test_factor_mergers_equal_the_dense_ones(t, ranks, layout):
    """(d_out, d_in) = (10, 8): at T = 4 TSV-M keeps 2 < r triplets per task."""
    st = lora.stack_factors([{"w": f} for f in factors(ranks, 10, 8, seed=t)])
    dense = {"w": lora.dense_delta(st["w"], layout=layout)}
    for name in ("task_arithmetic", "average", "tsv"):
        got = getattr(lora, name)(st, layout=layout)["w"]
        want = getattr(merges, name)(dense)["w"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    got = lora.tsv(st, layout=layout, spread_remainder=True)["w"]
    np.testing.assert_allclose(got, merges.tsv(dense, spread_remainder=True)["w"], rtol=1e-5, atol=1e-5 * 50)


def test_truncate_is_the_best_low_rank_adapter():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(9, 7))
    f = lora.truncate(delta, 3, lora_alpha=6)
    assert f.a.shape == (3, 7) and f.b.shape == (9, 3) and f.scale == 2.0
    u, s, vh = np.linalg.svd(delta)
    np.testing.assert_allclose(lora.dense_delta(f), (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4, atol=1e-5)
    exact = lora.truncate(delta.T, 20, layout="flax")  # rank capped at 7: exact
    np.testing.assert_allclose(lora.dense_delta(exact, layout="flax"), delta.T, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        lora.truncate(delta, 0)


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_pact_lora_variant_matches_the_numpy_reference(layout):
    """DESIGN §1a step 9: V_t = row space of A_t (k = r), then steps 3-4 on the dense s B A."""
    d_out, d_in = 24, 40
    fs = factors([4, 2, 4], d_out, d_in, seed=1)
    # a rank-deficient A (its 4th row repeats the 1st): V_t has 3 directions
    fs[2] = fs[2]._replace(a=np.concatenate([fs[2].a[:3], fs[2].a[:1]]))
    w0 = np.random.default_rng(2).normal(size=(d_out, d_in)).astype(np.float32)
    st = lora.stack_factors([{"w": f} for f in fs])["w"]
    tau = np.asarray(lora.dense_delta(st))
    want, dims = np_pact_torch(w0, tau, task_spaces=[np_lora_row_space(f.a) for f in fs])
    spaces = {"w": lora.row_space(st.a)}
    if layout == "torch":
        got = pact_jax.pact({"w": w0}, {"w": tau}, task_spaces=spaces, rules=TORCH)["w"]
    else:
        got = pact_jax.pact({"w": w0.T}, {"w": tau.transpose(0, 2, 1)}, task_spaces=spaces)["w"].transpose(0, 2, 1)
    assert 0.05 < np.linalg.norm(want) / np.linalg.norm(tau) < 0.95  # the filter does something, not everything
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    stats = pact_jax.lbw_statistics({"w": w0}, {"w": tau}, task_spaces=spaces, rules=TORCH)["w"]["right"]
    assert list(stats["task_dims"]) == [4, 2, 3] and list(stats["protect_dims"]) == dims["protect_dims"]


def test_task_spaces_are_checked():
    w0, tau = {"w": np.ones((4, 6))}, {"w": np.ones((2, 4, 6))}
    with pytest.raises(PactInputError, match=r"'w': task_spaces has shape \(2, 4, 3\), expected \(T, d, k\) = \(2, 6, k\)"):
        pact_jax.pact(w0, tau, task_spaces={"w": np.zeros((2, 4, 3))}, rules=TORCH)
    with pytest.raises(ValueError, match="side='input'"):
        pact_jax.pact(w0, tau, task_spaces={"w": np.zeros((2, 6, 3))}, side="both")
    with pytest.raises(ValueError, match="mapping"):
        pact_jax.pact(w0, tau, task_spaces=np.zeros((2, 6, 3)))
    scalar = pact_jax.pact(w0, tau, perspective="scalar", task_spaces={"w": np.zeros((2, 6, 3))})  # ignored
    np.testing.assert_allclose(scalar["w"], pact_jax.pact(w0, tau, perspective="scalar")["w"])


def _two_task_case():
    """W0 ``(12, 30)`` + a bias, two rank-3 adapters' dense deltas, their A row spaces, PACT with k = 1."""
    d_out, d_in = 12, 30
    fs = factors([3, 3], d_out, d_in, seed=4)
    st = lora.stack_factors([{"w": f} for f in fs])["w"]
    w0 = {"w": np.random.default_rng(5).normal(size=(d_out, d_in)), "b": np.zeros(d_out)}
    stacked = {"w": lora.dense_delta(st), "b": jnp.ones((2, d_out))}
    return w0, stacked, {"w": lora.row_space(st.a)}, functools.partial(pact_jax.pact, task_rank=1)


def test_chain_forwards_task_spaces():
    w0, stacked, spaces, pact = _two_task_case()
    merge = pact_jax.chain(pact, merges.task_arithmetic, alpha=0.5, rules=TORCH)
    got = merge.delta_from_stacked(w0, stacked, task_spaces=spaces)
    want = pact_jax.pact(w0, stacked, task_rank=1, task_spaces=spaces, rules=TORCH)
    np.testing.assert_allclose(got["w"], np.asarray(want["w"]).sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["b"], 2.0 * np.ones(12))
    params = merge.from_stacked(w0, stacked, task_spaces=spaces)
    np.testing.assert_allclose(params["w"], w0["w"] + 0.5 * np.asarray(got["w"]), rtol=1e-5, atol=1e-6)
    assert merge.uses_task_spaces


@pytest.mark.slow
def test_bound_task_spaces_and_groups():
    w0, stacked, spaces, pact = _two_task_case()
    want = pact_jax.pact(w0, stacked, task_rank=1, task_spaces=spaces, rules=TORCH)
    got = pact_jax.chain(pact, merges.task_arithmetic, rules=TORCH).delta_from_stacked(w0, stacked, task_spaces=spaces)
    # Bound task_spaces=None: the step takes its own SVD (top-1 here), whatever the merge is given.
    off = pact_jax.chain(functools.partial(pact, task_spaces=None), merges.task_arithmetic, rules=TORCH)
    dense = pact_jax.pact(w0, stacked, task_rank=1, rules=TORCH)
    np.testing.assert_allclose(off.delta_from_stacked(w0, stacked, task_spaces=spaces)["w"],
                               np.asarray(dense["w"]).sum(0), rtol=1e-5, atol=1e-6)  # fmt: skip
    assert not np.allclose(dense["w"], want["w"], atol=1e-3) and not off.uses_task_spaces
    # Group by group (budget_bytes): the same.
    grouped = pact_jax.chain(pact, merges.task_arithmetic, rules=TORCH, budget_bytes=1)
    np.testing.assert_allclose(grouped.delta_from_stacked(w0, stacked, task_spaces=spaces)["w"], got["w"],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
