"""Tests of PACT (:func:`pact_jax.pact`, :func:`pact_jax.lbw_statistics`).

The NumPy (float64) references below are written from DESIGN.md §1a/§1b and the
``pact_jax.pact`` module docstring, with explicit loops over tasks; they import
nothing from ``pact_jax``. Inputs are float32 (the library's compute dtype); the
references see the same float32 values upcast to float64.

Subspaces are only well defined when the relevant singular values are
separated, so the random matrices here have prescribed, geometrically decaying
spectra, and the cosine threshold is placed in a wide gap between the cosines
the reference finds (asserted, so a bad draw fails loudly instead of flaking).
Projectors, not bases, are compared.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pact_jax
from np_reference import np_is_matrix, np_matrix_shape, np_path
from pact_jax import LeafRules, PactInputError

TALL = (48, 40)
WIDE = (32, 48)
REL = 2e-4  # per-task ||library - reference||_F / ||tau_t||_F (float32 vs float64)
PROJ_TOL = 1e-4  # span tolerance of the reference projector (columns are unit-norm)


# ==========================================================================
# NumPy references (float64)


def np_resolve_rank(value, m: int, n: int) -> int:
    """An int is a rank; a float is a fraction of ``min(m, n)`` (rounded, at least 1)."""
    p = min(m, n)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return max(1, int(np.floor(value * p + 1e-9)))


def np_span_projector(cols: np.ndarray, tol: float = PROJ_TOL) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal projector onto the column span of ``cols (m, c)``, from an SVD
    that drops singular values ``<= tol``; also returns the singular values."""
    m = cols.shape[0]
    if cols.shape[1] == 0:
        return np.zeros((m, m)), np.zeros(0)
    u, s, _ = np.linalg.svd(cols, full_matrices=False)
    keep = s > tol * s[0]  # relative to the largest, as the library
    return u[:, keep] @ u[:, keep].T, s


def ref_lbw_left(w0, taus, *, k, r, energy, thr, exclude_self):
    """Steps 1-4 of DESIGN.md §1a on the left side of ``w0 (m, n)``, ``taus (T, m, n)``.

    Returns a dict: ``projectors (T, m, m)`` (P_s for each receiving task s),
    ``cosines`` (list of T arrays), ``lbw_dims (T,)``, ``span_dims (T,)``,
    ``pretrained_dims`` and ``concat_svals`` (singular values of every stacked
    LBW basis, for the conditioning check).
    """
    n_tasks, m, _ = taus.shape
    u0, s0, _ = np.linalg.svd(w0, full_matrices=False)
    kept = k
    if energy is not None:
        # The fewest of the top-k directions holding `energy` of ||W0||_F^2 (all k if never reached).
        cum = np.cumsum(s0[:k] ** 2)
        reached = np.nonzero(cum >= energy * np.sum(w0**2))[0]
        kept = int(reached[0]) + 1 if reached.size else k
    u0k = u0[:, :kept]
    lbw, cosines = [], []
    for t in range(n_tasks):
        ut = np.linalg.svd(taus[t], full_matrices=False)[0][:, :r]
        m_t = (np.eye(m) - ut @ ut.T) @ u0k
        a_t, g_t, _ = np.linalg.svd(m_t, full_matrices=False)
        lbw.append(a_t[:, g_t >= thr])
        cosines.append(g_t)
    projectors, span_dims, svals = [], [], []
    for s in range(n_tasks):
        givers = [t for t in range(n_tasks) if not (exclude_self and t == s)]
        cols = np.concatenate([lbw[t] for t in givers], axis=1) if givers else np.zeros((m, 0))
        p, sv = np_span_projector(cols)
        projectors.append(p)
        span_dims.append(int(round(np.trace(p))))
        svals.append(sv)
    return {
        "projectors": np.stack(projectors),
        "cosines": cosines,
        "lbw_dims": np.array([b.shape[1] for b in lbw]),
        "span_dims": np.array(span_dims),
        "pretrained_dims": kept,
        "concat_svals": np.concatenate(svals) if svals else np.zeros(0),
    }


def ref_pact_matrix(
    w0,
    taus,
    *,
    pretrained_rank,
    task_rank,
    align_threshold,
    side,
    strength,
    exclude_self,
    pretrained_energy=None,
):
    """PACT subspace perspective on one matrix (float64). Returns ``(out (T, m, n), info)``.

    ``side='left'``: tau_s - strength P_L,s tau_s; ``'right'``: the same with W0^T,
    tau^T; ``'both'``: (I - strength P_L,s) tau_s (I - strength P_R,s), both
    projectors found from the input task vectors.
    """
    w0 = np.asarray(w0, np.float64)
    taus = np.asarray(taus, np.float64)
    m, n = w0.shape
    kw = dict(
        k=np_resolve_rank(pretrained_rank, m, n),
        r=np_resolve_rank(task_rank, m, n),
        energy=pretrained_energy,
        thr=align_threshold,
        exclude_self=exclude_self,
    )
    info = {}
    if side in ("left", "both"):
        info["left"] = ref_lbw_left(w0, taus, **kw)
    if side in ("right", "both"):
        info["right"] = ref_lbw_left(w0.T, np.transpose(taus, (0, 2, 1)), **kw)
    out = []
    for s in range(taus.shape[0]):
        x = taus[s].copy()
        if "left" in info:
            x = x - strength * info["left"]["projectors"][s] @ x
        if "right" in info:
            x = x - strength * x @ info["right"]["projectors"][s]
        out.append(x)
    out = np.stack(out)
    num = np.sum((taus - out) ** 2, axis=(1, 2))
    den = np.sum(taus**2, axis=(1, 2))
    info["energy_removed"] = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return out, info


