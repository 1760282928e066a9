"""pact_jax.chain: composition, jit, keys and rules."""

from __future__ import annotations

import functools

import chex
import jax
import pytest

import pact_jax
from pact_jax import merges


def test_chain_equals_manual_composition(tiny_models):
    pre, fts = tiny_models
    step = functools.partial(pact_jax.pact, task_rank=2, pretrained_rank=4)
    merge = pact_jax.chain(step, merges.tsv, alpha=0.7)
    stacked = pact_jax.task_vectors(pre, fts)
    expected = pact_jax.apply_delta(pre, merges.tsv(step(pre, stacked)), 0.7)
    chex.assert_trees_all_close(merge(pre, fts), expected, atol=1e-6)


def test_jit_end_to_end_matches_eager(tiny_models):
    pre, fts = tiny_models
    merge = pact_jax.chain(
        functools.partial(pact_jax.pact, svd="randomized", task_rank=2),
        merges.dare,
        functools.partial(merges.ties, density=0.5),
        alpha=0.5,
    )
    key = jax.random.key(3)
    eager = merge(pre, fts, key=key)
    jitted = jax.jit(merge)(pre, fts, key=key)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5)
    chex.assert_trees_all_equal_dtypes(jitted, pre)


def test_key_is_required_by_dare_and_changes_result(tiny_models):
    pre, fts = tiny_models
    merge = pact_jax.chain(merges.dare, merges.task_arithmetic)
    with pytest.raises(ValueError, match="dare.*PRNG key"):
        merge(pre, fts)
    a = merge(pre, fts, key=jax.random.key(0))
    chex.assert_trees_all_close(a, merge(pre, fts, key=jax.random.key(0)))
    b = merge(pre, fts, key=jax.random.key(1))
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(a, b)


def test_rules_reach_every_step(tiny_models):
    pre, fts = tiny_models
    rules = pact_jax.LeafRules(freeze=r"^params/head/", average=r"norm")
    merge = pact_jax.chain(pact_jax.pact, merges.tsv, alpha=1.0, rules=rules)
    out = merge(pre, fts)
    chex.assert_trees_all_close(out["params"]["head"], pre["params"]["head"])
    mean_norm = jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *[f["params"]["norm"] for f in fts])
    chex.assert_trees_all_close(out["params"]["norm"], mean_norm, atol=1e-6)


def test_delta_and_alpha_override(tiny_models):
    pre, fts = tiny_models
    merge = pact_jax.chain(merges.iso_c, alpha=1.0)
    delta = merge.delta(pre, fts)
    chex.assert_trees_all_close(merge(pre, fts, alpha=0.3), pact_jax.apply_delta(pre, delta, 0.3), atol=1e-6)


def test_single_task_arithmetic_returns_the_finetuned_model(tiny_models):
    pre, fts = tiny_models
    out = pact_jax.chain(merges.task_arithmetic)(pre, fts[:1])
    chex.assert_trees_all_close(out, fts[0], atol=1e-6)


def test_bad_chains():
    with pytest.raises(TypeError, match="at least a merger"):
        pact_jax.chain()
    with pytest.raises(TypeError, match="no 'stacked' argument"):
        pact_jax.chain(lambda params: params)


def test_sub_tree_merge_equals_part_of_whole_merge(tiny_models):
    # Randomness is per leaf path, so a streamed merge of one part of the model
    # draws exactly what the whole-model merge draws for it.
    pre, fts = tiny_models
    merge = pact_jax.chain(
        functools.partial(pact_jax.pact, svd="randomized", task_rank=2),
        merges.dare,
        merges.task_arithmetic,
    )
    key = jax.random.key(7)
    whole = merge(pre, fts, key=key)
    part = {"params": {"dense_1": pre["params"]["dense_1"]}}
    part_fts = [{"params": {"dense_1": f["params"]["dense_1"]}} for f in fts]
    chex.assert_trees_all_close(merge(part, part_fts, key=key)["params"]["dense_1"], whole["params"]["dense_1"])


