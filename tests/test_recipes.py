"""pact_jax.recipes: PACT presets, SIFT, exclusivity, alpha defaults, scope resolution."""

from __future__ import annotations

import functools

import chex
import jax
import pytest

import pact_jax
from pact_jax import merges, recipes


def test_preset_implies_pact_and_keywords_stack_in_order():
    light = pact_jax.pact_preset("light")
    transform, kw = recipes.transform_settings("tsv", pact_preset="light")
    assert transform == "pact" and kw == {"perspective": "subspace", **light}
    # preset < svd= < pact_kwargs
    _, kw = recipes.transform_settings("tsv", pact_preset="light", svd="randomized", pact_kwargs={"strength": 0.5})
    assert kw["svd"] == "randomized" and kw["strength"] == 0.5 and kw["task_rank"] == light["task_rank"]
    _, kw = recipes.transform_settings("tsv", pact_preset="light", svd="randomized", pact_kwargs={"svd": "exact"})
    assert kw["svd"] == "exact"
    assert recipes.transform_settings("tsv", use_pact=True) == ("pact", {"perspective": "subspace"})
    assert recipes.transform_settings("tsv") == (None, {})


def test_preset_with_a_scalar_method_is_an_error_unless_paper_or_subspace():
    with pytest.raises(ValueError, match="scalar-weight perspective"):
        recipes.make_merge("ties", pact_preset="light")
    with pytest.raises(ValueError, match="scalar-weight perspective"):
        recipes.make_merge("dare_ties", pact_preset="release")
    assert recipes.transform_settings("ties", pact_preset="paper") == ("pact", {"perspective": "scalar"})
    with pytest.warns(UserWarning, match="subspace perspective before ties"):
        _, kw = recipes.transform_settings("ties", pact_preset="light", pact_kwargs={"perspective": "subspace"})
    assert kw["perspective"] == "subspace" and kw["align_threshold"] == 0.9
    with pytest.raises(ValueError, match="unknown PACT preset 'heavy'"):
        recipes.make_merge("tsv", pact_preset="heavy")


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(use_pact=True, use_sift=True), "use_pact and use_sift are exclusive"),
        (dict(pact_preset="paper", use_sift=True), "pact_preset='paper' and use_sift are exclusive"),
        (dict(sift_kwargs={"pretrained_rank": 0.5}), "SIFT is off"),
        (dict(pact_kwargs={"task_rank": 3}), "PACT is off"),
        (dict(use_sift=True, sift_kwargs={"task_rank": 3}), "sift got unknown hyperparameters"),
    ],
)
def test_contradictions_raise(kw, message):
    with pytest.raises(ValueError, match=message):
        recipes.make_merge("tsv", **kw)


def test_sift_recipe_is_the_sift_chain_and_svd_reaches_it(tiny_models):
    pre, fts = tiny_models
    got = recipes.make_merge("tsv", use_sift=True, sift_kwargs={"pretrained_rank": 0.5}, alpha=0.7)(pre, fts)
    want = pact_jax.chain(functools.partial(pact_jax.sift, pretrained_rank=0.5), merges.tsv, alpha=0.7)(pre, fts)
    chex.assert_trees_all_close(got, want, atol=1e-6)
    assert recipes.transform_settings("tsv", use_sift=True, svd="randomized") == ("sift", {"svd": "randomized"})
    assert recipes.needs_key("average", use_sift=True, svd="randomized")
    assert recipes.needs_key("average", use_sift=True, sift_kwargs={"svd": "randomized"})
    assert not recipes.needs_key("average", use_sift=True)
    assert not recipes.needs_key("tsv", pact_preset="light", alpha=0.3, budget_bytes=1 << 20)
    with pytest.raises(ValueError, match="randomized"):
        recipes.make_merge("average", use_sift=True, svd="randomized")(pre, fts)  # no key


def test_default_alpha_per_method_and_transform():
    for method in recipes.METHODS:
        assert recipes.default_alpha(method) == recipes.DEFAULT_ALPHA[method]
        for transform in ("pact", "sift"):
            # the subspace transforms remove most of tau: twice the alpha; the scalar PACT keeps it
            factor = 1.0 if method in recipes.SCALAR_METHODS else 2.0
            assert recipes.default_alpha(method, transform) == factor * recipes.DEFAULT_ALPHA[method]
        assert recipes.default_alpha(method, "pact", "light") == recipes.DEFAULT_ALPHA[method]
    with pytest.raises(ValueError, match="unknown transform"):
        recipes.default_alpha("tsv", "pcat")
    merge = recipes.make_merge("task_arithmetic", use_sift=True)
    assert "alpha=0.6" in merge.__doc__