def ref_scalar_flat(w0, taus, *, weight_fraction, anchor_fraction, strength, exclude_self):
    """PACT scalar perspective (DESIGN.md §1b) on a flattened leaf ``w0 (N,)``, ``taus (T, N)``."""
    w0 = np.asarray(w0, np.float64).ravel()
    taus = np.asarray(taus, np.float64).reshape(taus.shape[0], -1)
    n_tasks, size = taus.shape
    top = max(1, round(weight_fraction * size))
    anchor = max(1, round(anchor_fraction * size))
    mag0 = np.abs(w0)
    kth_largest = np.sort(mag0)[::-1][top - 1]
    important = (mag0 >= kth_largest) & (w0 != 0)
    lbw = []
    for t in range(n_tasks):
        mag = np.abs(taus[t])
        kth_smallest = np.sort(mag)[anchor - 1]
        lbw.append(important & (mag <= kth_smallest))
    out, masked_counts = [], []
    for s in range(n_tasks):
        mask = np.zeros(size, dtype=bool)
        for t in range(n_tasks):
            if exclude_self and t == s:
                continue
            mask |= lbw[t]
        out.append(taus[s] * (1.0 - strength * mask))
        masked_counts.append(int(mask.sum()))
    out = np.stack(out)
    stats = {
        "lbw_entries": np.array([int(x.sum()) for x in lbw]),
        "masked_entries": np.array(masked_counts),
    }
    return out, stats


def ref_tree(pretrained, stacked, leaf_fn, *, matrices_only: bool):
    """Applies a reference leaf by leaf; with ``matrices_only``, non-matrix leaves
    are returned unchanged and matrix leaves are seen through their matrix view."""
    flat0 = [leaf for _, leaf in jax.tree_util.tree_flatten_with_path(pretrained)[0]]
    flat, treedef = jax.tree_util.tree_flatten_with_path(stacked)
    out, infos = [], {}
    for (keypath, tau), w0 in zip(flat, flat0):
        path = np_path(keypath)
        tau = np.asarray(tau, np.float64)
        w0 = np.asarray(w0, np.float64)
        n_tasks, shape = tau.shape[0], tau.shape[1:]
        if matrices_only:
            if not np_is_matrix(path, shape):
                out.append(tau)
                continue
            m, n = np_matrix_shape(path, shape)
            res, info = leaf_fn(w0.reshape(m, n), tau.reshape(n_tasks, m, n))
        else:
            res, info = leaf_fn(w0.reshape(-1), tau.reshape(n_tasks, -1))
        out.append(res.reshape(tau.shape))
        infos[path] = info
    return jax.tree_util.tree_unflatten(treedef, out), infos


# ==========================================================================
# Test data


def np_orthonormal(rng: np.random.Generator, m: int, c: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((m, c)))
    return q * np.sign(np.diag(r))[None, :]


def np_with_spectrum(rng, m: int, n: int, s: np.ndarray) -> np.ndarray:
    p = len(s)
    return (np_orthonormal(rng, m, p) * s[None, :]) @ np_orthonormal(rng, n, p).T


def as_f32(x: np.ndarray) -> np.ndarray:
    """Rounds to float32 (what the library sees), kept as float64 for the references."""
    return np.asarray(x, np.float32).astype(np.float64)


@functools.lru_cache(maxsize=None)
def make_case(seed: int, shape: tuple[int, int], n_tasks: int, task_true_rank: int | None = None):
    """``W0 = U diag(10 * 0.85^i) V^T`` and task vectors ``0.1 * U_t diag(0.8^i) V_t^T``
    (full rank, or exactly rank ``task_true_rank``); every gap is >= 15 %."""
    rng = np.random.default_rng(seed)
    m, n = shape
    p = min(m, n)
    w0 = np_with_spectrum(rng, m, n, 10.0 * 0.85 ** np.arange(p))
    rank = p if task_true_rank is None else task_true_rank
    taus = np.stack([np_with_spectrum(rng, m, n, 0.1 * 0.8 ** np.arange(rank)) for _ in range(n_tasks)])
    return as_f32(w0), as_f32(taus)


def pick_threshold(cosine_lists, lo: float = 0.3, hi: float = 0.985, margin: float = 0.01) -> float:
    """A cosine threshold in the widest gap between two of the given cosines inside
    ``[lo, hi]`` (so that some cosines fall below it and thresholding matters)."""
    c = np.sort(np.concatenate([np.ravel(x) for x in cosine_lists]))
    inside = c[(c > lo) & (c < hi)]
    pts = inside if inside.size >= 2 else np.concatenate([[lo], inside, [hi]])
    i = int(np.argmax(np.diff(pts)))
    thr = float(np.round((pts[i] + pts[i + 1]) / 2, 4))
    closest = float(np.min(np.abs(c - thr)))
    assert closest > margin, f"test input ill-conditioned: a cosine lies within {closest:.2g} of the threshold {thr}"
    return thr


def threshold_for(w0, taus, *, pretrained_rank, task_rank, side, pretrained_energy=None) -> float:
    _, info = ref_pact_matrix(
        w0,
        taus,
        pretrained_rank=pretrained_rank,
        task_rank=task_rank,
        align_threshold=0.5,
        side=side,
        strength=1.0,
        exclude_self=False,
        pretrained_energy=pretrained_energy,
    )
    return pick_threshold([c for sd in ("left", "right") if sd in info for c in info[sd]["cosines"]])


