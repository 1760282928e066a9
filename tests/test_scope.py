"""Which matrices PACT and SIFT filter (:mod:`pact_jax.scope`): the authors' rule."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pact_jax
from pact_jax import LeafRules, scope

SHAPES = {
    "params/block_10/mlp/kernel": (16, 24),
    "params/block_2/mlp/kernel": (16, 24),
    "params/block_2/attn/query/kernel": (16, 2, 8),  # DenseGeneral: a matrix view, not 2-D
    "params/block_2/attn/query/bias": (2, 8),
    "params/block_1/mlp/kernel": (16, 24),
    "params/block_1/norm/scale": (16,),
    "params/conv/kernel": (3, 3, 4, 8),
    "params/text_projection": (16, 8),
    "params/head/kernel": (16, 4),
}


def test_model_order_is_natural_and_the_default_skips_text_projection():
    got = scope.select_matrices(SHAPES, LeafRules())
    assert got == (
        "params/block_1/mlp/kernel",
        "params/block_2/attn/query/kernel",
        "params/block_2/mlp/kernel",
        "params/block_10/mlp/kernel",
        "params/conv/kernel",
        "params/head/kernel",
    )


def test_only_2d_include_exclude_and_layer_ratio_in_the_authors_order():
    rules = LeafRules()
    assert scope.select_matrices(SHAPES, rules, only_2d=True, exclude=None) == (
        "params/block_1/mlp/kernel", "params/block_2/mlp/kernel", "params/block_10/mlp/kernel",
        "params/head/kernel", "params/text_projection",
    )
    # include first, then exclude, then the ratio
    got = scope.select_matrices(SHAPES, rules, include=["mlp", "head"], exclude=["block_10"], layer_ratio=0.5)
    assert got == ("params/block_1/mlp/kernel", "params/block_2/mlp/kernel")
    assert scope.select_matrices(SHAPES, rules, layer_ratio=0.0) == ()
    frozen = LeafRules(freeze="head")
    assert "params/head/kernel" not in scope.select_matrices(SHAPES, frozen)


@pytest.mark.parametrize("kwargs", [dict(layer_ratio=1.5), dict(layer_ratio=-0.1), dict(include="("),
                                    dict(exclude=[3])])
def test_bad_scope_raises(kwargs):
    with pytest.raises(ValueError):
        scope.select_matrices(SHAPES, LeafRules(), **kwargs)


def _tree(seed=0, t=2):
    rng = np.random.default_rng(seed)
    names = [f"layers_{i}" for i in (0, 1, 2, 10)]
    pre = {n: {"kernel": jnp.asarray(rng.standard_normal((40, 12)), jnp.float32)} for n in names}
    stacked = {n: {"kernel": jnp.asarray(0.1 * rng.standard_normal((t, 40, 12)), jnp.float32)} for n in names}
    return pre, stacked


def _changed(pre, stacked, fn, **kw):
    out = fn(pre, stacked, **kw)
    return sorted(n for n in pre if not np.allclose(np.asarray(out[n]["kernel"]), np.asarray(stacked[n]["kernel"])))


@pytest.mark.parametrize("fn", [pact_jax.pact, pact_jax.sift], ids=["pact", "sift"])
def test_scope_reaches_pact_and_sift(fn):
    pre, stacked = _tree()
    everything = ["layers_0", "layers_1", "layers_10", "layers_2"]
    assert _changed(pre, stacked, fn) == everything
    assert _changed(pre, stacked, fn, layer_ratio=0.5) == ["layers_0", "layers_1"]  # layers_2 before layers_10
    assert _changed(pre, stacked, fn, include="layers_1") == ["layers_1", "layers_10"]
    assert _changed(pre, stacked, fn, exclude=["layers_1"]) == ["layers_0", "layers_2"]
    # explicit paths win (and mean the same on a sub-tree, as merged group by group)
    paths = scope.select_matrices({f"{n}/kernel": (40, 12) for n in pre}, LeafRules(), layer_ratio=0.5)
    assert _changed(pre, stacked, fn, paths=paths) == ["layers_0", "layers_1"]
    sub_pre = {"layers_1": pre["layers_1"]}
    sub_st = {"layers_1": stacked["layers_1"]}
    assert _changed(sub_pre, sub_st, fn, paths=paths) == ["layers_1"]
    assert _changed(sub_pre, sub_st, fn, layer_ratio=0.5) == []  # a ratio of a sub-tree: resolve it first
