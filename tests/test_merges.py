"""Tests of :mod:`pact_jax.merges` against plainly written NumPy references.

The references below are written from DESIGN.md §1c and the docstrings of
``pact_jax.merges``, in float64 NumPy with explicit loops over tasks; they do
not import anything from ``pact_jax``. Inputs are float32 (the library's compute
dtype); the references see the same float32 values upcast to float64.
"""

from __future__ import annotations

import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pact_jax
from np_reference import np_is_matrix, np_matrix_shape, np_path
from pact_jax import LeafRules, PactInputError, merges

RTOL = 1e-4
ATOL = 1e-4


# ==========================================================================
# NumPy references (float64, loops over tasks)


def np_keep(s: np.ndarray, scale: float, size: int) -> np.ndarray:
    """Singular values above float32 rounding level (NumPy's matrix_rank cut-off)."""
    return s > size * np.finfo(np.float32).eps * scale


def np_polar(x: np.ndarray) -> np.ndarray:
    """``P_+ Q_+^T`` over singular values above ``max(m, c) * eps32 * s_max`` (float32's cut-off)."""
    p, s, qt = np.linalg.svd(x, full_matrices=False)
    return (p * np_keep(s, s[0], max(x.shape))) @ qt


def ref_average(tau: np.ndarray) -> np.ndarray:
    total = np.zeros(tau.shape[1:])
    for t in range(tau.shape[0]):
        total += tau[t]
    return total / tau.shape[0]


def ref_task_arithmetic(tau: np.ndarray) -> np.ndarray:
    total = np.zeros(tau.shape[1:])
    for t in range(tau.shape[0]):
        total += tau[t]
    return total


def ref_ties_flat(tau: np.ndarray, density: float, weights=None, normalize: bool = True) -> np.ndarray:
    """TIES on ``tau (T, N)``, pact_jax's convention: per task exactly
    k = max(1, round(density N)) entries of largest |tau_t| (among equal
    magnitudes the lower index first); x_t = w_t trimmed_t; elect the sign of
    sum_t x_t (a zero sum elects nothing: the entry is 0); merge the agreeing
    non-zeros: sum x_t / sum w_t over them (normalize), or their sum."""
    n_tasks, n = tau.shape
    w = np.ones(n_tasks) if weights is None else np.asarray(weights, np.float64)
    k = min(n, max(1, round(density * n)))
    trimmed = np.zeros_like(tau)
    for t in range(n_tasks):
        kept = sorted(range(n), key=lambda j: (-abs(tau[t, j]), j))[:k]
        trimmed[t, kept] = tau[t, kept]
    x = trimmed * w[:, None]
    out = np.zeros(n)
    for j in range(n):
        elected = np.sign(x[:, j].sum())
        agreeing = [t for t in range(n_tasks) if x[t, j] != 0 and np.sign(x[t, j]) == elected]
        total = sum(x[t, j] for t in agreeing)
        divisor = sum(w[t] for t in agreeing)
        out[j] = total / divisor if normalize and divisor != 0 else total
    return out


def ref_ties(tau: np.ndarray, density: float) -> np.ndarray:
    n_tasks = tau.shape[0]
    return ref_ties_flat(tau.reshape(n_tasks, -1), density).reshape(tau.shape[1:])