def check_conditioning(info) -> None:
    """No singular value of a stacked LBW basis near the span tolerance (so that
    float32 and float64 agree on the span)."""
    for sd in ("left", "right"):
        if sd in info:
            sv = info[sd]["concat_svals"]
            bad = sv[(sv > 1e-6) & (sv < 1e-3)]
            assert bad.size == 0, f"test input ill-conditioned: stacked LBW bases have singular values {bad}"


def assert_close_per_task(got, want, taus, rel=REL, what=""):
    got = np.asarray(got, np.float64)
    for t in range(taus.shape[0]):
        err = np.linalg.norm(got[t] - want[t]) / np.linalg.norm(taus[t])
        assert err <= rel, f"{what}: task {t} differs from the NumPy reference by {err:.3g} (relative, > {rel})"


def one_leaf(w0, taus, name="layer/kernel"):
    """``{'layer': {'kernel': w0}}`` and the stacked task vectors, as float32 jax arrays."""
    outer, inner = name.split("/")
    return (
        {outer: {inner: jnp.asarray(w0, jnp.float32)}},
        {outer: {inner: jnp.asarray(taus, jnp.float32)}},
    )


# ==========================================================================
# 1. Subspace perspective against the NumPy reference

# (seed, shape, T, pretrained_rank, task_rank, side, exclude_self, strength)
SUBSPACE_CASES = [
    (0, TALL, 3, 10, 4, "left", True, 1.0),
    (1, WIDE, 2, 0.25, 0.15, "left", False, 0.5),  # 0.15 * 32 = 4.8 -> r = 5 (rounded, not floored)
    (2, TALL, 4, 0.2, 3, "right", True, 0.5),
    (3, WIDE, 3, 8, 0.1, "right", False, 1.0),
    (4, TALL, 2, 8, 3, "both", True, 1.0),
    (5, WIDE, 4, 0.25, 4, "both", False, 0.5),
    (6, TALL, 1, 0.25, 0.1, "left", False, 1.0),
    (7, WIDE, 3, 3, 6, "left", True, 0.5),  # k < r
    (8, TALL, 2, 0.15, 0.05, "both", False, 1.0),
]


def _case_id(case):
    seed, shape, t, k, r, side, excl, strength = case
    kind = "tall" if shape[0] > shape[1] else "wide"
    return f"{seed}-{kind}-T{t}-k{k}-r{r}-{side}-{'excl' if excl else 'all'}-s{strength}"


def run_case(case, **extra):
    seed, shape, t, k, r, side, excl, strength = case
    w0, taus = make_case(seed, shape, t)
    thr = threshold_for(w0, taus, pretrained_rank=k, task_rank=r, side=side)
    kw = dict(pretrained_rank=k, task_rank=r, align_threshold=thr, side=side, exclude_self=excl, strength=strength)
    kw.update(extra)
    want, info = ref_pact_matrix(w0, taus, **kw)
    check_conditioning(info)
    pre, stacked = one_leaf(w0, taus)
    got = pact_jax.pact(pre, stacked, **kw)
    return w0, taus, kw, got, want, info


@pytest.mark.parametrize("case", SUBSPACE_CASES, ids=_case_id)
def test_subspace_matches_numpy_reference(case):
    w0, taus, kw, got, want, info = run_case(case)
    got = got["layer"]["kernel"]
    assert got.shape == taus.shape and got.dtype == jnp.float32
    assert_close_per_task(got, want, taus, what=f"pact(subspace, {kw})")
    # Not vacuous: something is removed unless there is nothing to protect against.
    removed = np.linalg.norm(taus - want)
    if kw["exclude_self"] and taus.shape[0] == 1:
        assert removed == 0.0
    else:
        assert removed > 1e-3 * np.linalg.norm(taus), "test case removes nothing: make it stronger"


