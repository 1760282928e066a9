"""End to end: the quality benchmark's pipeline in its tiny ``--quick`` setting.

Builds a tiny zoo into a temporary cache, merges every method under its
settings (none, PACT presets, SIFT, scalar PACT), chooses alpha by the
authors' protocol, writes the markdown, JSON and PNG; then a second run
reuses the cached zoo. Asserts structure and sanity, not specific numbers;
the alpha protocol itself is tested on hand-built curves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root


from benchmarks import quality, report, tasks, zoo  # noqa: E402


def test_task_generators_are_deterministic_and_in_range():
    import jax

    for task in tasks.TASKS:
        x1, y1, b1 = task.gen(jax.random.key(3), 16, "val")
        x2, y2, _ = task.gen(jax.random.key(3), 16, "val")
        assert x1.shape == (16, tasks.SIZE, tasks.SIZE, tasks.CHANNELS), task.name
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        assert 0.0 <= x1.min() and x1.max() <= 1.0, task.name
        assert 0 <= y1.min() and y1.max() < task.num_classes, task.name
        assert set(np.unique(b1)) <= {0, 1}, task.name


def check_record(r, per_seed, ft, allowed_alphas=None):
    """One (method, setting) record of the JSON: the alpha search and the test numbers agree."""
    curve = r["curve"]
    assert len(curve["alpha"]) == len(curve["val_mean"]) == len(curve["val_normalized"]) >= 1
    assert list(curve["alpha"]) == sorted(curve["alpha"])
    best = int(np.argmax(curve["val_normalized"]))
    assert r["alpha"] == curve["alpha"][best] and r["val_normalized"] == curve["val_normalized"][best]
    assert 0.0 <= r["val_mean"] <= 1.0
    g = r["grid"]
    if r["widened_to"] is not None:
        assert r["widened_to"] == pytest.approx(2 * g["hi"]) and curve["alpha"][-1] == pytest.approx(2 * g["hi"])
    if r.get("refined_to") is not None:  # points below the grid's first, towards 0
        assert curve["alpha"][0] == r["refined_to"] and 0 < r["refined_to"] < g["lo"] + (g["hi"] - g["lo"]) / g["points"]
    if g["patience"] is None:  # the whole grid (and its extensions) was walked
        refined = g["points"] - 1 if r.get("refined_to") is not None else 0
        assert len(curve["alpha"]) == g["points"] * (2 if r["widened_to"] else 1) + refined
    assert r["normalized"] == pytest.approx(np.mean(np.asarray(r["per_task"]) / ft))
    assert r["at_end"] in (None, "low", "high")
    if allowed_alphas is not None:
        assert r["alpha"] in allowed_alphas


def run_tiny(suite, tmp_path, capsys, md_name):
    """``suite.main`` in its ``--tiny`` setting with a cache and output under ``tmp_path``: ``(argv, cache, out, printed)``."""
    cache, out = tmp_path / "cache", tmp_path / "out" / md_name
    argv = ["--tiny", "--cache-dir", str(cache), "--out", str(out)]
    assert suite.main(argv) == 0
    return argv, cache, out, capsys.readouterr().out


def check_tiny_seed(per_seed, cfg, t, n_test, each=None):
    """A tiny run's records of one seed at ``t`` tasks (``each(setting, r)``: more checks per record);
    every accuracy lies in [0, 1] and is a multiple of ``1 / n_test``."""
    ft = np.asarray(per_seed["finetuned"]["per_task"])
    accs = [ft, per_seed["pretrained"]["per_task"]]
    assert set(per_seed["methods"]) == set(cfg.methods)
    for method, by_setting in per_seed["methods"].items():
        assert list(by_setting) == list(quality.settings_for(method, cfg.settings))
        for setting, r in by_setting.items():
            accs.append(r["per_task"])
            if each is not None:
                each(setting, r)
            check_record(r, per_seed, ft)
            assert r["grid"] == quality.alpha_plan(method, setting, t, cfg.alpha.points, cfg.alpha.full_points).describe()
    accs = np.asarray(accs)
    assert np.all((0.0 <= accs) & (accs <= 1.0))
    np.testing.assert_allclose(accs * n_test, np.round(accs * n_test), atol=1e-4)


def check_cached_rerun(suite, argv, out, capsys, per_seed, t, fields):
    """A second ``suite.main(argv)`` loads the cached zoo and reproduces ``per_seed``'s ``fields`` exactly."""
    assert suite.main(argv) == 0
    assert "cached" in capsys.readouterr().out
    again = json.loads(out.with_suffix(".json").read_text())["per_T"][str(t)]["0"]
    assert again["finetuned"] == per_seed["finetuned"] and again["pretrained"] == per_seed["pretrained"]
    for method, by_setting in per_seed["methods"].items():
        for setting, r in by_setting.items():
            for field in fields:
                assert again["methods"][method][setting][field] == r[field]