def test_budget_resolves_layer_ratio_over_the_whole_model(tiny_models, monkeypatch):
    """With budget_bytes each group's PACT sees a sub-tree; layer_ratio must still count the whole model's matrices."""
    pre, fts = tiny_models
    kw = {"pact_kwargs": {"layer_ratio": 0.5, "pretrained_rank": 0.5, "task_rank": 2}}
    whole = recipes.make_merge("task_arithmetic", use_pact=True, **kw)(pre, fts)
    grouped = recipes.make_merge("task_arithmetic", use_pact=True, budget_bytes=1, **kw)
    chex.assert_trees_all_close(grouped(pre, fts), whole, atol=1e-6)
    alpha = recipes.default_alpha("task_arithmetic", "pact")
    chex.assert_trees_all_close(pact_jax.apply_delta(pre, grouped.delta(pre, fts), alpha), whole, atol=1e-6)
    # Without the resolution every one-leaf group would keep round(0.5 * 1) = 0 or 1 matrices: different.
    naive = pact_jax.chain(functools.partial(pact_jax.pact, **kw["pact_kwargs"]), merges.task_arithmetic,
                           alpha=alpha, budget_bytes=1)(pre, fts)  # fmt: skip
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(naive, whole, atol=1e-6)
    # shapes= resolves now into paths=, for callers that merge parts of the tree (streaming).
    seen = []
    real = pact_jax.pact

    @functools.wraps(real)
    def spy(*a, **k):
        seen.append(k.get("paths"))
        return real(*a, **k)

    monkeypatch.setattr(pact_jax, "pact", spy)
    shapes = {p: tuple(x.shape) for p, x in pact_jax.tree.leaves_with_paths(pre)}
    recipes.make_merge("task_arithmetic", use_pact=True, shapes=shapes, **kw)(pre, fts)
    assert seen == [("params/conv/kernel", "params/dense_0/kernel", "params/dense_1/kernel")]


def test_the_subspace_perspective_before_ties_warns():
    with pytest.warns(UserWarning, match="PACT's subspace perspective before ties"):
        recipes.transform_settings("ties", use_pact=True, pact_kwargs={"perspective": "subspace"})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recipes.transform_settings("ties", use_pact=True)  # the scalar default: no warning
        recipes.transform_settings("tsv", use_pact=True, pact_kwargs={"perspective": "subspace"})


def test_dare_recipes_split_keywords_and_pass_the_convention_to_both_steps(tiny_models):
    pre, fts = tiny_models
    key = jax.random.key(2)
    kw = {"p": (0.5, 0.2, 0.0), "weights": (1.0, 0.5, 2.0), "convention": "mergekit", "normalize": False}
    got = recipes.make_merge("dare_ties", method_kwargs={**kw, "density": 1.0}, alpha=1.0)(pre, fts, key=key)
    want = pact_jax.chain(
        functools.partial(merges.dare, p=kw["p"], rescale="l1"),  # the mergekit convention's DARE rescale
        functools.partial(merges.ties, density=1.0, weights=kw["weights"], normalize=False, convention="mergekit"),
    )(pre, fts, key=key)
    chex.assert_trees_all_close(got, want, atol=1e-6)
    # DARE then task arithmetic (mergekit's dare_linear): convention goes to DARE only, weights to TA.
    got = recipes.make_merge("dare_task_arithmetic", method_kwargs=kw, alpha=0.5)(pre, fts, key=key)
    want = pact_jax.chain(
        functools.partial(merges.dare, p=kw["p"], convention="mergekit"),
        functools.partial(merges.task_arithmetic, weights=kw["weights"], normalize=False),
        alpha=0.5,
    )(pre, fts, key=key)
    chex.assert_trees_all_close(got, want, atol=1e-6)
    assert recipes.needs_key("dare_task_arithmetic") and "dare_task_arithmetic" not in recipes.METHODS
    assert recipes.default_alpha("dare_task_arithmetic") == recipes.default_alpha("task_arithmetic")
    with pytest.raises(ValueError, match="tsv got unknown hyperparameters \\['weights'\\]"):
        recipes.make_merge("tsv", method_kwargs={"weights": (1.0, 1.0, 1.0)})