def test_subspace_statistics_match_reference():
    case = SUBSPACE_CASES[4]  # 'both': left and right statistics
    w0, taus, kw, _, want, info = run_case(case)
    pre, stacked = one_leaf(w0, taus)
    stats = pact_jax.lbw_statistics(pre, stacked, **kw)
    assert set(stats) == {"layer/kernel"}
    st = stats["layer/kernel"]
    assert set(st) == {"left", "right", "energy_removed"}
    t = taus.shape[0]
    m, n = w0.shape
    k = np_resolve_rank(kw["pretrained_rank"], m, n)
    for side in ("left", "right"):
        s, ref = st[side], info[side]
        assert set(s) == {"pretrained_dims", "task_dims", "reliance_dims", "protect_dims"}
        chex.assert_shape(s["reliance_dims"], (t,))
        chex.assert_shape(s["protect_dims"], (t,))
        assert int(s["pretrained_dims"]) == ref["pretrained_dims"] == k
        np.testing.assert_array_equal(s["reliance_dims"], ref["lbw_dims"], err_msg=f"{side} reliance_dims")
        np.testing.assert_array_equal(s["protect_dims"], ref["span_dims"], err_msg=f"{side} protect_dims")
    chex.assert_shape(st["energy_removed"], (t,))
    np.testing.assert_allclose(st["energy_removed"], info["energy_removed"], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("energy", [0.5, 0.75, 0.87])
def test_pretrained_energy_matches_reference(energy):
    """The energy fraction is of the whole ||W0||_F^2, not of the top-k energy:
    k = 6 holds ~86 % of it, so 0.5 / 0.75 / 0.87 keep 3 / 5 / 6 directions
    (2 / 4 / 5 if the fraction were relative to the top-k energy)."""
    w0, taus = make_case(10, TALL, 3)
    k, r = 6, 4
    # Energy targets far from a boundary of the cumulative energy of W0.
    s0 = np.linalg.svd(w0, compute_uv=False)
    frac = np.cumsum(s0**2) / np.sum(s0**2)
    assert np.min(np.abs(frac - energy)) > 0.01
    assert np.min(np.abs(frac * np.sum(s0**2) / np.sum(s0[:k] ** 2) - energy)) > 0.01
    thr = threshold_for(w0, taus, pretrained_rank=k, task_rank=r, side="left", pretrained_energy=energy)
    kw = dict(
        pretrained_rank=k,
        task_rank=r,
        pretrained_energy=energy,
        align_threshold=thr,
        side="left",
        exclude_self=True,
        strength=1.0,
    )
    want, info = ref_pact_matrix(w0, taus, **kw)
    check_conditioning(info)
    expected_dims = min(k, int(np.nonzero(frac >= energy)[0][0]) + 1)
    assert info["left"]["pretrained_dims"] == expected_dims == {0.5: 3, 0.75: 5, 0.87: 6}[energy]
    pre, stacked = one_leaf(w0, taus)
    got = pact_jax.pact(pre, stacked, **kw)["layer"]["kernel"]
    assert_close_per_task(got, want, taus, what=f"pact(pretrained_energy={energy})")
    stats = pact_jax.lbw_statistics(pre, stacked, **kw)["layer/kernel"]["left"]
    assert int(stats["pretrained_dims"]) == expected_dims
    np.testing.assert_array_equal(stats["reliance_dims"], info["left"]["lbw_dims"])


# ==========================================================================
# 2. Scalar-weight perspective against the NumPy reference


def scalar_tree(seed: int, n_tasks: int):
    """Leaves with exact zeros in W0 and many ties in |tau| (values on a grid)."""
    rng = np.random.default_rng(seed)
    shapes = {"w": (10, 12), "b": (7,), "c": (3, 3, 2, 2)}
    pre, stacked = {}, {}
    for name, shape in shapes.items():
        w0 = rng.standard_normal(shape)
        w0[rng.random(shape) < 0.15] = 0.0
        taus = np.round(rng.standard_normal((n_tasks, *shape)) * 8) / 80  # ties, and exact zeros
        pre[name] = jnp.asarray(w0, jnp.float32)
        stacked[name] = jnp.asarray(taus, jnp.float32)
    return pre, stacked


# (seed, T, weight_fraction, anchor_fraction, strength, exclude_self)
SCALAR_CASES = [
    (0, 3, 0.1, 0.5, 1.0, True),
    (1, 2, 0.3, 0.2, 0.5, False),
    (2, 1, 0.5, 0.5, 1.0, True),
    (3, 1, 0.5, 0.5, 0.5, False),
    (4, 3, 1.0, 1.0, 1.0, False),  # every non-zero W0 entry important, everything anchored
    (5, 4, 0.2, 0.7, 0.5, True),
]


@pytest.mark.parametrize("case", SCALAR_CASES, ids=lambda c: f"{c[0]}-T{c[1]}-q{c[2]}-a{c[3]}-s{c[4]}-{c[5]}")
def test_scalar_matches_numpy_reference(case):
    seed, t, wf, af, strength, excl = case
    pre, stacked = scalar_tree(seed, t)
    kw = dict(weight_fraction=wf, anchor_fraction=af, strength=strength, exclude_self=excl)
    want, infos = ref_tree(
        pre, stacked, lambda w0, tau: ref_scalar_flat(w0, tau, **kw), matrices_only=False
    )
    got = pact_jax.pact(pre, stacked, perspective="scalar", **kw)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, stacked)
    chex.assert_trees_all_close(
        jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), got),
        want,
        rtol=1e-6,
        atol=1e-7,
        custom_message=f"pact(scalar, {kw}) disagrees with the NumPy reference",
    )
    stats = pact_jax.lbw_statistics(pre, stacked, perspective="scalar", **kw)
    assert set(stats) == {"w", "b", "c"}
    for path, ref in infos.items():
        st = stats[path]
        assert set(st) == {"lbw_entries", "masked_entries", "energy_removed"}
        for name in ("lbw_entries", "masked_entries", "energy_removed"):
            chex.assert_shape(st[name], (t,))
        np.testing.assert_array_equal(st["lbw_entries"], ref["lbw_entries"], err_msg=f"{path} lbw_entries")
        np.testing.assert_array_equal(st["masked_entries"], ref["masked_entries"], err_msg=f"{path} masked_entries")
    if wf == 1.0:  # zeros of W0 are never LBW even when every entry is in the top fraction
        for name in ("w", "b", "c"):
            nonzero = int(np.count_nonzero(np.asarray(pre[name])))
            np.testing.assert_array_equal(stats[name]["lbw_entries"], [nonzero] * t)