def test_alpha_plans_follow_the_authors():
    from pact_jax import alpha

    for t in (4, 8):
        assert quality.alpha_plan("tsv", "none", t).grid == alpha.alpha_grid("tsv")
        assert quality.alpha_plan("tsv", "paper", t).grid == alpha.alpha_grid("tsv", "pact")
        assert quality.alpha_plan("tsv", "release", t).grid == alpha.alpha_grid("tsv", "pact")
        np.testing.assert_allclose(quality.alpha_plan("task_arithmetic", "paper", t).grid,
                                   np.linspace(2.5, 7.5, 31)[1:] / t)
        np.testing.assert_allclose(quality.alpha_plan("task_arithmetic", "sift", t).grid,
                                   np.linspace(3, 8, 31)[1:] / t)
        assert quality.alpha_plan("iso_c", "sift", t).grid == alpha.alpha_grid("iso_c", "sift")
        for m in ("tsv", "iso_cts"):  # no authors' SIFT range: PACT's, said so
            plan = quality.alpha_plan(m, "sift", t)
            assert plan.grid == alpha.alpha_grid(m, "pact") and "no authors' sift range" in plan.source
        for m, s in (("tsv", "none"), ("tsv", "paper"), ("iso_c", "sift")):
            assert quality.alpha_plan(m, s, t).patience == 3
        for m, s in (("tsv", "light"), ("task_arithmetic", "light"), ("ties", "none"), ("ties", "scalar"),
                     ("dare_ties", "scalar")):
            plan = quality.alpha_plan(m, s, t)
            assert plan.patience is None and len(plan.grid) == 30 and plan.describe()["lo"] == 0.0
        # the light range holds both the plain and the PACT range
        assert quality.alpha_plan("task_arithmetic", "light", t).grid[-1] == max(1.0, 7.5 / t)
        assert quality.alpha_plan("iso_cts", "light", t).grid[-1] == 6.0
    assert quality.alpha_plan("average", "none", 8).grid == (1.0,)
    assert quality.settings_for("tsv") == ("none", "paper", "release", "light", "sift")
    assert quality.settings_for("ties") == ("none", "scalar") == quality.settings_for("dare_ties", ("scalar",))
    assert quality.settings_for("average") == ("none",)
    assert quality.settings_for("iso_c", ("sift",)) == ("none", "sift")


class FakeEvaluator:
    """choose_alpha's view of an evaluator: validation accuracies from a given curve of alpha."""

    def __init__(self, fn, t=2):
        self.fn, self.calls, self.finetuned_val = fn, [], np.full(t, 0.5)

    def sweep_tasks(self, delta, alphas):
        self.calls.append(tuple(alphas))
        return np.asarray([[self.fn(a)] * len(self.finetuned_val) for a in alphas])

    val_scores = quality.TaskEvaluator.val_scores