def ref_tsv_ranks(m: int, n: int, n_tasks: int, spread_remainder: bool = False) -> list[int]:
    """floor(r/T) per task (at least 1), r = min(m, n); with spread_remainder the
    first r mod T tasks get one more (the PACT authors' PACT + TSV-M)."""
    r = min(m, n)
    if not spread_remainder:
        return [max(1, r // n_tasks)] * n_tasks
    return [max(1, r // n_tasks + (1 if t < r % n_tasks else 0)) for t in range(n_tasks)]


def ref_tsv_matrix(tau: np.ndarray, spread_remainder: bool = False) -> np.ndarray:
    n_tasks, m, n = tau.shape
    ranks = ref_tsv_ranks(m, n, n_tasks, spread_remainder)
    scale = max(np.linalg.norm(tau[t], 2) for t in range(n_tasks))
    us, ss, vs = [], [], []
    for t in range(n_tasks):
        k = ranks[t]
        u, s, vt = np.linalg.svd(tau[t], full_matrices=False)
        keep = np_keep(s[:k], scale, max(m, n))  # null-space directions are dropped
        us.append(u[:, :k] * keep)
        ss.append(s[:k])
        vs.append(vt[:k].T * keep)
    u_orth = np_polar(np.concatenate(us, axis=1))
    v_orth = np_polar(np.concatenate(vs, axis=1))
    return u_orth @ np.diag(np.concatenate(ss)) @ v_orth.T


def ref_layerwise_scaling(delta: np.ndarray, total: np.ndarray) -> np.ndarray:
    """delta * ||total||_F / ||delta||_F (0 for delta = 0)."""
    norm = np.linalg.norm(delta)
    return delta * (np.linalg.norm(total) / norm) if norm > 0 else np.zeros_like(delta)


def ref_iso_c_matrix(tau: np.ndarray, layerwise_scaling: bool = False) -> np.ndarray:
    total = tau.sum(0)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    keep = np_keep(s, s[0], max(tau.shape[1:]))
    delta = np.mean(s[keep]) * (u[:, keep] @ vt[keep])
    return ref_layerwise_scaling(delta, total) if layerwise_scaling else delta


def ref_newton_schulz(w: np.ndarray, steps: int) -> np.ndarray:
    """X_0 = W / ||W||_F; X <- X (3I - X^T X) / 2 (always this form: the library
    uses (3I - X X^T) X / 2 when m < n, the same map)."""
    norm = np.linalg.norm(w)
    if norm == 0:
        return np.zeros_like(w)
    x = w / norm
    for _ in range(steps):
        x = 0.5 * x @ (3.0 * np.eye(w.shape[1]) - x.T @ x)
    return x


def ref_iso_c_ns_matrix(tau: np.ndarray, steps: int, layerwise_scaling: bool = False) -> np.ndarray:
    """The PACT authors' isoc_ns: X = NS(sum), delta = (sum_ij X_ij W_ij / min(m, n)) X."""
    total = tau.sum(0)
    x = ref_newton_schulz(total, steps)
    delta = (np.sum(x * total) / min(total.shape)) * x
    return ref_layerwise_scaling(delta, total) if layerwise_scaling else delta


def ref_iso_cts_split(m: int, n: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """r = min(m, n); task-specific part r - floor(r*f) rounded to a multiple of T
    (at most the largest multiple of T that fits in r); k = r - T*s."""
    r = min(m, n)
    per_task = round((r - math.floor(r * common_fraction)) / n_tasks)
    per_task = min(per_task, r // n_tasks)
    return r - n_tasks * per_task, per_task


def ref_iso_cts_matrix(tau: np.ndarray, common_fraction: float, side: str = "left") -> np.ndarray:
    """``side``: where the common subspace is removed from each task vector:
    ``'left'`` tau_t - U_k U_k^T tau_t, ``'right'`` tau_t - tau_t V_k V_k^T.
    On the default (Flax) rules the output side of every matrix view is ``'right'``."""
    n_tasks, m, n = tau.shape
    k, s_per = ref_iso_cts_split(m, n, n_tasks, common_fraction)
    u, s, vt = np.linalg.svd(tau.sum(0), full_matrices=False)
    size = max(m, n)
    keep = np_keep(s[:k], s[0], size)  # a rank-deficient sum has arbitrary null directions
    uk = u[:, :k][:, keep]
    vk = vt[:k].T[:, keep]
    us, ss, vs = [uk], [s[:k][keep]], [vk]
    if s_per > 0:
        for t in range(n_tasks):
            if side == "left":
                residual = tau[t] - uk @ (uk.T @ tau[t])
            else:
                residual = tau[t] - (tau[t] @ vk) @ vk.T
            ur, sr, vrt = np.linalg.svd(residual, full_matrices=False)
            keep = np_keep(sr[:s_per], s[0], size)
            us.append(ur[:, :s_per][:, keep])
            ss.append(sr[:s_per][keep])
            vs.append(vrt[:s_per].T[:, keep])
    u_all = np_polar(np.concatenate(us, axis=1))
    v_all = np_polar(np.concatenate(vs, axis=1))
    return np.mean(np.concatenate(ss)) * (u_all @ v_all.T)


def ref_tree(stacked, *, matrix_fn=None, flat_fn=None):
    """Applies a reference leaf by leaf (default rules): ``flat_fn`` to every
    leaf, or ``matrix_fn`` to matrix leaves (in their matrix view) and the task
    mean to the others."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(stacked)
    out = []
    for keypath, leaf in flat:
        path = np_path(keypath)
        tau = np.asarray(leaf, dtype=np.float64)
        n_tasks, shape = tau.shape[0], tau.shape[1:]
        if flat_fn is not None:
            res = flat_fn(tau)
        elif np_is_matrix(path, shape):
            m, n = np_matrix_shape(path, shape)
            res = matrix_fn(tau.reshape(n_tasks, m, n)).reshape(shape)
        else:
            res = ref_average(tau)
        out.append(res)
    return jax.tree_util.tree_unflatten(treedef, out)


WEIGHTS = (1.0, 0.5, 2.0)  # per-task weights of the weighted entries (3 tasks)

REFERENCES = {
    "average": lambda st: ref_tree(st, flat_fn=ref_average),
    "task_arithmetic": lambda st: ref_tree(st, flat_fn=ref_task_arithmetic),
    "ties_0.3": lambda st: ref_tree(st, flat_fn=lambda x: ref_ties(x, 0.3)),
    "ties_1.0": lambda st: ref_tree(st, flat_fn=lambda x: ref_ties(x, 1.0)),
    # Per-task weights (3 tasks) inside the election and the divisor, and normalize=False.
    "ties_0.3_weighted": lambda st: ref_tree(
        st, flat_fn=lambda x: ref_ties_flat(x.reshape(3, -1), 0.3, WEIGHTS).reshape(x.shape[1:])
    ),
    "ties_0.3_weighted_sum": lambda st: ref_tree(
        st, flat_fn=lambda x: ref_ties_flat(x.reshape(3, -1), 0.3, WEIGHTS, normalize=False).reshape(x.shape[1:])
    ),
    "task_arithmetic_weighted": lambda st: ref_tree(st, flat_fn=lambda x: np.tensordot(WEIGHTS, x, axes=1)),
    "tsv": lambda st: ref_tree(st, matrix_fn=ref_tsv_matrix),
    "tsv_spread": lambda st: ref_tree(st, matrix_fn=lambda x: ref_tsv_matrix(x, spread_remainder=True)),
    "iso_c": lambda st: ref_tree(st, matrix_fn=ref_iso_c_matrix),
    "iso_c_lws": lambda st: ref_tree(st, matrix_fn=lambda x: ref_iso_c_matrix(x, layerwise_scaling=True)),
    "iso_c_ns5": lambda st: ref_tree(st, matrix_fn=lambda x: ref_iso_c_ns_matrix(x, 5)),
    "iso_c_ns3_lws": lambda st: ref_tree(st, matrix_fn=lambda x: ref_iso_c_ns_matrix(x, 3, layerwise_scaling=True)),
    # Default rules are Flax: the output side of every matrix view is its right side.
    "iso_cts_0.0": lambda st: ref_tree(st, matrix_fn=lambda x: ref_iso_cts_matrix(x, 0.0, "right")),
    "iso_cts_0.8": lambda st: ref_tree(st, matrix_fn=lambda x: ref_iso_cts_matrix(x, 0.8, "right")),
    "iso_cts_0.8_input": lambda st: ref_tree(st, matrix_fn=lambda x: ref_iso_cts_matrix(x, 0.8, "left")),
}

LIBRARY = {
    "average": lambda st, **kw: merges.average(st, **kw),
    "task_arithmetic": lambda st, **kw: merges.task_arithmetic(st, **kw),
    "ties_0.3": lambda st, **kw: merges.ties(st, density=0.3, **kw),
    "ties_1.0": lambda st, **kw: merges.ties(st, 1.0, **kw),
    "ties_0.3_weighted": lambda st, **kw: merges.ties(st, 0.3, weights=WEIGHTS, **kw),
    "ties_0.3_weighted_sum": lambda st, **kw: merges.ties(st, 0.3, weights=WEIGHTS, normalize=False, **kw),
    "task_arithmetic_weighted": lambda st, **kw: merges.task_arithmetic(st, weights=WEIGHTS, **kw),
    "tsv": lambda st, **kw: merges.tsv(st, **kw),
    "tsv_spread": lambda st, **kw: merges.tsv(st, spread_remainder=True, **kw),
    "iso_c": lambda st, **kw: merges.iso_c(st, **kw),
    "iso_c_lws": lambda st, **kw: merges.iso_c(st, layerwise_scaling=True, **kw),
    "iso_c_ns5": lambda st, **kw: merges.iso_c(st, polar="newton_schulz", **kw),
    "iso_c_ns3_lws": lambda st, **kw: merges.iso_c(
        st, polar="newton_schulz", ns_steps=3, layerwise_scaling=True, **kw
    ),
    "iso_cts_0.0": lambda st, **kw: merges.iso_cts(st, 0.0, **kw),
    "iso_cts_0.8": lambda st, **kw: merges.iso_cts(st, common_fraction=0.8, **kw),
    "iso_cts_0.8_input": lambda st, **kw: merges.iso_cts(st, 0.8, common_side="input", **kw),
}

# One configuration per merger, for the property tests that loop over mergers.
MERGERS = ["average", "task_arithmetic", "ties_0.3", "tsv", "iso_c", "iso_cts_0.8"]


def test_reference_tables_agree():
    assert set(REFERENCES) == set(LIBRARY)
    assert set(merges.MERGERS) == {"average", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts"}


# ==========================================================================
# Inputs: random matrices and a tiny Flax model


def random_stacked(seed: int, n_tasks: int, shapes: dict[str, tuple[int, ...]], scale: float = 1.0):
    """Stacked float32 task vectors with a shared component (so signs and
    subspaces overlap across tasks, as for real fine-tunes)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        common = rng.standard_normal(shape)
        tasks = [0.7 * common + rng.standard_normal(shape) for _ in range(n_tasks)]
        out[name] = jnp.asarray(scale * np.stack(tasks), jnp.float32)
    return out


RANDOM_SHAPES = {
    "square": (12, 12),
    "tall": (24, 10),
    "wide": (10, 24),
    "big": (48, 40),
    "tiny_wide": (2, 6),  # T > min(m, n) when T = 3: k = 1 and T*k > min(m, n)
    "bias": (7,),
    "scale": (5,),
}


class Attention(nn.Module):
    """Flax-style attention projections: query (d, heads, head_dim), out (heads, head_dim, d)."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 4), name="query")(x)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(q)


class SmallNet(nn.Module):
    """Conv + attention projections + LayerNorm + Dense; tall and wide matrices."""

    @nn.compact
    def __call__(self, x):  # (B, 6, 6, 3)
        h = nn.Conv(6, (3, 3), name="conv")(x)  # kernel (3, 3, 3, 6) -> (27, 6)
        h = h.reshape(h.shape[0], -1, 6)
        h = Attention(name="attn")(h)  # query (6, 2, 4) -> (6, 8); out (2, 4, 6) -> (8, 6)
        h = nn.LayerNorm(name="norm")(h).mean(1)
        h = nn.Dense(10, name="dense_0")(h)  # (6, 10)
        return nn.Dense(4, name="head")(nn.relu(h))  # (10, 4)


def model_params(seed: int, dtype=jnp.float32):
    """Parameters with the exact tree, paths and shapes of ``SmallNet().init``.

    ``jax.eval_shape`` runs Flax's init abstractly (no XLA compilation, which
    keeps the file fast); the values are then drawn with NumPy."""
    abstract = jax.eval_shape(SmallNet().init, jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray((0.5 * rng.standard_normal(a.shape)).astype(np.float32).astype(dtype)), abstract
    )


def finetune(params, seed: int, scale=0.1):
    """A "fine-tuned" copy: params plus small Gaussian updates, in the params' dtype."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(
            (np.asarray(x, np.float32) + scale * rng.standard_normal(x.shape)).astype(np.float32).astype(x.dtype)
        ),
        params,
    )


@pytest.fixture(scope="module")
def flax_models():
    pre = model_params(42)
    fts = [finetune(pre, 43 + i) for i in range(3)]
    return pre, fts


@pytest.fixture(scope="module")
def flax_stacked(flax_models):
    pre, fts = flax_models
    return pact_jax.task_vectors(pre, fts)


def test_flax_model_has_the_expected_leaves(flax_models):
    pre, _ = flax_models
    shapes = {np_path(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(pre)[0]}
    assert shapes["params/conv/kernel"] == (3, 3, 3, 6)
    assert shapes["params/attn/query/kernel"] == (6, 2, 4)
    assert shapes["params/attn/query/bias"] == (2, 4)
    assert shapes["params/attn/out/kernel"] == (2, 4, 6)
    assert shapes["params/norm/scale"] == (6,)
    assert shapes["params/dense_0/kernel"] == (6, 10)
    # The library's matrix views agree with the reference views used below.
    rules = pact_jax.DEFAULT_RULES
    for path, shape in shapes.items():
        expect = "matrix" if np_is_matrix(path, shape) else "other"
        assert rules.kind(path, shape) == expect, path
        if expect == "matrix":
            assert rules.matrix_shape(path, shape) == np_matrix_shape(path, shape), path


def test_task_vectors_are_differences(flax_models, flax_stacked):
    pre, fts = flax_models
    expect = jax.tree_util.tree_map(lambda w0, *ws: jnp.stack([w - w0 for w in ws]), pre, *fts)
    chex.assert_trees_all_close(flax_stacked, expect, rtol=1e-6, atol=1e-7)


# ==========================================================================
# 1. Each merger against its NumPy reference


def _check_against_reference(name, stacked):
    got = LIBRARY[name](stacked)
    want = REFERENCES[name](stacked)
    per_task = jax.tree_util.tree_map(lambda x: x[0], stacked)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, per_task)
    got64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), got)
    scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree_util.tree_leaves(stacked))
    chex.assert_trees_all_close(
        got64,
        want,
        rtol=RTOL,
        atol=ATOL * scale,
        custom_message=f"merger {name!r} disagrees with its NumPy reference",
    )


