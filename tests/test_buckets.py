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