def test_choose_alpha_early_stops_and_widens():
    plan = quality.AlphaPlan(tuple(np.linspace(0, 5, 11)[1:]), 3, "test")
    ev = FakeEvaluator(lambda a: 0.3 - 0.01 * (a - 1.5) ** 2)  # peak at 1.5
    r = quality.choose_alpha(ev, None, plan, chunk=4)
    assert r["alpha"] == 1.5 and r["stopped_early"] and r["widened_to"] is None and r["at_end"] is None
    assert r["curve"]["alpha"] == list(plan.grid[:6])  # 1.5 then 3 points without a better mean
    assert all(len(c) == 4 for c in ev.calls) and len(ev.calls) == 2  # chunks padded to one shape
    assert r["val_normalized"] == pytest.approx(0.6)

    ev = FakeEvaluator(lambda a: 0.3 - 0.01 * (a - 7.0) ** 2)  # peak beyond the grid's top, inside 2x
    r = quality.choose_alpha(ev, None, plan, chunk=4)
    assert r["widened_to"] == 10.0 and r["alpha"] == 7.0 and r["at_end"] is None
    assert len(r["curve"]["alpha"]) == 20 and r["curve"]["alpha"][10] == 5.5

    ev = FakeEvaluator(lambda a: a)  # still rising at twice the top
    r = quality.choose_alpha(ev, None, plan, chunk=4)
    assert r["widened_to"] == 10.0 and r["alpha"] == 10.0 and r["at_end"] == "high"

    ev = FakeEvaluator(lambda a: -a)  # best below the grid: refined towards 0, still at its low end
    r = quality.choose_alpha(ev, None, plan, chunk=4)
    assert r["alpha"] == pytest.approx(0.05) and r["at_end"] == "low" and r["widened_to"] is None
    assert r["refined_to"] == pytest.approx(0.05) and len(r["curve"]["alpha"]) == 9 + 4  # 0.05..0.45, 0.5..2.0
    assert r["curve"]["alpha"] == sorted(r["curve"]["alpha"])

    ev = FakeEvaluator(lambda a: -((a - 0.2) ** 2))  # peak inside the refined points
    r = quality.choose_alpha(ev, None, plan, chunk=4)
    assert r["alpha"] == pytest.approx(0.2) and r["at_end"] is None and r["refined_to"] == pytest.approx(0.05)


def test_quick_pipeline_end_to_end(tmp_path, capsys, transforms):
    cache, out = tmp_path / "cache", tmp_path / "out" / "results_quality.md"
    argv = ["--quick", "--cache", str(cache), "--out", str(out)]
    assert quality.main(argv) == 0
    printed = capsys.readouterr().out
    assert "T = 4" in printed

    # the zoo was cached as orbax checkpoints, one directory per fine-tuned task
    seed_dir = zoo.seed_dir(cache, zoo.QUICK, 0)
    assert (seed_dir / "meta.json").exists()
    assert sorted(p.name for p in (seed_dir / "finetuned").iterdir()) == sorted(tasks.TASK_NAMES[: zoo.QUICK.num_tasks])

    md = out.read_text()
    assert md.startswith("# Quality")
    assert "python -m benchmarks.quality --quick" in md
    assert "| tsv | PACT (paper default) |" in md and "| tsv | SIFT |" in md and "| tsv | PACT light |" in md
    assert "| ties | scalar PACT (our own extension) |" in md
    assert "| task_arithmetic + SIFT |" in md  # per-task tables
    assert "## Quality bars" in md and "## Reading" in md and "no verdict" in md
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads(out.with_suffix(".json").read_text())
    per_seed = res["per_T"]["4"]["0"]
    ft = np.asarray(per_seed["finetuned"]["per_task"])
    chance = np.asarray([1.0 / t.num_classes for t in tasks.TASKS[:4]])
    assert ft.shape == (4,) and np.all(ft > chance)
    accs = [per_seed["pretrained"]["per_task"]]
    assert set(per_seed["methods"]) == set(quality.QUICK.methods)
    assert list(per_seed["methods"]["tsv"]) == ["none", "paper", "light", "sift"]
    assert list(per_seed["methods"]["ties"]) == ["none", "scalar"]
    assert list(per_seed["methods"]["average"]) == ["none"]
    for method, by_setting in per_seed["methods"].items():
        for setting, r in by_setting.items():
            accs.append(r["per_task"])
            check_record(r, per_seed, ft)
            plan = quality.alpha_plan(method, setting, 4, quality.QUICK.alpha.points, quality.QUICK.alpha.full_points)
            assert r["grid"] == plan.describe()
            if setting == "none":
                assert r["energy_removed"] is None
            else:
                assert 0.0 <= r["energy_removed"] <= 1.0
    assert per_seed["methods"]["average"]["none"]["alpha"] == 1.0
    accs = np.asarray(accs)
    assert np.all((0.0 <= accs) & (accs <= 1.0))
    assert {b["bar"].split(" (")[0] for b in res["bars"]}  # bars were checked
    assert res["config"]["alpha_protocol"]["grids"]["4"]["tsv"]["sift"]["source"].startswith("authors' PACT range")

    # a second run finds the zoo in the cache and reproduces the table exactly
    assert quality.main(argv) == 0
    assert "cached" in capsys.readouterr().out
    again = json.loads(out.with_suffix(".json").read_text())["per_T"]["4"]["0"]
    for method, by_setting in per_seed["methods"].items():
        for setting, r in by_setting.items():
            for field in ("per_task", "alpha", "val_mean", "curve"):
                assert again["methods"][method][setting][field] == r[field]


