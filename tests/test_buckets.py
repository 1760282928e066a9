"""Shape buckets: one compile per distinct shape; bucketed == per-leaf loop."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

import pact_jax
from pact_jax import buckets, merges
import importlib

from pact_jax import subspace


def _tree(key, shapes):
    keys = jax.random.split(key, len(shapes))
    return {f"layer_{i}": {"kernel": jax.random.normal(k, s)} for i, (k, s) in enumerate(zip(keys, shapes))}


def test_run_bucketed_compiles_once_per_shape():
    def kernel(x, *, scale):
        return scale * x.sum(0)

    shapes = [(3, 5), (3, 5), (4, 5), (3, 5), (4, 5), (2, 7)]
    jobs = [((jnp.ones(s),), {"scale": 2.0}) for s in shapes]
    out = buckets.run_bucketed(kernel, jobs)
    assert buckets.compile_count(kernel) == 3
    for (args, _), res in zip(jobs, out):
        chex.assert_trees_all_close(res, 2.0 * args[0].sum(0))
    buckets.run_bucketed(kernel, jobs)  # a second merge reuses every executable
    assert buckets.compile_count(kernel) == 3


def test_mergers_and_pact_compile_once_per_distinct_shape():
    # Shapes no other test uses, so the global jit caches start empty for them.
    shapes = [(37, 23), (37, 23), (23, 37), (37, 23), (29, 11), (23, 37)]
    pre = _tree(jax.random.key(0), shapes)
    fts = [jax.tree_util.tree_map(lambda x, i=i: x + 0.1 * jax.random.normal(jax.random.key(i), x.shape), pre) for i in range(3)]
    stacked = pact_jax.task_vectors(pre, fts)
    distinct = len(set(shapes))
    for merger, kernel in [(merges.tsv, merges._tsv_kernel), (merges.iso_c, merges._iso_c_kernel)]:
        before = buckets.compile_count(kernel)
        merger(stacked)
        merger(stacked)
        assert buckets.compile_count(kernel) - before == distinct
    before = buckets.compile_count(subspace.pact_kernel)
    pact_jax.pact(pre, stacked, task_rank=3, align_threshold=0.8125)
    assert buckets.compile_count(subspace.pact_kernel) - before == distinct


def test_bucketed_equals_per_leaf_loop():
    shapes = [(12, 8), (12, 8), (8, 12), (12, 8)]
    pre = _tree(jax.random.key(1), shapes)
    fts = [jax.tree_util.tree_map(lambda x, i=i: x + 0.1 * jax.random.normal(jax.random.key(10 + i), x.shape), pre) for i in range(4)]
    stacked = pact_jax.task_vectors(pre, fts)
    steps = {
        "tsv": merges.tsv,
        "iso_cts": merges.iso_cts,
        "ties": functools.partial(merges.ties, density=0.3),
        "pact": lambda s: pact_jax.pact(pre, s, task_rank=2),
    }
    for name, fn in steps.items():
        together = fn(stacked)
        for layer in pre:
            if name == "pact":
                alone = pact_jax.pact({layer: pre[layer]}, {layer: stacked[layer]}, task_rank=2)
            else:
                alone = fn({layer: stacked[layer]})
            chex.assert_trees_all_close(together[layer], alone[layer], atol=1e-5, custom_message=name)


# A float32 384 x 380 matrix on which LAPACK's divide-and-conquer SVD (gesdd, jnp.linalg.svd on CPU)
# returns NaN without an error: TSV-M's concatenation of the PACT-filtered bases of a real merge
# (benchmarks.vision_suite, seed 0, layer_10/attention/query/kernel; 185 non-zero columns, rank 83,
# singular values sqrt(5) repeated). Stored as its non-zero columns.
def _gesdd_failure() -> jnp.ndarray:
    import pathlib

    import numpy as np

    d = np.load(pathlib.Path(__file__).parent / "data" / "gesdd_nan.npz")
    x = np.zeros(tuple(d["shape"]), np.float32)
    x[:, d["index"]] = d["cols"]
    return jnp.asarray(x)


def test_robust_svd_matches_default_and_survives_the_gesdd_failure():
    import numpy as np

    from pact_jax import linalg

    x = jax.random.normal(jax.random.key(0), (3, 40, 30))
    u, s, vh = jax.jit(linalg.svd)(x)
    with linalg.robust_svd():
        ur, sr, vhr = jax.jit(lambda a: linalg.svd(a))(x)
    chex.assert_trees_all_close(sr, s, atol=1e-5)
    chex.assert_trees_all_close(ur * sr[:, None, :] @ vhr, u * s[:, None, :] @ vh, atol=1e-4)

    bad = _gesdd_failure()
    with linalg.robust_svd():
        ur, sr, vhr = jax.jit(lambda a: linalg.svd(a))(bad)
    assert np.isfinite(np.asarray(ur)).all() and np.isfinite(np.asarray(vhr)).all()
    ref = np.linalg.svd(np.asarray(bad, np.float64), compute_uv=False)
    np.testing.assert_allclose(np.asarray(sr), ref, atol=1e-5)


def test_run_bucketed_retries_rows_whose_output_is_not_finite():
    import numpy as np

    from pact_jax import linalg

    # The jaxlib of this writing fails on the stored matrix; the bucket's other row does not.
    bad, good = _gesdd_failure(), jax.random.normal(jax.random.key(1), (384, 380))
    out = buckets.run_bucketed(linalg.polar, [((bad,), {}), ((good,), {})])
    assert all(np.isfinite(np.asarray(o)).all() for o in out)
    with linalg.robust_svd():
        want = jax.jit(lambda a: linalg.polar(a))(bad)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(jax.jit(linalg.polar)(good)), atol=1e-5)

    # The mechanism on its own: a kernel that fails unless traced under robust_svd; only failed rows rerun.
    def flaky(tau):
        return tau.sum(0) * (1.0 if linalg._ROBUST.get() else jnp.where(tau[0, 0] > 0, jnp.nan, 1.0))

    taus = [jnp.full((2, 3), v) for v in (1.0, -1.0, 2.0)]
    out = buckets.run_bucketed(flaky, [((t,), {}) for t in taus])
    chex.assert_trees_all_close(out, [t.sum(0) for t in taus])
    # A non-finite input is the caller's, not retried.
    out = buckets.run_bucketed(flaky, [((jnp.full((2, 3), jnp.nan),), {})])
    assert np.isnan(np.asarray(out[0])).all()
