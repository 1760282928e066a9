"""The PACT diagnosis (benchmarks/pact_diagnosis.py) on its tiny stand-in zoo, and its pieces.

The end-to-end run builds the tiny ViT zoo of ``benchmarks.zoo.QUICK`` into a
temporary cache (T = 4, width 16) and checks what must hold whatever the
accuracies: energy accounting (a larger core removes more, ``strength`` s
removes s^2 of the paper's energy, scoped variants touch only their leaves,
PACT never touches non-matrix leaves), the ``K + (T - 1) k >= d_in`` table,
the alpha records (the suite's protocol, the walk below the range, the wide
grid) and the verdict. The memoised evaluator and the grids are tested on a
hand-built accuracy curve.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

from benchmarks import pact_diagnosis as pd  # noqa: E402
from benchmarks import quality  # noqa: E402

VARIANTS = ("none", "paper", "sift", "none_full", "light", "attn", "last_half", "K0.2", "s0.5", "all_tasks", "paper_wide")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zoo")
    out = tmp_path_factory.mktemp("out")
    rc = pd.main(["--tiny", "--cache", str(cache), "--out", str(out), "--variants", *VARIANTS,
                  "--methods", "tsv", "--baseline-methods", "task_arithmetic", "tsv"])
    assert rc == 0
    res = json.loads((out / "vit_tiny_seed0_T4.json").read_text())
    md = (out / "vit_tiny_seed0_T4.md").read_text()
    return res, md, cache


def _leaf_removed(rec):
    return {p: v["removed"] * v["share"] for p, v in rec["energy"]["leaves"].items()}


def test_tiny_run_writes_the_report(tiny_run):
    res, md, _ = tiny_run
    assert res["config"]["tasks"] == 4 and res["config"]["tiny"]
    assert list(res["variants"]) == [v for v in pd.VARIANT_NAMES if v in VARIANTS]  # in the module's order
    for heading in ("## Accuracy and energy removed", "### TA", "### TSV-M", "## Which leaves: the paper default",
                    "## Which leaves: energy removed per leaf group", "## Wide alpha grid",
                    "## Settings that beat no PACT"):
        assert heading in md, heading
    assert "(= paper)" in md  # the wide-grid variant reuses the paper default's filtered task vectors
    assert res["variants"]["paper_wide"]["same_transform_as"] == "paper"
    # The baseline group runs on both methods, the others on TSV-M only.
    assert set(res["variants"]["none"]["methods"]) == {"task_arithmetic", "tsv"}
    assert set(res["variants"]["K0.2"]["methods"]) == {"tsv"}


def test_energy_accounting(tiny_run):
    res, _, _ = tiny_run
    vs = res["variants"]
    assert vs["none"]["energy"]["removed"] == 0.0
    for name, rec in vs.items():
        groups = rec["energy"]["groups"]
        assert sum(g["share"] for g in groups.values()) == pytest.approx(1.0)
        assert groups["non-matrix"]["removed"] == 0.0, name  # PACT and SIFT filter matrices only
        assert 0.0 <= rec["energy"]["removed"] <= 1.0
    paper, k02, all_tasks = (vs[n]["energy"]["removed"] for n in ("paper", "K0.2", "all_tasks"))
    assert 0 < k02 < paper <= all_tasks + 1e-9  # the protect space grows with K and with the own task's space
    assert vs["light"]["energy"]["removed"] < 0.05
    # strength s removes the fraction s of the protected component: s^2 of its energy.
    for p, r in _leaf_removed(vs["s0.5"]).items():
        assert r == pytest.approx(0.25 * _leaf_removed(vs["paper"])[p], rel=1e-4, abs=1e-9)
    assert vs["s0.5"]["energy"]["removed"] == pytest.approx(0.25 * paper, rel=1e-4)


def test_scoped_variants_touch_only_their_matrices(tiny_run):
    res, _, _ = tiny_run
    vs = res["variants"]
    paper = vs["paper"]["energy"]["leaves"]
    for name, inside in (("attn", lambda p: "/attn/" in p), ("last_half", lambda p: p in vs["last_half"]["paths"])):
        leaves = vs[name]["energy"]["leaves"]
        for p, v in leaves.items():
            if v["group"] != "non-matrix" and inside(p):
                assert v["removed"] == pytest.approx(paper[p]["removed"], abs=1e-6), (name, p)
            else:
                assert v["removed"] == 0.0, (name, p)
    # The last half is exactly the matrices layer_ratio=0.5 leaves out (model order: block_0 first, patch_embed last).
    every = [r["path"] for r in vs["paper"]["saturation"]["rows"]]
    last = vs["last_half"]["paths"]
    first = every[: int(round(0.5 * len(every)))]
    assert last == every[len(first):] and not set(first) & set(last)


def test_saturation_table(tiny_run):
    res, md, _ = tiny_run
    t = res["config"]["tasks"]
    sat = res["variants"]["paper"]["saturation"]
    assert sat["matrices"] == len(sat["rows"]) == 7
    for row in sat["rows"]:
        m, n = row["view"]
        assert row["d_in"] == m  # Flax (in, out): the input space is the rows
        assert row["K"] == max(1, int(np.floor(0.8 * min(m, n) + 1e-9)))
        assert row["k"] == min(10, min(m, n))
        assert row["K+(T-1)k"] == row["K"] + (t - 1) * row["k"]
        assert row["saturated"] == (row["K+(T-1)k"] >= row["d_in"])
        leaf = res["variants"]["paper"]["energy"]["leaves"][row["path"]]
        if row["saturated"]:  # the protect space is all of R^d_in: the task vector is gone
            assert row["protect_dims"] == pytest.approx(row["d_in"])
            assert leaf["removed"] > 0.999
        else:
            assert row["protect_dims"] < row["d_in"]
    assert sat["saturated"] == sum(r["saturated"] for r in sat["rows"])
    assert "| params/patch_embed/kernel | 48×16 | 48 |" in md


def test_alpha_records(tiny_run):
    res, _, _ = tiny_run
    for name, rec in res["variants"].items():
        for method, r in rec["methods"].items():
            c = r["chosen"]
            assert 0.0 <= c["test_mean"] <= 1.0 and c["alpha"] > 0
            if name == "paper_wide":
                w = r["wide"]
                cur = w["curve"]
                assert "protocol" not in r
                assert cur["alpha"] == sorted(cur["alpha"])
                assert cur["alpha"][-1] == pytest.approx(pd.WIDE_FACTOR * r["grid"]["hi"])
                assert cur["alpha"][0] < r["grid"]["lo"] + 1e-12  # below the authors' range too
                assert w["val_normalized"] == max(cur["val_normalized"])
                continue
            p = r["protocol"]
            best = int(np.argmax(p["curve"]["val_normalized"]))
            assert p["alpha"] == p["curve"]["alpha"][best]
            assert np.mean(p["test_per_task"]) == pytest.approx(p["test_mean"])
            if "below" in r:  # only when the suite's best is the first point of a range that starts above 0
                assert p["at_end"] == "low" and r["grid"]["lo"] > 0
                assert r["below"]["val_normalized"] >= p["val_normalized"]
                assert min(r["below"]["curve"]["alpha"]) < r["grid"]["lo"]
                assert c["alpha"] == r["below"]["alpha"]
            else:
                assert c["alpha"] == p["alpha"] and c["test_mean"] == p["test_mean"]
    # The plans are the suites': no PACT on the plain grid, PACT variants on the authors' PACT range.
    t = res["config"]["tasks"]
    assert res["variants"]["none"]["methods"]["tsv"]["grid"]["hi"] == quality.alpha_plan("tsv", "none", t).grid[-1]
    assert res["variants"]["none_full"]["methods"]["tsv"]["grid"] == res["variants"]["light"]["methods"]["tsv"]["grid"]
    assert res["variants"]["none_full"]["methods"]["tsv"]["grid"]["patience"] is None
    assert res["variants"]["K0.2"]["methods"]["tsv"]["grid"]["hi"] == pytest.approx(
        quality.alpha_plan("tsv", "paper", t).grid[-1])


def test_verdict(tiny_run):
    res, _, _ = tiny_run
    n = res["config"]["tasks"] * res["n_test"]
    for method, v in res["verdict"].items():
        assert v["none"] == res["variants"]["none"]["methods"][method]["chosen"]["test_mean"]
        assert v["variants"]["light"]["reference"] == "none_full"  # the same whole-grid alpha search
        assert v["variants"]["paper"]["reference"] == "none"
        for name, row in v["variants"].items():
            p0 = res["variants"][row["reference"]]["methods"][method]["chosen"]["test_mean"]
            p = res["variants"][name]["methods"][method]["chosen"]["test_mean"]
            assert row["diff"] == pytest.approx(p - p0)
            assert row["two_se"] == pytest.approx(2 * np.hypot(pd.se(p, n), pd.se(p0, n)))
            is_transform = res["variants"][name]["transform"] is not None  # none_full is a protocol check
            assert (name in v["better"]) == (row["diff"] > row["two_se"] and is_transform)


def test_merged_deltas_are_the_suites(tiny_run):
    """The diagnosis filters once and merges with the merger directly; that is the suite's recipe."""
    import jax

    import pact_jax

    _, _, cache = tiny_run
    cfg = pd.DiagnosisConfig(tasks=4, tiny=True)
    ev, desc = pd.load_evaluator(cfg, cache, log=lambda s: None)
    assert desc["cached"]
    stacked = pact_jax.task_vectors(ev.pre, ev.fts)
    for setting, variant in (("paper", "paper"), ("sift", "sift"), ("light", "light")):
        v = next(x for x in pd.VARIANTS if x.name == variant)
        kw = pd.resolve_kwargs(v, pd.model_shapes(ev.pre), ev.rules)
        with pd._quiet():
            filtered = getattr(pact_jax, v.transform)(ev.pre, stacked, rules=ev.rules, **kw)
            ours = pact_jax.merges.MERGERS["tsv"](filtered, rules=ev.rules, **pd.merge_kwargs("tsv"))
            suite = quality.merged_delta(ev, "tsv", setting)
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(suite)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