def test_cli_settings_and_points():
    args = quality.build_parser().parse_args(["--settings", "sift", "--points", "10", "--methods", "tsv",
                                              "--full-points", "12"])
    cfg = quality.config_from_args(args)
    assert cfg.settings == ("none", "sift") and cfg.methods == ("tsv",)
    assert cfg.alpha == quality.AlphaProtocol(points=10, full_points=12, chunk=quality.CHUNK)
    assert len(quality.alpha_plan("tsv", "light", 4, 10, 12).grid) == 12
    assert len(quality.alpha_plan("tsv", "none", 4, 10, 12).grid) == 10
    with pytest.raises(SystemExit):
        quality.main(["--points", "0"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_shared_transform_deltas_equal_the_recipes(tiny_models, transforms):
    """setting_delta (each transform run once per setting) gives make_merge's delta, and the energy is right."""
    import types

    import jax

    import pact_jax

    pre, fts = tiny_models
    ev = types.SimpleNamespace(pre=pre, fts=fts, rules=pact_jax.DEFAULT_RULES, seed=0, t=len(fts))
    leaves = lambda tree: [np.asarray(x, np.float64).reshape(len(fts), -1) for x in jax.tree_util.tree_leaves(tree)]
    for setting, methods in (("light", ("task_arithmetic", "iso_cts")), ("sift", ("tsv",)), ("scalar", ("ties",))):
        for method in methods:
            want = quality.merged_delta(ev, method, setting)
            got = quality.setting_delta(ev, method, setting)
            for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                           err_msg=f"{method} {setting}")
            cleaned, energy = quality.transformed(ev, method, setting)
            tau = leaves(pact_jax.task_vectors(pre, fts))
            removed = sum(np.sum((x - y) ** 2, axis=1) for x, y in zip(tau, leaves(cleaned)))
            assert energy == pytest.approx(float(np.mean(removed / sum(np.sum(x**2, axis=1) for x in tau))))
            assert 0.0 < energy < 1.0, (method, setting)
    shared = [(m, s) for m in quality.METHODS for s in quality.settings_for(m) if quality.shares_transform(m, s)]
    assert len(shared) == 4 * 4 + 1  # TA / TSV-M / Iso-C / Iso-CTS x 4 subspace settings, TIES + scalar PACT
    assert ("dare_ties", "scalar") not in shared and ("tsv", "none") not in shared
    assert quality.energy_removed(ev, "tsv", "none") is None


def synthetic_results(n_seeds=3):
    """A results dict of two methods over seeds, as the suites write it (no computation)."""

    rng = np.random.default_rng(0)

    def rec(setting, acc, alpha, at_end=None, widened=None, energy=None):
        per_task = [acc + 0.01 * rng.standard_normal() for _ in range(2)]
        return {"setting": setting, "alpha": alpha, "val_mean": acc, "val_normalized": acc / 0.9,
                "grid": {"lo": 0.0, "hi": 5.0, "points": 30, "patience": 3, "source": "authors' range for tsv"},
                "widened_to": widened, "at_end": at_end, "stopped_early": True,
                "curve": {"alpha": [alpha], "val_mean": [acc], "val_normalized": [acc / 0.9]},
                "per_task": per_task, "mean": float(np.mean(per_task)), "normalized": float(np.mean(per_task)) / 0.9,
                "energy_removed": energy, "merge_s": 0.0, "search_s": 0.0}

    per_seed = {}
    for s in range(n_seeds):
        per_seed[str(s)] = {
            "finetuned": {"per_task": [0.9, 0.9], "mean": 0.9, "normalized": 1.0},
            "pretrained": {"per_task": [0.5, 0.5], "mean": 0.5, "normalized": 0.5 / 0.9},
            "methods": {
                "tsv": {"none": rec("none", 0.70, 2.0), "paper": rec("paper", 0.80, 1.5, energy=0.5),
                        "release": rec("release", 0.55, 1.0, at_end="low", energy=0.9995),
                        "light": rec("light", 0.70 + 0.01 * (s - 1), 10.0, at_end="high", widened=10.0, energy=0.01)},
                "ties": {"none": rec("ties", 0.6, 1.0), "scalar": rec("scalar", 0.6, 1.0, energy=0.1)},
            },
        }
    return {
        "config": {"setting_labels": dict(quality.SETTING_LABELS)},
        "tasks": [{"name": "a"}, {"name": "b"}],
        "per_T": {"2": per_seed},
        "bars": [{"bar": "x (T=2)", "value": "1", "holds": True}],
    }


def test_report_reading_and_tables_on_several_seeds(tmp_path):
    from benchmarks import report

    res = synthetic_results()
    text = "\n".join(report.reading(res))
    assert "Clear gains" in text and "tsv + PACT (paper default)" in text.split("clear losses")[0]
    losses = text.split("clear losses: ")[1].split(";")[0]
    assert "tsv + PACT (as released)" in losses and "light" not in losses
    assert "tsv + PACT light at T = 2 (top of the grid, widened for 3 of 3 seeds)" in text
    assert "tsv + PACT (as released) at T = 2 (lowest point walked for 3 of 3 seeds)" in text
    assert "99.95%" in text
    rows = {(r[0], r[1]): r for r in report.summary_rows(res, "2")}
    paper = rows[("tsv", "PACT (paper default)")]
    assert abs(float(paper[4].split()[0]) - 10.0) < 2.0 and "±" in paper[4] and paper[9] == "50.0%"
    assert rows[("tsv", "PACT light")][7] == "wh/wh/wh" and rows[("tsv", "none")][7] == "–/–/–"
    assert rows[("tsv", "none")][4] == "" and rows[("tsv", "none")][9] == ""
    one = synthetic_results(1)
    assert "no verdict" in "\n".join(report.reading(one))
    assert report.plot(res, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_reduced_runs_write_to_a_temporary_folder(tmp_path):
    committed = tmp_path / "results_quality.md"
    assert report.output_path(None, committed, reduced=False) == committed
    assert report.output_path(tmp_path / "x.md", committed, reduced=True) == tmp_path / "x.md"
    temp = report.output_path(None, committed, reduced=True)
    assert temp.name == "results_quality.md" and temp.parent != tmp_path and temp.parent.is_dir()
