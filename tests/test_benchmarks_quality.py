"""End to end: the quality benchmark's pipeline in its tiny ``--quick`` setting.

Builds a tiny zoo into a temporary cache, merges with and without PACT, runs
a one-row ablation, writes the markdown, JSON and PNG; then a second run
reuses the cached zoo. Asserts structure and sanity, not specific numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root


from benchmarks import quality, tasks, zoo  # noqa: E402


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


def test_quick_pipeline_end_to_end(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out" / "results_quality.md"
    argv = ["--quick", "--ablation", "--cache", str(cache), "--out", str(out)]
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
    for method in quality.QUICK.methods:
        assert f"| {method} + PACT |" in md
    assert "## Quality bars" in md and "## Ablation" in md
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads(out.with_suffix(".json").read_text())
    per_seed = res["per_T"]["4"]["0"]
    ft = np.asarray(per_seed["finetuned"]["per_task"])
    chance = np.asarray([1.0 / t.num_classes for t in tasks.TASKS[:4]])
    assert ft.shape == (4,) and np.all(ft > chance)
    accs = [per_seed["pretrained"]["per_task"]]
    for method in quality.QUICK.methods:
        for variant in ("plain", "pact"):
            r = per_seed["methods"][method][variant]
            accs.append(r["per_task"])
            assert r["alpha"] in quality.QUICK.alphas + quality.ALPHAS_EXTEND
            assert 0.0 <= r["val_mean"] <= 1.0
            assert r["normalized"] == pytest.approx(np.mean(np.asarray(r["per_task"]) / ft))
        assert 0.0 <= per_seed["methods"][method]["pact"]["energy_removed"] <= 1.0
    accs = np.asarray(accs)
    assert np.all((0.0 <= accs) & (accs <= 1.0))
    assert {b["bar"].split(" (")[0] for b in res["bars"]}  # bars were checked
    abl = res["ablation"]["methods"]["tsv"]["rows"]
    assert abl[0]["hyperparameter"] == "(defaults)" and len(abl) == len(quality.ablation_settings(quality.QUICK, "tsv"))

    # a second run finds the zoo in the cache and reproduces the table exactly
    assert quality.main(argv[:1] + argv[2:]) == 0
    assert "cached" in capsys.readouterr().out
    again = json.loads(out.with_suffix(".json").read_text())["per_T"]["4"]["0"]
    for method in quality.QUICK.methods:
        for variant in ("plain", "pact"):
            for field in ("per_task", "alpha", "val_mean"):
                assert again["methods"][method][variant][field] == per_seed["methods"][method][variant][field]
