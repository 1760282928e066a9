"""pact_jax.alpha: the authors' alpha grids and the early-stopping search, on hand-built curves."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pact_jax
from pact_jax import alpha as alpha_mod


def curve_search(values, grid=None, **kw):
    """search_alpha on a 1-leaf 'model' whose 'evaluation' reads the curve at alpha (= the leaf's value)."""
    grid = tuple(float(i + 1) for i in range(len(values))) if grid is None else grid
    table = dict(zip(grid, values))
    calls = []

    def evaluate(params):
        a = float(params["w"])
        calls.append(a)
        return table[a]

    res = pact_jax.search_alpha(evaluate, {"w": jnp.zeros(())}, {"w": jnp.ones(())}, grid, **kw)
    return res, calls


def test_early_stop_after_patience_points_without_improvement():
    #        1    2    3    4    5    6    7    8
    vals = [0.1, 0.5, 0.4, 0.5, 0.3, 0.9, 0.2, 0.1]
    res, calls = curve_search(vals, patience=3)
    # 0.5 at alpha 2, then 3 points (0.4, 0.5 equal is not better, 0.3) without improvement: stop at 5
    assert calls == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert res.alphas == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert res.scores == (0.1, 0.5, 0.4, 0.5, 0.3)
    assert res.alpha == 2.0 and res.score == 0.5 and res.best_index == 1
    assert res.stopped_early and not res.at_end
    assert res.metrics is None
    # patience 4 walks on and finds the 0.9
    res4, _ = curve_search(vals, patience=4)
    assert res4.alpha == 6.0 and res4.alphas == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    assert not res4.stopped_early  # the grid ended on the 2nd point after the best


def test_patience_none_walks_the_whole_grid():
    vals = [0.1, 0.5, 0.4, 0.3, 0.2, 0.6, 0.2]
    res, calls = curve_search(vals, patience=None)
    assert len(calls) == 7 and res.alpha == 6.0 and not res.stopped_early
    res1, calls1 = curve_search(vals, patience=1)
    assert calls1 == [1.0, 2.0, 3.0] and res1.alpha == 2.0 and res1.stopped_early


def test_ties_pick_the_first_best():
    res, _ = curve_search([0.2, 0.7, 0.7, 0.7, 0.1], patience=None)
    assert res.alpha == 2.0 and res.best_index == 1


def test_best_at_an_end_of_the_grid():
    up, _ = curve_search([0.1, 0.2, 0.3, 0.4])
    assert up.at_high_end and up.at_end and not up.at_low_end and not up.stopped_early
    down, calls = curve_search([0.9, 0.2, 0.3, 0.4, 0.5])
    assert down.at_low_end and down.at_end and not down.at_high_end and calls == [1.0, 2.0, 3.0, 4.0]
    one, _ = curve_search([0.5])
    assert one.at_low_end and one.at_high_end


def test_mapping_metrics_stop_on_one_select_by_another():
    # 'mean' drives the stop (best at 2, stop after 3 more); 'norm' picks 4 among the walked points
    mean = [0.50, 0.60, 0.55, 0.58, 0.59, 0.99]
    norm = [0.70, 0.72, 0.71, 0.80, 0.60, 0.99]
    vals = [{"mean": m, "normalized": n, "other": 0.0} for m, n in zip(mean, norm)]
    res, calls = curve_search(vals, stop_on="mean", select_by="normalized")
    assert calls == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert res.alpha == 4.0 and res.score == 0.80
    assert res.scores == tuple(norm[:5]) and res.curve("mean") == tuple(mean[:5])
    assert res.metrics[0] == {"mean": 0.5, "normalized": 0.7, "other": 0.0}
    # select_by defaults to stop_on
    res2, _ = curve_search(vals, stop_on="mean")
    assert res2.alpha == 2.0 and res2.score == 0.60
    with pytest.raises(ValueError, match="mapping"):
        curve_search(vals)
    with pytest.raises(ValueError, match="not among"):
        curve_search(vals, stop_on="accuracy")
    with pytest.raises(ValueError, match="single number"):
        curve_search([0.1, 0.2], stop_on="mean")
    with pytest.raises(ValueError, match="float"):
        curve_search([0.1, 0.2])[0].curve("mean")


def test_chunked_search_equals_one_at_a_time():
    rng = np.random.default_rng(0)
    for _ in range(20):
        vals = rng.random(12).round(1)
        grid = tuple(np.arange(1, 13) * 0.5)
        ref, _ = curve_search(list(vals), grid=grid, patience=2)
        for chunk in (1, 3, 5, 12, 40):
            got = alpha_mod.search_curve(lambda al: [vals[grid.index(a)] for a in al], grid, patience=2, chunk=chunk)
            assert got == ref


@pytest.mark.parametrize(
    "grid, match",
    [((), "empty"), ((1.0, 1.0), "strictly increasing"), ((2.0, 1.0), "strictly increasing"),
     ((0.1, float("nan")), "non-finite")],
)
def test_bad_grids_are_refused(grid, match):
    with pytest.raises(ValueError, match=match):
        curve_search([0.1] * len(grid), grid=grid)


@pytest.mark.parametrize("patience", [0, -1, True, 1.5])
def test_bad_patience_is_refused(patience):
    with pytest.raises(ValueError, match="patience"):
        curve_search([0.1, 0.2], patience=patience)


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        curve_search([0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="NaN"):
        curve_search([{"m": 0.1, "n": float("nan")}], stop_on="m", select_by="n")


def test_the_search_applies_the_delta():
    pre = {"w": jnp.array([1.0, 2.0])}
    delta = {"w": jnp.array([1.0, -1.0])}
    # the best model is w = [2, 1]: alpha = 1
    res = pact_jax.search_alpha(lambda p: -float(jnp.sum((p["w"] - jnp.array([2.0, 1.0])) ** 2)),
                                pre, delta, pact_jax.alpha_grid("task_arithmetic"), patience=None)
    assert res.alpha == pytest.approx(1.0) and res.at_high_end
    res = pact_jax.search_alpha(lambda p: -float(jnp.sum((p["w"] - jnp.array([1.5, 1.5])) ** 2)),
                                pre, delta, pact_jax.alpha_grid("task_arithmetic"))
    assert res.alpha == pytest.approx(0.5) and res.stopped_early and len(res.alphas) == 18


# ----------------------------------------------------------------------------- grids


@pytest.mark.parametrize(
    "method, transform, lo, hi",
    [("task_arithmetic", None, 0, 1), ("tsv", None, 0, 5), ("iso_c", None, 0, 5), ("iso_cts", None, 0, 5),
     ("tsv", "pact", 1, 6), ("iso_c", "pact", 1, 6), ("iso_cts", "pact", 1, 6), ("iso_c", "sift", 2, 7)],
)
def test_grids_are_the_authors_linspace(method, transform, lo, hi):
    grid = pact_jax.alpha_grid(method, transform)
    np.testing.assert_array_equal(grid, np.linspace(lo, hi, 31)[1:])
    assert len(grid) == 30 and grid[-1] == hi and all(isinstance(a, float) for a in grid)


@pytest.mark.parametrize("transform, lo, hi", [("pact", 2.5, 7.5), ("sift", 3, 8)])
def test_task_mean_grids_are_divided_by_t(transform, lo, hi):
    for t in (4, 8):
        grid = pact_jax.alpha_grid("task_arithmetic", transform, num_tasks=t)
        np.testing.assert_allclose(grid, np.linspace(lo, hi, 31)[1:] / t, rtol=1e-15)
    with pytest.raises(ValueError, match="num_tasks"):
        pact_jax.alpha_grid("task_arithmetic", transform)


def test_grid_points_and_unknown_ranges():
    np.testing.assert_array_equal(pact_jax.alpha_grid("tsv", points=10), np.linspace(0, 5, 11)[1:])
    for method, transform in (("ties", None), ("tsv", "sift"), ("iso_cts", "sift"), ("tsv", "magic")):
        with pytest.raises(ValueError, match="known: .*iso_c\\+sift"):
            pact_jax.alpha_grid(method, transform)
    with pytest.raises(ValueError, match="points"):
        pact_jax.alpha_grid("tsv", points=0)


def test_exports():
    assert {"search_alpha", "alpha_grid", "AlphaSearch"} <= set(pact_jax.__all__)
    assert pact_jax.search_alpha is alpha_mod.search_alpha
