"""pact_jax.demo: the built-in example runs end to end and its numbers are sane."""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from pact_jax import demo

REPO = pathlib.Path(__file__).resolve().parents[1]

# Compilation, not training, dominates the demo's runtime, so these steps cost
# little and leave fine-tuning a wide margin over the pre-trained model.
QUICK = demo.DemoConfig(finetune_steps=200, pretrain_steps=600, probe_steps=200)


@pytest.fixture(scope="module")
def results() -> dict:
    return demo.run_demo(QUICK)


def _variants(results: dict):
    for name, by_variant in results["methods"].items():
        for variant, r in by_variant.items():
            yield f"{name}/{variant}", r


def test_result_structure(results):
    t = QUICK.num_tasks
    assert set(results) == {"config", "built", "tasks", "pretrained", "finetuned", "methods", "timings"}
    assert results["config"]["num_tasks"] == t
    assert len(results["tasks"]) == t
    assert tuple(results["methods"]) == demo.DEFAULT_METHODS
    for name, by_variant in results["methods"].items():
        assert set(by_variant) == {"plain", "pact"}, name
    for label, r in [("pretrained", results["pretrained"]), ("finetuned", results["finetuned"]), *_variants(results)]:
        assert len(r["per_task"]) == t, label
        assert r["mean"] == pytest.approx(np.mean(r["per_task"])), label
    for label, r in _variants(results):
        assert r["alpha"] in QUICK.alphas, label
        assert set(r["val_curve"]) == set(QUICK.alphas), label
        assert r["val_mean"] == max(r["val_curve"].values()), label
    built = results["built"]
    assert built["encoder_params"] == 32 * 128 + 128 + 128 * 128 + 128
    assert set(built["pact_energy_removed"]) == {"subspace", "scalar"}
    assert all(v >= 0 and math.isfinite(v) for v in results["timings"].values())


def test_finetuning_clearly_beats_pretrained_on_every_task(results):
    pre = np.asarray(results["pretrained"]["per_task"])
    ft = np.asarray(results["finetuned"]["per_task"])
    assert np.all(ft > pre + 0.05), (pre, ft)
    assert results["finetuned"]["normalized"] == pytest.approx(1.0)


def test_accuracies_are_fractions(results):
    for label, r in [("pretrained", results["pretrained"]), ("finetuned", results["finetuned"]), *_variants(results)]:
        accs = np.asarray([*r["per_task"], r["mean"]])
        assert np.all((accs >= 0) & (accs <= 1)), label
        assert 0 <= r["normalized"] and math.isfinite(r["normalized"]), label
    for label, r in _variants(results):
        assert all(0 <= v <= 1 for v in r["val_curve"].values()), label
    for es in results["built"]["pact_energy_removed"].values():
        assert all(-1e-5 <= e <= 1 + 1e-5 for e in es)


def test_table_lists_every_row(results):
    table = demo.format_table(results)
    assert table.splitlines()[0] == demo.TABLE_HEADER
    for row in ("pre-trained (+ task heads)", "individual fine-tuned", *demo.DEFAULT_METHODS):
        assert row in table
    assert demo.TABLE_HEADER in demo.format_report(results)


def test_data_depend_only_on_the_key():
    a = demo.make_world_and_data(jax.random.key(3), QUICK)
    b = demo.make_world_and_data(jax.random.key(3), QUICK)
    c = demo.make_world_and_data(jax.random.key(4), QUICK)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a[1]["test"].x, c[1]["test"].x)
    y = np.asarray(a[1]["train"].y)
    # Every task uses all four classes in roughly equal share.
    for t in range(QUICK.num_tasks):
        assert np.bincount(y[t], minlength=4).min() > 0.15 * y.shape[1]


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="unknown"):
        demo.DemoConfig(methods=("nope",))
    with pytest.raises(SystemExit) as e:
        demo.main(["--methods", "nope"])
    assert e.value.code == 2


def test_existing_checkpoints_are_refused_before_training(tmp_path, capsys):
    (tmp_path / "task1").mkdir()
    with pytest.raises(SystemExit) as e:
        demo.main(["--save-checkpoints", str(tmp_path), "--tasks", "3"])
    assert e.value.code == 2
    assert "task1 already exist" in capsys.readouterr().err


def test_command_line_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "pact_jax.demo", "--steps", "50", "--tasks", "3", "--methods", "ties"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert demo.TABLE_HEADER in proc.stdout
    assert "individual fine-tuned" in proc.stdout
    assert "ties" in proc.stdout