def test_scalar_hand_computed_example():
    w0 = {"x": jnp.asarray([3.0, 0.0, -2.0, 1.0])}
    tau = {"x": jnp.asarray([[0.1, 5.0, 0.5, 0.2], [1.0, 1.0, 0.05, 1.0]])}
    # top 2 of |W0| -> entries 0, 2. Task 0 anchored (2 smallest): entries 0, 3 -> LBW {0}.
    # Task 1: 2nd smallest |tau| is 1.0, ties count -> all anchored -> LBW {0, 2}.
    got = pact_jax.pact(w0, tau, perspective="scalar", weight_fraction=0.5, anchor_fraction=0.5)
    np.testing.assert_allclose(np.asarray(got["x"]), [[0.0, 5.0, 0.0, 0.2], [0.0, 1.0, 0.05, 1.0]])
    got = pact_jax.pact(
        w0, tau, perspective="scalar", weight_fraction=0.5, anchor_fraction=0.5, exclude_self=False, strength=0.5
    )
    np.testing.assert_allclose(np.asarray(got["x"]), [[0.05, 5.0, 0.25, 0.2], [0.5, 1.0, 0.025, 1.0]])


# ==========================================================================
# 3. Properties


def property_tree(dtype=jnp.float32, tau_dtype=jnp.float32, n_tasks: int = 2, seed: int = 0):
    """Nested dict/list tree with Dense, DenseGeneral (3-D kernel, 2-D bias), Conv,
    1-D bias and 1-D scale leaves."""
    rng = np.random.default_rng(seed)
    shapes = {
        "dense": {"kernel": (12, 10), "bias": (10,)},
        "attn": {"query": {"kernel": (10, 2, 4), "bias": (2, 4)}},
        "blocks": [{"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}}, {"norm": {"scale": (4,)}}],
    }
    pre = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s), dtype), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    stacked = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal((n_tasks, *s)), tau_dtype),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    return pre, stacked


PROPERTY_KW = dict(pretrained_rank=0.5, task_rank=0.25, align_threshold=0.5)
MATRIX_PATHS = {"dense/kernel", "attn/query/kernel", "blocks/0/conv/kernel"}


def _by_path(tree):
    return {np_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("perspective", ["subspace", "scalar"])
def test_strength_zero_is_the_identity(perspective):
    pre, stacked = property_tree(n_tasks=3)
    got = pact_jax.pact(pre, stacked, perspective=perspective, strength=0.0, side="both", **PROPERTY_KW)
    chex.assert_trees_all_close(got, stacked, rtol=0, atol=0)


@pytest.mark.parametrize("perspective", ["subspace", "scalar"])
def test_default_strength_depends_on_the_perspective(perspective):
    from pact_jax.pact import DEFAULT_STRENGTH

    assert DEFAULT_STRENGTH == {"subspace": 1.0, "scalar": 1.0}
    pre, stacked = property_tree(n_tasks=3)
    kw = dict(perspective=perspective, **PROPERTY_KW)
    explicit = pact_jax.pact(pre, stacked, strength=DEFAULT_STRENGTH[perspective], **kw)
    chex.assert_trees_all_close(pact_jax.pact(pre, stacked, **kw), explicit, rtol=0, atol=0)
    other = pact_jax.pact(pre, stacked, strength=0.5, **kw)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(other), jax.tree_util.tree_leaves(explicit)))


def test_single_task_with_exclude_self_is_the_identity():
    w0, taus = make_case(6, TALL, 1)
    pre, stacked = one_leaf(w0, taus)
    got = pact_jax.pact(pre, stacked, pretrained_rank=10, task_rank=4, align_threshold=0.5, exclude_self=True)
    chex.assert_trees_all_close(got, stacked, rtol=0, atol=0)


def _t1_setting(seed, true_rank=None):
    w0, taus = make_case(seed, TALL, 1, true_rank)
    kw = dict(pretrained_rank=10, task_rank=4, exclude_self=False)
    thr = threshold_for(w0, taus, side="both", pretrained_rank=10, task_rank=4)
    return w0, taus, dict(kw, align_threshold=thr)


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_pact_is_idempotent_for_one_task_without_exclude_self(side):
    """T = 1, exclude_self=False, strength=1: L ⟂ U_1 (the task core), so
    (I - P) tau keeps tau's top-r singular triplets, the second pass finds the
    same LBW basis, and (I - P)^2 = I - P: pact(pact(tau)) == pact(tau)."""
    w0, taus, kw = _t1_setting(11)
    pre, stacked = one_leaf(w0, taus)
    once = pact_jax.pact(pre, stacked, side=side, strength=1.0, **kw)
    twice = pact_jax.pact(pre, once, side=side, strength=1.0, **kw)
    removed = np.linalg.norm(taus - np.asarray(once["layer"]["kernel"]))
    assert removed > 1e-3 * np.linalg.norm(taus), "vacuous: nothing removed"
    chex.assert_trees_all_close(
        twice, once, atol=1e-5 * float(np.abs(taus).max()), custom_message="pact applied twice differs from once"
    )


def test_partial_strength_composes_like_a_projector():
    """Same setting, left side: (I - aP)(I - bP) = I - (a + b - ab) P, so two
    passes at strength 0.5 remove 0.75 of what one pass at strength 1 removes;
    and the output is affine in the strength."""
    w0, taus, kw = _t1_setting(11)
    pre, stacked = one_leaf(w0, taus)
    full = np.asarray(pact_jax.pact(pre, stacked, side="left", strength=1.0, **kw)["layer"]["kernel"])
    half_tree = pact_jax.pact(pre, stacked, side="left", strength=0.5, **kw)
    half = np.asarray(half_tree["layer"]["kernel"])
    twice = np.asarray(pact_jax.pact(pre, half_tree, side="left", strength=0.5, **kw)["layer"]["kernel"])
    removed = taus - full  # P tau
    atol = 1e-5 * float(np.abs(taus).max())
    np.testing.assert_allclose(half, taus - 0.5 * removed, atol=atol, err_msg="output not affine in strength")
    np.testing.assert_allclose(twice, taus - 0.75 * removed, atol=atol, err_msg="two half passes != 0.75 P")