class _FakeEvaluator:
    """A TaskEvaluator stand-in: validation accuracy peaks at alpha = 0.7 for every task."""

    t = 2

    def __init__(self):
        self.calls = []
        self.finetuned_val = np.array([0.9, 0.8])

    def sweep_tasks(self, delta, alphas):
        self.calls.append(tuple(alphas))
        a = np.asarray(alphas, float)[:, None]
        return np.clip(0.8 - (a - 0.7) ** 2, 0, 1) * np.ones((1, 2))

    def val_scores(self, acc):
        return {"mean": float(acc.mean()), "normalized": float(np.mean(acc / self.finetuned_val))}

    def test_acc(self, delta, alpha):
        return np.full(2, 0.5 + 0.01 * alpha)


def test_memo_evaluates_each_alpha_once_and_keeps_the_protocol():
    delta = object()
    fake = _FakeEvaluator()
    memo = pd.MemoEvaluator(fake, delta, chunk=3)
    plan = quality.AlphaPlan(tuple(np.linspace(0.5, 3.0, 11)[1:]), 3, "test")
    direct = quality.choose_alpha(_FakeEvaluator(), delta, plan, chunk=3)
    via = quality.choose_alpha(memo, delta, plan, chunk=3)
    assert via["alpha"] == pytest.approx(direct["alpha"]) and via["curve"] == direct["curve"]
    # The peak (0.7) lies below the range: choose_alpha walks 9 points below its first (0.075 .. 0.675).
    assert via["refined_to"] == pytest.approx(0.075) and via["alpha"] == pytest.approx(0.675)
    n = len(fake.calls)
    again = memo.scores(via["curve"]["alpha"])  # already walked: no new sweep
    assert len(fake.calls) == n and len(again) == len(via["curve"]["alpha"])
    assert all(len(c) == 3 for c in fake.calls)  # one compiled shape
    below = pd.low_grid(plan.grid)
    assert len(below) == pd.LOW_POINTS - 1 and 0 < below[0] and below[-1] < plan.grid[0]
    picked = pd._pick(memo, [*below, *via["curve"]["alpha"]])
    assert picked["alpha"] == pytest.approx(0.7, abs=0.04)  # the walk below the range finds the peak
    assert picked["test_mean"] == pytest.approx(0.5 + 0.01 * picked["alpha"])