@pytest.mark.parametrize(
    "name,n_tasks",
    [(name, 3) for name in sorted(LIBRARY)]
    + [("ties_0.3", 2), ("tsv", 2), ("iso_c", 2), ("iso_cts_0.0", 2), ("iso_cts_0.8", 2)]
    + [("tsv_spread", 4), ("iso_c_ns5", 2), ("iso_cts_0.8_input", 2)],
)
def test_merger_matches_reference_on_random_matrices(name, n_tasks):
    shapes = RANDOM_SHAPES if n_tasks == 3 else {k: RANDOM_SHAPES[k] for k in ("tall", "wide", "bias")}
    stacked = random_stacked(10 + n_tasks, n_tasks, shapes)
    _check_against_reference(name, stacked)


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_merger_matches_reference_on_flax_model(name, flax_stacked):
    _check_against_reference(name, flax_stacked)


def test_ties_hand_computed_example():
    # N = 4, density 0.5 -> k = 2 per task.
    # task 0 trimmed [3, 0, 0, 2]; task 1 trimmed [-2, 0, 0, 4]; sum [1, 0, 0, 6]
    # elected [+, 0, 0, +] -> [3 (task 0 only), 0, 0, (2 + 4) / 2].
    tau = jnp.array([[3.0, -1.0, 0.5, 2.0], [-2.0, 1.0, 0.1, 4.0]])
    out = merges.ties({"w": tau}, 0.5)["w"]
    np.testing.assert_allclose(np.asarray(out), [3.0, 0.0, 0.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(ref_ties(np.asarray(tau, np.float64), 0.5), [3.0, 0.0, 0.0, 3.0])


def test_ties_breaks_ties_at_the_kth_magnitude_by_index():
    # density 0.25 of N = 4 -> k = 1, and two entries share the top magnitude: exactly one is kept,
    # the lower index. (Until issue 17 every entry tied with the k-th magnitude was kept, here 2 of 4;
    # that rule is gone: ties must not inflate the density.)
    tau = jnp.array([[2.0, -2.0, 1.0, 0.5]])
    out = merges.ties({"w": tau}, 0.25)["w"]
    np.testing.assert_allclose(np.asarray(out), [2.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(ref_ties(np.asarray(tau, np.float64), 0.25), [2.0, 0.0, 0.0, 0.0])


def test_ties_keeps_exactly_k_entries_of_a_bfloat16_bias():
    # A bf16 fine-tune of a bias in [1, 2) (bf16 spacing 2^-7) by updates of ~0.005: its task vector
    # takes a few multiples of 2^-7, so many entries tie at the k-th magnitude. Keeping all of them
    # (the rule before issue 17) kept 45 % instead of 20 %; the trim keeps exactly round(0.2 N).
    rng = np.random.default_rng(11)
    pre = np.asarray(jnp.asarray(1.0 + rng.random(384).astype(np.float32), jnp.bfloat16), np.float32)
    fts = [jnp.asarray(pre + 0.005 * rng.standard_normal(384).astype(np.float32), jnp.bfloat16) for _ in range(2)]
    tau = np.stack([np.asarray(f, np.float32) - pre for f in fts])
    k = round(0.2 * 384)
    old_rule = [(np.abs(t) >= np.sort(np.abs(t))[::-1][k - 1]).sum() for t in tau]
    assert min(old_rule) > 2 * k, old_rule  # the input does tie at the k-th magnitude
    mask = np.asarray(merges.top_k_mask(jnp.abs(jnp.asarray(tau)), k))
    assert mask.sum(1).tolist() == [k, k]
    out = np.asarray(merges.ties({"b": jnp.asarray(tau)}, 0.2)["b"], np.float64)
    np.testing.assert_allclose(out, ref_ties_flat(tau.astype(np.float64), 0.2), rtol=1e-6, atol=1e-9)
    one = np.asarray(merges.ties({"b": jnp.asarray(tau[:1])}, 0.2)["b"])
    assert (one != 0).sum() == k


def test_ties_trims_per_leaf_and_per_task():
    # Two tasks, one leaf of N = 10, density 0.2 -> k = 2 entries per task survive;
    # the merged support lies in the union of each task's top-2 magnitudes.
    rng = np.random.default_rng(0)
    tau = rng.standard_normal((2, 10)).astype(np.float32)
    out = np.asarray(merges.ties({"w": jnp.asarray(tau)}, 0.2)["w"])
    top = np.concatenate([np.argsort(-np.abs(tau[t]))[:2] for t in range(2)])
    assert set(np.flatnonzero(out).tolist()) == set(top.tolist())


# --------------------------------------------------------------------------
# DARE (a transform; statistical checks)


DARE_SHAPES = {"big": RANDOM_SHAPES["big"], "bias": RANDOM_SHAPES["bias"]}


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_statistics(p):
    stacked = random_stacked(3, 3, DARE_SHAPES)
    out = merges.dare(jax.random.key(7), stacked, p)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, stacked)
    x = np.asarray(stacked["big"], np.float64)
    y = np.asarray(out["big"], np.float64)
    assert np.all(x != 0)
    kept = y != 0
    # Fraction kept ~ 1 - p overall (N = 5760: std <= 0.0066) and per task.
    assert abs(kept.mean() - (1 - p)) < 0.04, kept.mean()
    for t in range(3):
        assert abs(kept[t].mean() - (1 - p)) < 0.06, (t, kept[t].mean())
    # Kept entries are rescaled by 1/(1-p); dropped entries are exactly 0.
    np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-5)
    assert np.all(y[~kept] == 0)


def test_dare_is_deterministic_per_key_and_differs_across_keys():
    stacked = random_stacked(4, 3, DARE_SHAPES)
    a = merges.dare(jax.random.key(0), stacked, 0.5)
    b = merges.dare(jax.random.key(0), stacked, 0.5)
    c = merges.dare(jax.random.key(1), stacked, 0.5)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(np.asarray(a["big"]) != 0, np.asarray(c["big"]) != 0)
    # Old-style uint32 keys work too and are deterministic.
    d = merges.dare(jax.random.PRNGKey(3), stacked, 0.5)
    e = merges.dare(jax.random.PRNGKey(3), stacked, 0.5)
    chex.assert_trees_all_equal(d, e)


def test_dare_leaves_draw_different_masks():
    x = random_stacked(5, 3, DARE_SHAPES)["big"]
    out = merges.dare(jax.random.key(0), {"a": x, "b": x}, 0.5)
    assert not np.array_equal(np.asarray(out["a"]), np.asarray(out["b"])), (
        "identical leaves got identical DARE masks; each leaf must fold its index into the key"
    )


def test_dare_mask_depends_on_key_and_path_only():
    # Documented: each leaf's key is derived from ``key`` and the leaf's path, so a
    # sub-tree draws the same masks as the whole tree.
    x = random_stacked(5, 3, DARE_SHAPES)
    whole = merges.dare(jax.random.key(2), {"enc": {"w": x["big"], "b": x["bias"]}, "z": x["big"]}, 0.5)
    part = merges.dare(jax.random.key(2), {"enc": {"w": x["big"]}}, 0.5)
    chex.assert_trees_all_equal(whole["enc"]["w"], part["enc"]["w"])


def test_dare_p_zero_is_the_identity():
    # p = 0 keeps every entry (mergekit's density 1 for DARE); allowed since issue 17.
    stacked = random_stacked(6, 3, DARE_SHAPES)
    chex.assert_trees_all_equal(merges.dare(jax.random.key(0), stacked, 0.0), stacked)


def test_dare_p_one_gives_zeros():
    stacked = random_stacked(6, 3, DARE_SHAPES)
    out = merges.dare(jax.random.key(0), stacked, 1.0)
    chex.assert_trees_all_equal(out, jax.tree_util.tree_map(jnp.zeros_like, stacked))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree_util.tree_leaves(out))


# ==========================================================================
# 2. Properties


def test_task_arithmetic_of_one_task_is_its_task_vector(flax_models):
    pre, fts = flax_models
    stacked = pact_jax.task_vectors(pre, fts[:1])
    delta = merges.task_arithmetic(stacked)
    expect = jax.tree_util.tree_map(lambda w, w0: w - w0, fts[0], pre)
    chex.assert_trees_all_close(delta, expect, rtol=1e-6, atol=1e-7)


def test_average_of_identical_tasks_is_that_task():
    tv = random_stacked(7, 1, RANDOM_SHAPES)
    stacked = jax.tree_util.tree_map(lambda x: jnp.concatenate([x] * 3), tv)
    delta = merges.average(stacked)
    chex.assert_trees_all_close(delta, jax.tree_util.tree_map(lambda x: x[0], tv), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shape,n_tasks", [((12, 12), 3), ((24, 10), 2), ((10, 24), 3), ((48, 40), 3)]
)
def test_tsv_singular_values_are_the_concatenated_top_singular_values(shape, n_tasks):
    m, n = shape
    k = max(1, min(m, n) // n_tasks)
    assert n_tasks * k <= min(m, n)
    stacked = random_stacked(20, n_tasks, {"w": shape})
    delta = np.asarray(merges.tsv(stacked)["w"], np.float64)
    tau = np.asarray(stacked["w"], np.float64)
    top = np.sort(np.concatenate([np.linalg.svd(tau[t], compute_uv=False)[:k] for t in range(n_tasks)]))[::-1]
    s = np.linalg.svd(delta, compute_uv=False)
    np.testing.assert_allclose(s[: n_tasks * k], top, rtol=1e-4, err_msg="TSV-M factors are not orthonormal")
    np.testing.assert_allclose(s[n_tasks * k :], 0.0, atol=1e-4 * top[0])
    assert merges.tsv_rank(m, n, n_tasks) == k


@pytest.mark.parametrize("shape,n_tasks", [((12, 12), 3), ((24, 10), 2), ((10, 24), 3), ((48, 40), 3)])
def test_iso_c_singular_values_are_all_equal(shape, n_tasks):
    stacked = random_stacked(30, n_tasks, {"w": shape})
    delta = np.asarray(merges.iso_c(stacked)["w"], np.float64)
    s = np.linalg.svd(delta, compute_uv=False)
    s_sum = np.linalg.svd(np.asarray(stacked["w"], np.float64).sum(0), compute_uv=False)
    assert s_sum[-1] > 1e-2 * s_sum[0]  # full-rank sum
    chex.assert_shape(s, (min(shape),))
    np.testing.assert_allclose(s, np.full_like(s, s_sum.mean()), rtol=1e-4, err_msg="Iso-C spectrum not isotropic")


@pytest.mark.parametrize("common_fraction", [0.0, 0.8])
def test_iso_cts_singular_values_are_all_equal(common_fraction):
    stacked = random_stacked(31, 3, {"w": (24, 10)})
    delta = np.asarray(merges.iso_cts(stacked, common_fraction)["w"], np.float64)
    s = np.linalg.svd(delta, compute_uv=False)
    np.testing.assert_allclose(s, np.full_like(s, s.mean()), rtol=1e-4)


def test_iso_cts_with_common_fraction_one_is_iso_c(flax_stacked):
    stacked = random_stacked(40, 3, RANDOM_SHAPES)
    chex.assert_trees_all_close(merges.iso_cts(stacked, 1.0), merges.iso_c(stacked), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(
        merges.iso_cts(flax_stacked, 1.0), merges.iso_c(flax_stacked), rtol=1e-5, atol=1e-6
    )


def test_iso_cts_split_matches_reference():
    for m, n in [(12, 12), (24, 10), (10, 24), (48, 40), (2, 6), (768, 3072)]:
        for t in [1, 2, 3, 4, 8]:
            for f in [0.0, 0.1, 0.5, 0.8, 0.95, 1.0]:
                k, s = merges.iso_cts_split(m, n, t, f)
                assert (k, s) == ref_iso_cts_split(m, n, t, f), (m, n, t, f)
                assert 0 <= k <= min(m, n) and s >= 0 and k + t * s == min(m, n)
    assert merges.iso_cts_split(12, 12, 3, 1.0) == (12, 0)


def test_ties_density_one_with_agreeing_signs_is_the_mean():
    rng = np.random.default_rng(8)
    shapes = {"w": (16, 12), "b": (12,)}
    stacked = {}
    for name, shape in shapes.items():
        sign = np.sign(rng.standard_normal(shape))
        mags = 0.1 + np.abs(rng.standard_normal((3, *shape)))
        stacked[name] = jnp.asarray(sign * mags, jnp.float32)
    chex.assert_trees_all_close(merges.ties(stacked, 1.0), merges.average(stacked), rtol=1e-6, atol=1e-7)


FREEZE_AVERAGE_RULES = LeafRules(freeze=r"dense_0|attn/query/bias", average=r"conv|norm|dense_0")


@pytest.mark.parametrize("name", MERGERS)
def test_freeze_and_average_rules(name, flax_stacked):
    rules = FREEZE_AVERAGE_RULES
    got = LIBRARY[name](flax_stacked, rules=rules)
    plain = LIBRARY[name](flax_stacked)
    got_leaves = {np_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    plain_leaves = {np_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(plain)[0]}
    stacked_leaves = {np_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(flax_stacked)[0]}
    seen = set()
    for path, tau in stacked_leaves.items():
        out = got_leaves[path]
        chex.assert_equal_shape([out, tau[0]])
        if re.search(rules.freeze, path):  # freeze wins over average (dense_0 matches both)
            seen.add("freeze")
            chex.assert_trees_all_equal(out, jnp.zeros_like(tau[0]), custom_message=f"{name}: frozen {path}")
        elif re.search(rules.average, path):
            seen.add("average")
            chex.assert_trees_all_close(
                out, tau.mean(0), rtol=1e-6, atol=1e-7, custom_message=f"{name}: averaged {path}"
            )
        else:
            seen.add("other")
            chex.assert_trees_all_close(
                out, plain_leaves[path], rtol=1e-6, atol=1e-7, custom_message=f"{name}: untouched {path}"
            )
    assert seen == {"freeze", "average", "other"}


def test_dare_leaves_frozen_and_averaged_leaves_untouched():
    rules = FREEZE_AVERAGE_RULES
    x = random_stacked(9, 3, DARE_SHAPES)
    stacked = {
        "params": {
            "dense_0": {"kernel": x["big"], "bias": x["bias"]},  # frozen (freeze wins over average)
            "conv": {"kernel": x["big"] + 1.0},  # averaged
            "dense_1": {"kernel": x["big"] - 1.0, "bias": x["bias"]},  # dropped
        }
    }
    out = merges.dare(jax.random.key(0), stacked, 0.9, rules=rules)
    chex.assert_trees_all_equal(out["params"]["dense_0"], stacked["params"]["dense_0"])
    chex.assert_trees_all_equal(out["params"]["conv"], stacked["params"]["conv"])
    for leaf in jax.tree_util.tree_leaves(out["params"]["dense_1"]):
        assert np.mean(np.asarray(leaf) == 0) > 0.5


# ==========================================================================
# 3. Bucketing: a tree with several same-shape leaves == one leaf at a time


@pytest.mark.parametrize(
    "name", MERGERS + ["ties_1.0", "iso_cts_0.0", "dare", "tsv_spread", "iso_c_ns3_lws", "iso_cts_0.8_input"]
)
def test_bucketed_equals_per_leaf_loop(name):
    shapes = {
        "a": (24, 10),
        "b": (24, 10),
        "c": (24, 10),
        "d": (10, 24),
        "e": (10, 24),
        "f": (4, 2, 6),
        "g": (4, 2, 6),
        "h/bias": (7,),
        "i/bias": (7,),
    }
    stacked = random_stacked(50, 3, shapes)
    fn = _all_entry_points()[name]
    merged = fn(stacked)
    for leaf_name in shapes:
        alone = fn({leaf_name: stacked[leaf_name]})[leaf_name]
        chex.assert_trees_all_close(
            merged[leaf_name],
            alone,
            rtol=1e-5,
            atol=1e-5,
            custom_message=f"{name}: leaf {leaf_name} merged in a bucket differs from merged alone",
        )
    # The same-shape leaves are different inputs, so their outputs differ.
    assert not np.allclose(np.asarray(merged["a"]), np.asarray(merged["b"]))


# ==========================================================================
# 4. bfloat16 checkpoints


@pytest.fixture(scope="module")
def bf16_models():
    pre = model_params(3, jnp.bfloat16)
    return pre, [finetune(pre, 4 + i) for i in range(3)]


@pytest.mark.parametrize("name", MERGERS)
def test_bfloat16_task_vectors_float32_and_merged_bfloat16(name, bf16_models):
    pre, fts = bf16_models
    for leaf in jax.tree_util.tree_leaves(fts):
        assert leaf.dtype == jnp.bfloat16
    stacked = pact_jax.task_vectors(pre, fts)
    for leaf in jax.tree_util.tree_leaves(stacked):
        assert leaf.dtype == jnp.float32, leaf.dtype
    expect_tv = jax.tree_util.tree_map(
        lambda w0, *ws: jnp.stack([w.astype(jnp.float32) - w0.astype(jnp.float32) for w in ws]), pre, *fts
    )
    chex.assert_trees_all_close(stacked, expect_tv, rtol=0, atol=0)
    delta = LIBRARY[name](stacked)
    for leaf in jax.tree_util.tree_leaves(delta):
        assert leaf.dtype == jnp.float32, leaf.dtype
    merged = pact_jax.apply_delta(pre, delta, 0.5)
    chex.assert_trees_all_equal_structs(merged, pre)
    for leaf in jax.tree_util.tree_leaves(merged):
        assert leaf.dtype == jnp.bfloat16, leaf.dtype
    expect = jax.tree_util.tree_map(
        lambda w0, d: (w0.astype(jnp.float32) + 0.5 * d).astype(jnp.bfloat16), pre, delta
    )
    chex.assert_trees_all_equal(merged, expect)


# ==========================================================================
# 5. Bad input


@pytest.mark.parametrize("density", [0.0, -0.2, 1.0001, 1.5, float("nan"), True, "0.5"])
def test_ties_bad_density_raises(density):
    stacked = random_stacked(60, 2, {"w": (4, 3)})
    with pytest.raises(ValueError, match="density"):
        merges.ties(stacked, density)


@pytest.mark.parametrize("p", [-0.1, 1.0001, 2.0, float("nan"), [0.5, 1.5]])
def test_dare_bad_p_raises(p):
    stacked = random_stacked(61, 2, {"w": (4, 3)})
    with pytest.raises(ValueError, match=r"^p( \(per task\))? must"):
        merges.dare(jax.random.key(0), stacked, p)


@pytest.mark.parametrize("common_fraction", [-0.1, 1.01, float("nan")])
def test_iso_cts_bad_common_fraction_raises(common_fraction):
    stacked = random_stacked(62, 2, {"w": (4, 3)})
    with pytest.raises(ValueError, match="common_fraction"):
        merges.iso_cts(stacked, common_fraction)


def _all_entry_points():
    calls = dict(LIBRARY)
    calls["dare"] = lambda st, **kw: merges.dare(jax.random.key(0), st, 0.5, **kw)
    return calls


@pytest.mark.parametrize("name", MERGERS + ["dare"])
def test_mismatched_task_axis_raises_naming_the_leaf(name):
    stacked = {
        "encoder": {"layer_0": {"kernel": jnp.ones((3, 4, 5)), "bias": jnp.ones((3, 5))}},
        "decoder": {"odd_leaf": {"kernel": jnp.ones((2, 4, 5))}},
    }
    with pytest.raises(PactInputError, match=re.escape("decoder/odd_leaf/kernel")):
        _all_entry_points()[name](stacked)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", MERGERS + ["dare"])
def test_non_finite_raises_naming_the_leaf(name, bad):
    stacked = random_stacked(63, 2, {"w": (4, 3)})
    x = np.asarray(stacked["w"]).copy()
    x[1, 2, 0] = bad
    stacked = {"encoder": {"ok": stacked["w"], "broken_leaf": {"kernel": jnp.asarray(x)}}}
    with pytest.raises(PactInputError, match=re.escape("encoder/broken_leaf/kernel")):
        _all_entry_points()[name](stacked)


@pytest.mark.parametrize("name", ["tsv", "iso_cts_0.8"])
def test_rank_deficient_concatenation_is_well_posed(name):
    # PACT removes the same subspace from every task vector; then the factors TSV-M
    # and Iso-CTS orthogonalise lose rank and a full polar factor would be decided by
    # rounding. The merge must match a float64 reference as closely as a full-rank one.
    rng = np.random.default_rng(3)
    n_tasks, m, n, removed = 4, 16, 16, 6
    q = np.linalg.qr(rng.standard_normal((m, removed)))[0]
    tau = rng.standard_normal((n_tasks, m, n))
    tau = tau - q @ (q.T @ tau)  # every task vector orthogonal to span(q) on the left
    stacked = {"w": jnp.asarray(tau, jnp.float32)}
    got = np.asarray(LIBRARY[name](stacked)["w"], np.float64)
    want = np.asarray(REFERENCES[name]({"w": np.asarray(stacked["w"], np.float64)})["w"])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(q.T @ got, 0.0, atol=1e-4 * np.abs(want).max())  # nothing added there


def test_tsv_randomized_equals_exact_on_low_rank_task_vectors():
    # Each task vector has rank 3 <= k + oversample: the sketch captures its range exactly.
    rng = np.random.default_rng(4)
    n_tasks, m, n = 4, 40, 32
    tau = np.stack([rng.standard_normal((m, 3)) @ rng.standard_normal((3, n)) for _ in range(n_tasks)])
    stacked = {"w": jnp.asarray(tau, jnp.float32), "b": jnp.asarray(rng.standard_normal((n_tasks, n)), jnp.float32)}
    exact = merges.tsv(stacked)
    approx = merges.tsv(stacked, svd="randomized", key=jax.random.key(0))
    chex.assert_trees_all_close(approx, exact, atol=1e-4)


def test_tsv_randomized_is_keyed_and_needs_a_key():
    rng = np.random.default_rng(5)
    stacked = {"w": jnp.asarray(rng.standard_normal((3, 48, 48)), jnp.float32)}
    a = merges.tsv(stacked, svd="randomized", key=jax.random.key(1), power_iters=0)
    b = merges.tsv(stacked, svd="randomized", key=jax.random.key(1), power_iters=0)
    c = merges.tsv(stacked, svd="randomized", key=jax.random.key(2), power_iters=0)
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(np.asarray(a["w"]), np.asarray(c["w"]))  # a flat spectrum: the sketch matters
    with pytest.raises(ValueError, match="needs a PRNG key"):
        merges.tsv(stacked, svd="randomized")
    with pytest.raises(ValueError, match="svd must be"):
        merges.tsv(stacked, svd="fast")


# ==========================================================================
# 6. The PACT authors' backbone options (DESIGN.md §1c): layer-wise scaling and
#    Newton–Schulz for Iso-C, the output side for Iso-CTS, the spread remainder
#    for TSV-M.


def _orthogonal_pair(rng, m, n):
    q1 = np.linalg.qr(rng.standard_normal((m, m)))[0]
    q2 = np.linalg.qr(rng.standard_normal((n, n)))[0]
    r = min(m, n)
    return q1[:, :r], q2[:, :r]


@pytest.mark.parametrize("polar", ["svd", "newton_schulz"])
def test_iso_c_layerwise_scaling_matches_the_task_sum_norm(polar):
    stacked = random_stacked(70, 3, RANDOM_SHAPES)
    plain = merges.iso_c(stacked, polar=polar)
    scaled = merges.iso_c(stacked, polar=polar, layerwise_scaling=True)
    for name, shape in RANDOM_SHAPES.items():
        got, base = np.asarray(scaled[name], np.float64), np.asarray(plain[name], np.float64)
        if len(shape) == 1:  # non-matrix leaves: the task mean either way
            np.testing.assert_array_equal(got, base)
            continue
        target = np.linalg.norm(np.asarray(stacked[name], np.float64).sum(0))
        np.testing.assert_allclose(np.linalg.norm(got), target, rtol=1e-5, err_msg=name)
        # Same direction as the plain merge, a different (larger) norm: the option does something.
        np.testing.assert_allclose(got / np.linalg.norm(got), base / np.linalg.norm(base), atol=1e-5)
        if name in ("tall", "wide", "big"):  # spread spectra: mean(S) well below rms(S)
            assert np.linalg.norm(base) < 0.99 * target, name


def test_iso_c_layerwise_scaling_with_svd_makes_singular_values_the_rms():
    # ||sum||_F / ||mean(S) U V^T||_F rescales every singular value to sqrt(mean(S^2)).
    stacked = random_stacked(71, 3, {"w": (24, 10)})
    s_sum = np.linalg.svd(np.asarray(stacked["w"], np.float64).sum(0), compute_uv=False)
    s = np.linalg.svd(np.asarray(merges.iso_c(stacked, layerwise_scaling=True)["w"], np.float64), compute_uv=False)
    np.testing.assert_allclose(s, np.sqrt(np.mean(s_sum**2)), rtol=1e-5)


@pytest.mark.parametrize("polar", ["svd", "newton_schulz"])
@pytest.mark.parametrize("layerwise_scaling", [False, True])
def test_iso_c_options_of_zero_task_vectors_are_zero(polar, layerwise_scaling):
    stacked = {"w": jnp.zeros((3, 8, 6)), "b": jnp.zeros((3, 6))}
    out = merges.iso_c(stacked, polar=polar, layerwise_scaling=layerwise_scaling)
    chex.assert_trees_all_equal(out, {"w": jnp.zeros((8, 6)), "b": jnp.zeros(6)})


@pytest.mark.parametrize("shape", [(16, 12), (12, 16), (24, 24)])
def test_newton_schulz_polar_converges_to_the_svd_polar_when_well_conditioned(shape):
    # Singular values in [1, 2] (condition 2): after ||.||_F normalisation they lie in
    # [0.14, 0.41]; 12 steps reach float32 rounding (measured max |X - U V^T| <= 2.2e-7,
    # Iso-C relative max difference <= 7e-7); 5 steps (the authors' default) are still
    # 2.5e-2 .. 6e-2 away, which the last assertion pins.
    rng = np.random.default_rng(72)
    m, n = shape
    q1, q2 = _orthogonal_pair(rng, m, n)
    w = (q1 * np.linspace(1.0, 2.0, min(m, n))) @ q2.T
    polar = q1 @ q2.T
    x = np.asarray(merges.newton_schulz_polar(jnp.asarray(w, jnp.float32), 12), np.float64)
    np.testing.assert_allclose(x, polar, atol=1e-6)
    stacked = {"w": jnp.asarray(np.stack([0.25 * w, 0.75 * w]), jnp.float32)}
    ns = np.asarray(merges.iso_c(stacked, polar="newton_schulz", ns_steps=12)["w"], np.float64)
    svd = np.asarray(merges.iso_c(stacked)["w"], np.float64)
    np.testing.assert_allclose(ns, svd, atol=1e-5 * np.abs(svd).max())
    x5 = np.asarray(merges.newton_schulz_polar(jnp.asarray(w, jnp.float32), 5), np.float64)
    assert np.abs(x5 - polar).max() > 1e-2


@pytest.mark.parametrize("shape", [(16, 12), (12, 16)])
@pytest.mark.parametrize("steps", [1, 5])
def test_newton_schulz_polar_matches_reference_iteration(shape, steps):
    rng = np.random.default_rng(73)
    w = rng.standard_normal(shape).astype(np.float32)
    got = np.asarray(merges.newton_schulz_polar(jnp.asarray(w), steps), np.float64)
    np.testing.assert_allclose(got, ref_newton_schulz(w.astype(np.float64), steps), atol=1e-5)


def test_iso_cts_default_side_is_output_and_differs_from_input():
    stacked = random_stacked(74, 3, {"w": (24, 10), "v": (10, 24)})
    out = merges.iso_cts(stacked, 0.5)
    inp = merges.iso_cts(stacked, 0.5, common_side="input")
    flax_out = merges.iso_cts(stacked, 0.5, rules=LeafRules(layout="flax"), common_side="output")
    chex.assert_trees_all_equal(out, flax_out)
    for name in stacked:
        tau = np.asarray(stacked[name], np.float64)
        np.testing.assert_allclose(np.asarray(out[name]), ref_iso_cts_matrix(tau, 0.5, "right"), atol=1e-4)
        np.testing.assert_allclose(np.asarray(inp[name]), ref_iso_cts_matrix(tau, 0.5, "left"), atol=1e-4)
        assert np.abs(np.asarray(out[name]) - np.asarray(inp[name])).max() > 1e-2, name


@pytest.mark.parametrize("common_side", ["output", "input"])
def test_iso_cts_torch_layout_gives_the_transposed_delta(common_side):
    # The same layers stored as torch (d_out, d_in) weights: transposed matrices.
    flax_tree = random_stacked(75, 3, {"q": (24, 10), "k": (10, 24), "o": (16, 16), "bias": (10,)})
    torch_tree = {k: (jnp.swapaxes(v, 1, 2) if v.ndim == 3 else v) for k, v in flax_tree.items()}
    got_flax = merges.iso_cts(flax_tree, 0.5, common_side=common_side)
    got_torch = merges.iso_cts(torch_tree, 0.5, common_side=common_side, rules=LeafRules(layout="torch"))
    for name in flax_tree:
        want = np.asarray(got_flax[name])
        want = want.T if want.ndim == 2 else want
        np.testing.assert_allclose(np.asarray(got_torch[name]), want, atol=1e-5, err_msg=name)
    # A torch weight's output side is its LEFT side (the authors' u[:, :k]).
    side = "left" if common_side == "output" else "right"
    for name in ("q", "k", "o"):
        tau = np.asarray(torch_tree[name], np.float64)
        np.testing.assert_allclose(np.asarray(got_torch[name]), ref_iso_cts_matrix(tau, 0.5, side), atol=1e-4)


def test_tsv_spread_remainder_ranks_and_spectrum():
    assert merges.tsv_ranks(10, 24, 4) == (2, 2, 2, 2)
    assert merges.tsv_ranks(10, 24, 4, spread_remainder=True) == (3, 3, 2, 2)
    assert merges.tsv_ranks(12, 12, 3, spread_remainder=True) == (4, 4, 4)
    assert merges.tsv_ranks(2, 6, 3, spread_remainder=True) == (1, 1, 1)  # T > r: one each, as by default
    for m, n, t in [(10, 24, 4), (768, 3072, 8), (768, 768, 7), (5, 3, 2)]:
        assert list(merges.tsv_ranks(m, n, t, True)) == ref_tsv_ranks(m, n, t, True)
        assert sum(merges.tsv_ranks(m, n, t, True)) == max(min(m, n), t)
    # The merged spectrum is the concatenation of each task's own top triplets.
    stacked = random_stacked(76, 4, {"w": (10, 24)})
    tau = np.asarray(stacked["w"], np.float64)
    delta = np.asarray(merges.tsv(stacked, spread_remainder=True)["w"], np.float64)
    top = np.concatenate([np.linalg.svd(tau[t], compute_uv=False)[:k] for t, k in enumerate((3, 3, 2, 2))])
    np.testing.assert_allclose(np.linalg.svd(delta, compute_uv=False), np.sort(top)[::-1], rtol=1e-4)
    assert np.abs(delta - np.asarray(merges.tsv(stacked)["w"])).max() > 1e-2


def test_tsv_spread_remainder_randomized_equals_exact_on_low_rank_task_vectors():
    rng = np.random.default_rng(77)
    tau = np.stack([rng.standard_normal((10, 3)) @ rng.standard_normal((3, 24)) for _ in range(4)])
    stacked = {"w": jnp.asarray(tau, jnp.float32)}
    exact = merges.tsv(stacked, spread_remainder=True)
    approx = merges.tsv(stacked, spread_remainder=True, svd="randomized", key=jax.random.key(0))
    chex.assert_trees_all_close(approx, exact, atol=1e-4)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda st: merges.iso_c(st, polar="qr"), "polar must be"),
        (lambda st: merges.iso_c(st, polar="newton_schulz", ns_steps=0), "ns_steps must be"),
        (lambda st: merges.iso_c(st, polar="newton_schulz", ns_steps=2.5), "ns_steps must be"),
        (lambda st: merges.iso_c(st, ns_steps=True), "ns_steps must be"),
        (lambda st: merges.iso_c(st, layerwise_scaling="yes"), "layerwise_scaling must be"),
        (lambda st: merges.iso_cts(st, common_side="left"), "common_side must be"),
        (lambda st: merges.tsv(st, spread_remainder=1), "spread_remainder must be"),
    ],
)
def test_bad_backbone_options_raise(call, match):
    stacked = random_stacked(78, 2, {"w": (4, 3)})
    with pytest.raises(ValueError, match=match):
        call(stacked)


def test_dare_without_a_key_names_it():
    tau = {"w": jnp.ones((2, 3, 3))}
    with pytest.raises(ValueError, match="dare needs a PRNG key as its first argument.*got NoneType"):
        merges.dare(None, tau)