@pytest.mark.parametrize("side", ["left", "both"])
def test_single_task_keeps_its_own_core(side):
    """An exactly rank-r task vector lies in its own core U_t (and V_t), which
    is orthogonal to its LBW basis: PACT leaves it unchanged even with
    exclude_self=False."""
    w0, taus, kw = _t1_setting(12, true_rank=4)
    pre, stacked = one_leaf(w0, taus)
    got = pact_jax.pact(pre, stacked, side=side, strength=1.0, **kw)
    _, info = ref_pact_matrix(w0, taus, side=side, strength=1.0, **kw)
    assert info["left"]["lbw_dims"][0] > 0, "vacuous: no LBW directions"
    chex.assert_trees_all_close(got, stacked, atol=1e-5 * float(np.abs(taus).max()))


def test_removed_part_lies_in_the_lbw_span_and_output_is_orthogonal_to_it():
    """With strength 1 (left side), out_s = (I - P_s) tau_s: P_s out_s = 0 and
    P_s (tau_s - out_s) = tau_s - out_s, for the reference projector P_s (itself
    symmetric and idempotent)."""
    case = SUBSPACE_CASES[0]
    w0, taus, kw, got, _, info = run_case(case)
    out = np.asarray(got["layer"]["kernel"], np.float64)
    scale = np.linalg.norm(taus, axis=(1, 2))
    for s in range(taus.shape[0]):
        p = info["left"]["projectors"][s]
        np.testing.assert_allclose(p, p.T, atol=1e-10)
        np.testing.assert_allclose(p @ p, p, atol=1e-10)
        assert np.linalg.norm(p @ out[s]) <= 1e-4 * scale[s], "output keeps a component in the LBW span"
        removed = taus[s] - out[s]
        assert np.linalg.norm(removed) > 1e-3 * scale[s]
        assert np.linalg.norm(p @ removed - removed) <= 1e-4 * scale[s], "removed part leaves the LBW span"


def test_structure_shapes_and_dtypes_are_kept():
    # bfloat16 parameters with float32 task vectors (what task_vectors returns).
    pre, stacked = property_tree(dtype=jnp.bfloat16, tau_dtype=jnp.float32)
    for perspective in ("subspace", "scalar"):
        got = pact_jax.pact(pre, stacked, perspective=perspective, side="both", **PROPERTY_KW)
        chex.assert_trees_all_equal_structs(got, stacked)
        chex.assert_trees_all_equal_shapes_and_dtypes(got, stacked)
    # bfloat16 task vectors stay bfloat16.
    pre, stacked16 = property_tree(dtype=jnp.bfloat16, tau_dtype=jnp.bfloat16)
    got = pact_jax.pact(pre, stacked16, side="left", **PROPERTY_KW)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, stacked16)


def test_subspace_leaves_non_matrix_leaves_untouched():
    pre, stacked = property_tree(n_tasks=3)
    got = _by_path(pact_jax.pact(pre, stacked, side="both", **PROPERTY_KW))
    ref = _by_path(stacked)
    for path in ref:
        if path in MATRIX_PATHS:
            assert not np.allclose(got[path], ref[path]), f"matrix leaf {path} unchanged: vacuous test"
        else:
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(ref[path]), err_msg=path)


@pytest.mark.parametrize("perspective", ["subspace", "scalar"])
def test_frozen_and_averaged_leaves_are_untouched(perspective):
    pre, stacked = property_tree(n_tasks=3)
    rules = LeafRules(freeze=r"^dense/", average=r"conv/kernel$")
    got = _by_path(pact_jax.pact(pre, stacked, perspective=perspective, side="both", rules=rules, **PROPERTY_KW))
    ref = _by_path(stacked)
    untouched = {"dense/kernel", "dense/bias", "blocks/0/conv/kernel"}
    for path in untouched:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(ref[path]), err_msg=path)
    assert not np.allclose(got["attn/query/kernel"], ref["attn/query/kernel"]), "nothing changed: vacuous test"


def test_randomized_svd_is_close_to_exact_on_low_rank_plus_noise():
    rng = np.random.default_rng(20)
    m, n = TALL
    w0 = as_f32(np_with_spectrum(rng, m, n, 10.0 * 0.85 ** np.arange(n)))
    taus = as_f32(
        np.stack(
            [np_with_spectrum(rng, m, n, np.geomspace(1.0, 0.3, 6)) + 1e-3 * rng.standard_normal((m, n)) for _ in range(3)]
        )
    )
    k, r = 10, 4
    thr = threshold_for(w0, taus, pretrained_rank=k, task_rank=r, side="left")
    kw = dict(pretrained_rank=k, task_rank=r, align_threshold=thr, side="left", exclude_self=True)
    pre, stacked = one_leaf(w0, taus)
    exact = np.asarray(pact_jax.pact(pre, stacked, **kw)["layer"]["kernel"])
    key = jax.random.key(0)
    rand = pact_jax.pact(pre, stacked, svd="randomized", key=key, power_iters=2, oversample=10, **kw)
    rand = np.asarray(rand["layer"]["kernel"])
    assert_close_per_task(rand, exact, taus, rel=1e-3, what="svd='randomized' vs 'exact'")
    assert np.linalg.norm(taus - exact) > 1e-3 * np.linalg.norm(taus), "vacuous: nothing removed"
    again = pact_jax.pact(pre, stacked, svd="randomized", key=key, power_iters=2, oversample=10, **kw)
    np.testing.assert_array_equal(np.asarray(again["layer"]["kernel"]), rand, err_msg="not deterministic per key")