def test_wide_grid_spans_below_the_range_to_three_times_its_top():
    plan = quality.alpha_plan("tsv", "paper", 8)
    grid = pd.wide_grid(plan)
    assert grid == tuple(sorted(set(grid)))
    assert grid[0] < plan.grid[0] and grid[-1] == pytest.approx(pd.WIDE_FACTOR * plan.grid[-1])
    assert set(plan.grid[1::2]) <= set(grid)
    plain = quality.alpha_plan("tsv", "none", 8)  # a range from 0: nothing below it
    assert min(pd.wide_grid(plain)) >= plain.grid[0]


def test_leaf_groups():
    import pact_jax

    rules = pact_jax.LeafRules(not_matrix=r"(^|/)(bias|cls|pos_emb)$")
    cases = {
        "params/block_0/attn/query/kernel": "attn q", "params/block_0/attn/key/kernel": "attn k",
        "params/block_0/attn/value/kernel": "attn v", "params/block_0/attn/out/kernel": "attn out",
        "params/block_1/mlp_in/kernel": "MLP in", "params/block_1/mlp_out/kernel": "MLP out",
        "params/patch_embed/kernel": "patch embed", "params/block_0/attn/key/bias": "non-matrix",
        "params/layer_4/attn_out/kernel": "attn out",
    }
    for path, group in cases.items():
        assert pd.leaf_group(path, (8, 8), rules) == group, path
    frozen = pact_jax.LeafRules(matrix=r"/kernel$", freeze=r"^params/embeddings/")
    assert pd.leaf_group("params/embeddings/word/embedding", (10, 8), frozen) is None


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        pd.main(["--variants", "nope"])
    with pytest.raises(SystemExit):
        pd.main(["--points", "0"])