@pytest.mark.parametrize("jit", [False, True])
def test_budget_groups_equal_the_whole_tree_merge(tiny_models, jit, monkeypatch):
    """chain(budget_bytes=...) runs group by group (several groups here) and returns
    what the one-group merge returns, PACT + DARE + TIES and PACT + TSV-M alike."""
    pre, fts = tiny_models
    key = jax.random.key(5)
    calls = []
    run_bucketed = pact_jax.buckets.run_bucketed
    monkeypatch.setattr(pact_jax.buckets, "run_bucketed", lambda k, jobs: calls.append(len(jobs)) or run_bucketed(k, jobs))
    smallest = min(pact_jax.buckets.working_set_bytes({"x": x}, ["x"], len(fts)) for x in jax.tree_util.tree_leaves(pre))
    for steps in [
        (functools.partial(pact_jax.pact, svd="randomized", task_rank=2), merges.dare, merges.ties),
        (functools.partial(pact_jax.pact, task_rank=2, pretrained_rank=4), merges.tsv),
    ]:
        whole = pact_jax.chain(*steps, alpha=0.6)
        grouped = pact_jax.chain(*steps, alpha=0.6, budget_bytes=smallest)
        run = jax.jit(grouped) if jit else grouped
        expected = whole(pre, fts, key=key)
        calls.clear()
        out = run(pre, fts, key=key)
        chex.assert_trees_all_close(out, expected, atol=1e-6)
        chex.assert_trees_all_equal_dtypes(out, pre)
        # One leaf per group (the budget fits the smallest leaf only): many small kernel calls.
        assert len(calls) > 2 * len(steps) and max(calls) == 1


def test_budget_keeps_input_checks_and_rejects_bad_budgets(tiny_models):
    pre, fts = tiny_models
    merge = pact_jax.chain(merges.task_arithmetic, budget_bytes=1 << 20)
    bad = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(float("nan")), fts[1])
    with pytest.raises(pact_jax.PactInputError, match=r"finetuned\[1\].*NaN|NaN.*finetuned\[1\]"):
        merge(pre, [fts[0], bad])
    bad_pre = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(float("inf")), pre)
    with pytest.raises(pact_jax.PactInputError, match="pretrained"):
        merge(bad_pre, fts)
    with pytest.raises(pact_jax.PactInputError, match="empty"):
        merge(pre, [])
    for budget in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="budget_bytes"):
            pact_jax.chain(merges.task_arithmetic, budget_bytes=budget)


def test_a_misspelled_partial_keyword_is_named():
    import functools

    import pact_jax
    from pact_jax import merges

    with pytest.raises(TypeError, match=r"pact takes no keyword 'task_rnk'; it takes \[.*'task_rank'"):
        pact_jax.chain(functools.partial(pact_jax.pact, task_rnk=0.1), merges.tsv)


@pytest.mark.parametrize("budget", [None, 64])
def test_integer_leaves_are_kept_at_the_pretrained_value(budget):
    """Integer buffers (position ids, step counters) are not merged: the result keeps the pre-trained
    value, as the CLI does; the float leaves merge exactly as without them."""
    import jax.numpy as jnp
    import numpy as np

    import pact_jax
    from pact_jax import merges
    from pact_jax.tree import PactInputError

    key = jax.random.key(0)
    pre = {"w": jax.random.normal(key, (6, 5)), "b": jnp.zeros(5), "pos": jnp.arange(7, dtype=jnp.int32)}
    fts = [{**pre, "w": pre["w"] + 0.1 * jax.random.normal(jax.random.fold_in(key, i), (6, 5)),
            "b": pre["b"] + 0.01 * i} for i in (1, 2, 3)]
    merge = pact_jax.chain(pact_jax.pact, merges.tsv, alpha=0.7, budget_bytes=budget)
    out = merge(pre, fts)
    floats = merge({k: pre[k] for k in ("w", "b")}, [{k: f[k] for k in ("w", "b")} for f in fts])
    assert out["pos"].dtype == jnp.int32 and np.array_equal(out["pos"], pre["pos"])
    chex.assert_trees_all_close({k: out[k] for k in ("w", "b")}, floats)
    d = merge.delta(pre, fts)
    assert d["pos"].dtype == jnp.int32 and not np.asarray(d["pos"]).any()
    chex.assert_trees_all_close(jax.jit(merge)(pre, fts), out, atol=1e-5)
    bad = [{**f, "pos": jnp.arange(8, dtype=jnp.int32)} for f in fts]
    with pytest.raises(PactInputError, match="finetuned\\[0\\]: leaf 'pos' has shape \\(8,\\)"):
        merge(pre, bad)