def test_randomized_without_key_raises():
    pre, stacked = property_tree()
    with pytest.raises(ValueError, match="key"):
        pact_jax.pact(pre, stacked, svd="randomized")


# ==========================================================================
# 4. A tiny Flax model


class TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, 8, 8, 3)
        h = nn.Conv(8, (3, 3))(x)  # Conv_0: kernel (3, 3, 3, 8) -> matrix (27, 8)
        h = nn.relu(h).mean(axis=(1, 2))
        h = nn.Dense(16)(h)  # Dense_0: (8, 16)
        h = nn.Dense(12)(nn.relu(h))  # Dense_1: (16, 12)
        return nn.Dense(4)(h)  # Dense_2: (12, 4)


FLAX_MATRICES = {
    "params/Conv_0/kernel": (27, 8),
    "params/Dense_0/kernel": (8, 16),
    "params/Dense_1/kernel": (16, 12),
    "params/Dense_2/kernel": (12, 4),
}


@functools.lru_cache(maxsize=None)
def flax_setup(n_tasks: int = 3):
    """Pre-trained params, and fine-tuned copies = params + small random low-rank
    updates (rank min(m, n) // 2, distinct singular values) + small bias updates."""
    pre = TinyCNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    rng = np.random.default_rng(30)
    fts = []
    for _ in range(n_tasks):

        def update(keypath, w):
            path = np_path(keypath)
            if path in FLAX_MATRICES:
                m, n = FLAX_MATRICES[path]
                rank = max(2, min(m, n) // 2)
                d = np_with_spectrum(rng, m, n, 0.05 * 0.7 ** np.arange(rank)).reshape(w.shape)
            else:
                d = 0.01 * rng.standard_normal(w.shape)
            return w + jnp.asarray(d, w.dtype)

        fts.append(jax.tree_util.tree_map_with_path(update, pre))
    return pre, fts, pact_jax.task_vectors(pre, fts)


FLAX_KW = dict(pretrained_rank=0.5, task_rank=0.25, side="left", exclude_self=True, strength=1.0)


def _flax_threshold(pre, stacked):
    cosines = []
    _, infos = ref_tree(
        pre,
        stacked,
        lambda w0, tau: ref_pact_matrix(w0, tau, **dict(FLAX_KW, align_threshold=0.5)),
        matrices_only=True,
    )
    for info in infos.values():
        cosines += info["left"]["cosines"]
    return pick_threshold(cosines, margin=0.005)


def test_flax_model_subspace_matches_reference_and_statistics():
    pre, _, stacked = flax_setup()
    shapes = {p: leaf.shape for p, leaf in _by_path(pre).items()}
    for path, view in FLAX_MATRICES.items():
        assert np_matrix_shape(path, shapes[path]) == view
        assert pact_jax.DEFAULT_RULES.matrix_shape(path, shapes[path]) == view
    thr = _flax_threshold(pre, stacked)
    kw = dict(FLAX_KW, align_threshold=thr)
    got = pact_jax.pact(pre, stacked, **kw)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, stacked)
    want, infos = ref_tree(pre, stacked, lambda w0, tau: ref_pact_matrix(w0, tau, **kw), matrices_only=True)
    got_p, want_p, tau_p = _by_path(got), _by_path(want), _by_path(stacked)
    for path in tau_p:
        tau = np.asarray(tau_p[path], np.float64)
        if path in FLAX_MATRICES:
            check_conditioning(infos[path])
            t = tau.shape[0]
            assert_close_per_task(
                np.asarray(got_p[path]).reshape(t, -1), want_p[path].reshape(t, -1), tau.reshape(t, -1),
                rel=1e-3, what=path,
            )
        else:  # biases: untouched
            np.testing.assert_array_equal(np.asarray(got_p[path]), np.asarray(tau_p[path]), err_msg=path)
    assert sum(np.linalg.norm(tau_p[p] - np.asarray(got_p[p])) for p in FLAX_MATRICES) > 0, "vacuous"

    stats = pact_jax.lbw_statistics(pre, stacked, **kw)
    assert set(stats) == set(FLAX_MATRICES)
    for path, (m, n) in FLAX_MATRICES.items():
        st, ref = stats[path], infos[path]
        assert set(st) == {"left", "energy_removed"}
        k = np_resolve_rank(kw["pretrained_rank"], m, n)
        chex.assert_shape(st["left"]["reliance_dims"], (3,))
        chex.assert_shape(st["left"]["protect_dims"], (3,))
        chex.assert_shape(st["energy_removed"], (3,))
        assert int(st["left"]["pretrained_dims"]) == k
        np.testing.assert_array_equal(st["left"]["reliance_dims"], ref["left"]["lbw_dims"], err_msg=path)
        np.testing.assert_array_equal(st["left"]["protect_dims"], ref["left"]["span_dims"], err_msg=path)
        np.testing.assert_allclose(st["energy_removed"], ref["energy_removed"], rtol=2e-3, atol=1e-5, err_msg=path)


