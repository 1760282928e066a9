"""pact_jax.tree: task vectors, apply_delta, validation errors, leaf rules."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pact_jax
from pact_jax.tree import LeafRules, PactInputError

from conftest import make_params, perturb


def test_task_vectors_stack_differences(tiny_models):
    pre, fts = tiny_models
    stacked = pact_jax.task_vectors(pre, fts)
    chex.assert_trees_all_equal_structs(stacked, pre)
    for path, leaf in pact_jax.tree.leaves_with_paths(stacked):
        w0 = dict(pact_jax.tree.leaves_with_paths(pre))[path]
        chex.assert_shape(leaf, (3, *w0.shape))
        for t, ft in enumerate(fts):
            wt = dict(pact_jax.tree.leaves_with_paths(ft))[path]
            np.testing.assert_allclose(leaf[t], np.asarray(wt) - np.asarray(w0), rtol=1e-6, atol=1e-7)


def test_bfloat16_task_vectors_are_float32_and_merge_returns_bfloat16():
    key = jax.random.key(1)
    pre = make_params(key, jnp.bfloat16)
    fts = [perturb(pre, jax.random.fold_in(key, i)) for i in range(2)]
    stacked = pact_jax.task_vectors(pre, fts)
    chex.assert_trees_all_equal_dtypes(stacked, jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), pre))
    merged = pact_jax.apply_delta(pre, pact_jax.merges.task_arithmetic(stacked), 0.5)
    chex.assert_trees_all_equal_dtypes(merged, pre)
    # The difference is exact in float32: bf16 -> f32 is lossless.
    ref = jax.tree_util.tree_map(
        lambda w0, a, b: (w0.astype(jnp.float32) + 0.5 * ((a.astype(jnp.float32) - w0) + (b.astype(jnp.float32) - w0))).astype(jnp.bfloat16),
        pre, fts[0], fts[1],
    )
    chex.assert_trees_all_equal(merged, ref)


def test_apply_delta_alpha_and_identity(tiny_models):
    pre, fts = tiny_models
    stacked = pact_jax.task_vectors(pre, fts[:1])
    delta = jax.tree_util.tree_map(lambda x: x[0], stacked)
    chex.assert_trees_all_close(pact_jax.apply_delta(pre, delta, 1.0), fts[0], atol=1e-6)
    chex.assert_trees_all_close(pact_jax.apply_delta(pre, delta, 0.0), pre)
    doubled = pact_jax.apply_delta(pre, delta, 2.0)
    chex.assert_trees_all_close(
        doubled, jax.tree_util.tree_map(lambda a, b: 2 * b - a, pre, fts[0]), atol=1e-5
    )


def test_empty_task_list():
    pre = make_params(jax.random.key(0))
    with pytest.raises(PactInputError, match="empty"):
        pact_jax.task_vectors(pre, [])


def test_finetuned_must_be_a_sequence(tiny_models):
    pre, fts = tiny_models
    with pytest.raises(PactInputError, match="sequence"):
        pact_jax.task_vectors(pre, fts[0])


def test_structure_mismatch_names_the_path(tiny_models):
    pre, fts = tiny_models
    broken = jax.tree_util.tree_map(lambda x: x, fts[1])
    del broken["params"]["dense_1"]["bias"]
    with pytest.raises(PactInputError, match=r"finetuned\[1\].*params/dense_1/bias"):
        pact_jax.task_vectors(pre, [fts[0], broken])


def test_shape_mismatch_names_the_path(tiny_models):
    pre, fts = tiny_models
    broken = jax.tree_util.tree_map(lambda x: x, fts[0])
    broken["params"]["head"]["kernel"] = jnp.zeros((16, 5))
    with pytest.raises(PactInputError, match=r"params/head/kernel.*shape \(16, 5\)"):
        pact_jax.task_vectors(pre, [broken])


def test_dtype_mismatch_names_the_path(tiny_models):
    pre, fts = tiny_models
    broken = jax.tree_util.tree_map(lambda x: x, fts[0])
    broken["params"]["dense_0"]["kernel"] = broken["params"]["dense_0"]["kernel"].astype(jnp.bfloat16)
    with pytest.raises(PactInputError, match=r"params/dense_0/kernel.*bfloat16"):
        pact_jax.task_vectors(pre, [broken])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_input_and_path(tiny_models, bad):
    pre, fts = tiny_models
    broken = jax.tree_util.tree_map(lambda x: x, fts[2])
    broken["params"]["conv"]["kernel"] = broken["params"]["conv"]["kernel"].at[0, 0, 0, 0].set(bad)
    with pytest.raises(PactInputError, match=r"finetuned\[2\].*params/conv/kernel.*non-finite"):
        pact_jax.task_vectors(pre, [fts[0], fts[1], broken])
    with pytest.raises(PactInputError, match=r"pretrained.*params/conv/kernel"):
        pact_jax.task_vectors(broken, fts)


def test_integer_leaf_is_refused():
    pre = {"w": jnp.ones((2, 2)), "step": jnp.array(3)}
    with pytest.raises(PactInputError, match="'step'.*int"):
        pact_jax.task_vectors(pre, [pre])


def test_task_vectors_jit_traceable(tiny_models):
    pre, fts = tiny_models
    eager = pact_jax.task_vectors(pre, fts)
    jitted = jax.jit(pact_jax.task_vectors)(pre, fts)
    chex.assert_trees_all_close(eager, jitted)


def test_leaf_rules_kinds_and_precedence():
    rules = LeafRules(average=r"embed", freeze=r"^head/")
    assert rules.kind("enc/dense/kernel", (4, 5)) == "matrix"
    assert rules.kind("enc/dense/bias", (5,)) == "other"
    assert rules.kind("enc/query/bias", (2, 4)) == "other"  # DenseGeneral bias is 2-D, not a matrix
    assert rules.kind("enc/embed/embedding", (10, 4)) == "average"
    assert rules.kind("head/kernel", (4, 2)) == "freeze"
    assert LeafRules(matrix=r"mlp").kind("attn/kernel", (4, 4)) == "other"
    assert LeafRules(freeze=r"x", average=r"x").kind("x", (2, 2)) == "freeze"


def test_matrix_views():
    rules = LeafRules()
    assert rules.matrix_shape("dense/kernel", (8, 16)) == (8, 16)
    assert rules.matrix_shape("attn/query/kernel", (8, 2, 4)) == (8, 8)
    assert rules.matrix_shape("attn/out/kernel", (2, 4, 8)) == (8, 8)
    assert rules.matrix_shape("conv/kernel", (3, 3, 4, 8)) == (36, 8)
    custom = LeafRules(row_axes=((r"special", 2),))
    assert custom.matrix_shape("special/kernel", (2, 3, 4, 5)) == (6, 20)
    # An entry applies only to leaves with more than k dims: T5X's 2-D attention
    # output kernel keeps its (d, d) view under the default (Flax 3-D) entry.
    assert rules.matrix_shape("encoder/layers_0/attention/out/kernel", (768, 768)) == (768, 768)
    assert LeafRules(row_axes=((r".*", 2),)).matrix_shape("dense/kernel", (4, 5)) == (4, 5)
    with pytest.raises(PactInputError, match="row_axes"):
        LeafRules(row_axes=((r".*", 0),)).matrix_shape("dense/kernel", (4, 5))


def test_merge_jitted_with_the_pretrained_model_closed_over():
    """``jax.jit(partial(merge, pretrained))``: the closed-over (concrete) model is checked at trace time,
    the traced fine-tuned models are not (values unknown); the result equals the eager merge."""
    import functools

    from pact_jax import recipes

    pre = make_params(jax.random.key(0))
    fts = [perturb(pre, jax.random.key(i), 0.05) for i in (1, 2)]
    for method, kw in (("task_arithmetic", {}), ("tsv", {"use_pact": True}), ("ties", {})):
        merge = recipes.make_merge(method, alpha=0.5, **kw)
        chex.assert_trees_all_close(jax.jit(functools.partial(merge, pre))(fts), merge(pre, fts), atol=1e-5)
    leaf = jax.tree_util.tree_leaves(pre)[0]
    bad = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x is leaf else x, pre)
    with pytest.raises(PactInputError, match="pretrained: leaf .* holds non-finite values"):
        jax.jit(functools.partial(recipes.make_merge("task_arithmetic"), bad))(fts)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), 1e40, "0.5", None])
def test_alpha_must_be_a_finite_number(alpha):
    from pact_jax import merges

    pre = make_params(jax.random.key(0))
    fts = [perturb(pre, jax.random.key(1), 0.05)]
    with pytest.raises(ValueError, match="alpha must be"):
        pact_jax.apply_delta(pre, pre, alpha)
    with pytest.raises(ValueError, match="alpha must be"):
        pact_jax.chain(merges.task_arithmetic, alpha=alpha)
    merge = pact_jax.chain(merges.task_arithmetic)
    with pytest.raises(ValueError, match="alpha must be"):
        merge(pre, fts, alpha=alpha)
    # A traced alpha (a jitted sweep) is not known at trace time: not refused.
    jax.jit(lambda a: merge(pre, fts, alpha=a))(jnp.float32(0.5))