def _overlap_reference(w0, taus, big_k, k):
    """The shares of ``subspace_overlap`` by full SVDs (input space = rows)."""
    core = np.linalg.svd(w0, full_matrices=False)[0][:, :big_k]
    tops = [np.linalg.svd(x, full_matrices=False)[0][:, :k] for x in taus]
    out = dict.fromkeys(("own_topk", "core", "others_topk", "core+others"), 0.0)
    total = 0.0
    for j, x in enumerate(taus):
        others = np.concatenate([tops[i] for i in range(len(taus)) if i != j], axis=1)
        for name, basis in (("own_topk", tops[j]), ("core", core), ("others_topk", others),
                            ("core+others", np.concatenate([core, others], axis=1))):
            u, s, _ = np.linalg.svd(basis, full_matrices=False)
            u = u[:, s > 1e-6 * s[0]]
            out[name] += float(np.square(u.T @ x).sum())
        total += float(np.square(x).sum())
    return {kk: v / total for kk, v in out.items()}


def test_subspace_overlap_matches_full_svds():
    import pact_jax

    rng = np.random.default_rng(0)
    rules = pact_jax.LeafRules()
    # A wide and a tall matrix (the Gram shortcut takes either side); the tasks share directions.
    shared = rng.normal(size=(3, 24, 40))
    pre = {"a": {"kernel": rng.normal(size=(24, 40))}, "b": {"kernel": rng.normal(size=(40, 12))}}
    stacked = {"a": {"kernel": 0.3 * shared + 0.1 * rng.normal(size=(3, 24, 40))},
               "b": {"kernel": rng.normal(size=(3, 40, 12)) * np.linspace(2, 0.1, 12)}}
    energy = pd.leaf_energy(stacked, stacked, rules)
    got = pd.subspace_overlap(pre, stacked, rules, energy, pretrained_rank=0.5, task_rank=3)
    for path, shape in (("a/kernel", (24, 40)), ("b/kernel", (40, 12))):
        name = path.split("/")[0]
        want = _overlap_reference(pre[name]["kernel"], stacked[name]["kernel"],
                                  max(1, int(0.5 * min(shape))), 3)
        leaf = got["leaves"][path]
        for kk, v in want.items():
            assert leaf[kk] == pytest.approx(v, abs=1e-6), (path, kk)
        assert leaf["own_topk"] <= 1 and leaf["core"] <= leaf["core+others"] + 1e-9
        assert leaf["others_topk"] <= leaf["core+others"] + 1e-9