def test_flax_model_scalar_perspective():
    pre, _, stacked = flax_setup()
    kw = dict(weight_fraction=0.2, anchor_fraction=0.5, strength=1.0, exclude_self=True)
    got = pact_jax.pact(pre, stacked, perspective="scalar", **kw)
    want, infos = ref_tree(pre, stacked, lambda w0, tau: ref_scalar_flat(w0, tau, **kw), matrices_only=False)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, stacked)
    chex.assert_trees_all_close(
        jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), got), want, rtol=1e-6, atol=1e-8
    )
    stats = pact_jax.lbw_statistics(pre, stacked, perspective="scalar", **kw)
    assert set(stats) == set(_by_path(pre))  # every leaf, biases included
    for path, ref in infos.items():
        np.testing.assert_array_equal(stats[path]["lbw_entries"], ref["lbw_entries"], err_msg=path)
        np.testing.assert_array_equal(stats[path]["masked_entries"], ref["masked_entries"], err_msg=path)


def test_lbw_statistics_rejects_unknown_keywords():
    pre, _, stacked = flax_setup()
    with pytest.raises(TypeError, match="unknown"):
        pact_jax.lbw_statistics(pre, stacked, pretrained_rnak=0.5)


# ==========================================================================
# 5. Bad input


def test_int_task_rank_is_capped_at_the_matrix_rank():
    """The authors' k = min(k_per_task, min(m, n)): the default 10 works on small matrices."""
    w0, taus = make_case(0, TALL, 2)
    pre, stacked = one_leaf(w0, taus)
    capped = pact_jax.pact(pre, stacked, task_rank=41, pretrained_rank=8)
    full = pact_jax.pact(pre, stacked, task_rank=40, pretrained_rank=8)
    chex.assert_trees_all_close(capped, full)
    st = pact_jax.lbw_statistics(pre, stacked, task_rank=41, pretrained_rank=8)["layer/kernel"]["left"]
    np.testing.assert_array_equal(st["task_dims"], [40, 40])


@pytest.mark.parametrize("name", ["pretrained_rank"])
def test_int_rank_too_large_names_the_leaf(name):
    pre, _, stacked = flax_setup()
    # Conv_0 is seen as (27, 8): 9 is too large for it although its raw dims allow it.
    with pytest.raises(PactInputError, match=r"params/Conv_0/kernel") as err:
        pact_jax.pact(pre, stacked, **{name: 9})
    assert name in str(err.value)
    w0, taus = make_case(0, TALL, 2)
    pre1, stacked1 = one_leaf(w0, taus, name="enc/proj")
    with pytest.raises(PactInputError, match=r"enc/proj"):
        pact_jax.pact(pre1, stacked1, **{name: 41})
    with pytest.raises(PactInputError, match=r"enc/proj"):
        pact_jax.pact(pre1, stacked1, side="right", **{name: 41})


def test_mismatched_structure_raises():
    pre, stacked = property_tree()
    missing = {k: v for k, v in stacked.items() if k != "attn"}
    with pytest.raises(PactInputError):
        pact_jax.pact(pre, missing)
    extra = dict(stacked, extra={"kernel": jnp.zeros((2, 3, 3))})
    with pytest.raises(PactInputError):
        pact_jax.pact(pre, extra)
    unstacked = jax.tree_util.tree_map(lambda x: x[0], stacked)  # no task axis
    with pytest.raises(PactInputError):
        pact_jax.pact(pre, unstacked)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_pretrained_names_the_leaf(bad):
    pre, stacked = property_tree()
    pre = jax.tree_util.tree_map(lambda x: x, pre)
    pre["attn"]["query"]["kernel"] = pre["attn"]["query"]["kernel"].at[1, 0, 2].set(bad)
    with pytest.raises(PactInputError, match=r"attn/query/kernel"):
        pact_jax.pact(pre, stacked)
    with pytest.raises(PactInputError, match=r"attn/query/kernel"):
        pact_jax.pact(pre, stacked, perspective="scalar")


def test_non_finite_task_vectors_name_the_leaf():
    pre, stacked = property_tree()
    stacked["dense"]["bias"] = stacked["dense"]["bias"].at[1, 3].set(np.nan)
    with pytest.raises(PactInputError, match=r"dense/bias"):
        pact_jax.pact(pre, stacked)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(align_threshold=0.0),
        dict(align_threshold=-0.2),
        dict(align_threshold=1.5),
        dict(strength=-0.1),
        dict(strength=1.01),
        dict(side="top"),
        dict(perspective="vector"),
        dict(svd="qr"),
        dict(weight_fraction=0.0, perspective="scalar"),
        dict(anchor_fraction=1.5, perspective="scalar"),
        dict(pretrained_energy=0.0),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_bad_hyperparameters_raise_value_error(kwargs):
    pre, stacked = property_tree()
    with pytest.raises(ValueError):
        pact_jax.pact(pre, stacked, **kwargs)
    with pytest.raises(ValueError):
        pact_jax.lbw_statistics(pre, stacked, **kwargs)


@pytest.mark.parametrize("value", [0, 1.5, -0.1, True])
def test_bad_rank_values_raise(value):
    pre, stacked = property_tree()
    with pytest.raises(PactInputError):
        pact_jax.pact(pre, stacked, pretrained_rank=value)
