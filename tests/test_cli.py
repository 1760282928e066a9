"""The pact-jax command line: merge from flags and YAML, inspect, exit codes, safe writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml

from pact_jax import cli, io, recipes


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def merge_args(pre_dir, ft_dirs, out, *extra):
    return ["merge", "--pretrained", pre_dir, "--finetuned", *ft_dirs, "--output", out, "--no-progress", *extra]


def assert_params_close(got, want):
    got, want = io.flatten(got), io.flatten(want)
    assert set(got) == set(want)
    for p in want:
        np.testing.assert_allclose(np.asarray(got[p]), np.asarray(want[p]), rtol=1e-5, atol=1e-6, err_msg=p)


def test_merge_with_flags_equals_python_api(tmp_path, capsys, tiny_checkpoints):
    pre_dir, ft_dirs, pre, fts = tiny_checkpoints
    code, out, err = run(
        capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "out", "--method", "ties", "--pact", "--alpha", "0.8",
                            "--method-arg", "density=0.3", "--pact-arg", "anchor_fraction=0.4")  # fmt: skip
    )
    assert code == 0, err
    assert "ties + PACT, alpha 0.8" in out and "merged 3 task(s)" in out
    want = recipes.make_merge("ties", use_pact=True, pact_kwargs={"anchor_fraction": 0.4},
                              method_kwargs={"density": 0.3}, alpha=0.8)(pre, fts, key=jax.random.key(0))  # fmt: skip
    assert_params_close(io.load(tmp_path / "out"), want)


def test_merge_from_yaml_config_with_flag_override(tmp_path, capsys, tiny_checkpoints):
    pre_dir, ft_dirs, pre, fts = tiny_checkpoints
    config = {
        "pretrained": pre_dir.name,  # relative to the config file
        "finetuned": [d.name for d in ft_dirs],
        "method": "dare_ties",
        "pact": False,
        "alpha": 0.5,
        "seed": 4,
        "output": "merged.safetensors",
        "budget_mib": 0.001,
        "method_args": {"p": 0.5, "density": 0.5},
        "rules": {"freeze": "head"},
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = run(capsys, "merge", path, "--alpha", "0.6", "--no-progress")
    assert code == 0, err
    assert "dare_ties, alpha 0.6" in out
    merge = recipes.make_merge("dare_ties", method_kwargs={"p": 0.5, "density": 0.5}, alpha=0.6,
                               rules=__import__("pact_jax").LeafRules(freeze="head"))  # fmt: skip
    want = merge(pre, fts, key=jax.random.key(4))
    got = io.load(tmp_path / "merged.safetensors")
    assert_params_close(got, want)
    np.testing.assert_array_equal(got["params"]["head"]["kernel"], np.asarray(pre["params"]["head"]["kernel"]))


@pytest.mark.parametrize(
    "argv_tail,message",
    [
        (["--method", "nope"], "invalid choice"),
        (["--method", "ties", "--method-arg", "densty=0.2"], "unknown hyperparameters ['densty']"),
        (["--method", "ties", "--pact-arg", "task_rank=3"], "PACT is off"),
        (["--method", "ties", "--method-arg", "oops"], "expected KEY=VALUE"),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, tiny_checkpoints, argv_tail, message):
    pre_dir, ft_dirs, *_ = tiny_checkpoints
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "out", *argv_tail))
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_missing_required_and_bad_config_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "merge", "--method", "tsv")
    assert code == 2 and "--pretrained" in err and "--finetuned" in err and "--output" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrained: a\nmethodd: tsv\n")
    code, _, err = run(capsys, "merge", bad)
    assert code == 2 and "unknown keys ['methodd']" in err
    bad.write_text("alpha: [1, 2]\n")
    code, _, err = run(capsys, "merge", bad)
    assert code == 2 and "'alpha' must be a float" in err
    code, _, err = run(capsys, "merge", tmp_path / "absent.yaml")
    assert code == 2 and "cannot read config" in err
    code, _, _ = run(capsys, "frobnicate")
    assert code == 2


def test_failures_exit_1_and_write_nothing(tmp_path, capsys, tiny_checkpoints):
    pre_dir, ft_dirs, *_ = tiny_checkpoints
    code, _, err = run(capsys, *merge_args(pre_dir, [tmp_path / "absent"], tmp_path / "out", "--method", "tsv"))
    assert code == 1 and "absent: no such checkpoint" in err
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, pre_dir / "inside", "--method", "tsv"))
    assert code == 1 and "refusing to write the output" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft0", "ft1", "ft2", "pre"]


def test_existing_output_needs_overwrite(tmp_path, capsys, tiny_checkpoints):
    pre_dir, ft_dirs, *_ = tiny_checkpoints
    out = tmp_path / "out"
    assert run(capsys, *merge_args(pre_dir, ft_dirs, out, "--method", "average"))[0] == 0
    before = io.load(out)
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, out, "--method", "task_arithmetic"))
    assert code == 1 and "already exists" in err and "--overwrite" in err
    assert_params_close(io.load(out), before)
    assert run(capsys, *merge_args(pre_dir, ft_dirs, out, "--method", "task_arithmetic", "--overwrite"))[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft0", "ft1", "ft2", "out", "pre"]


def test_inspect_tree_and_task_statistics(tmp_path, capsys, tiny_checkpoints):
    pre_dir, ft_dirs, pre, fts = tiny_checkpoints
    code, out, _ = run(capsys, "inspect", ft_dirs[0])
    assert code == 0
    assert "14 leaves, 868 parameters" in out and "params/query/kernel" in out and "(8, 2, 4)" in out
    code, out, _ = run(capsys, "inspect", ft_dirs[0], "--pretrained", pre_dir, "--finetuned", *ft_dirs[1:], "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["num_params"] == 868
    layer = stats["tasks"]["layers"]["params/dense_0/kernel"]
    tau = np.asarray(fts[1]["params"]["dense_0"]["kernel"]) - np.asarray(pre["params"]["dense_0"]["kernel"])
    np.testing.assert_allclose(layer["tau_norm"][1], np.linalg.norm(tau), rtol=1e-5)
    assert len(layer["subspace"]["energy_removed"]) == 3 and len(layer["scalar"]["energy_removed"]) == 3
    assert layer["subspace"]["left"]["pretrained_dims"] >= 1
    code, out, _ = run(capsys, "inspect", ft_dirs[0], "--pretrained", pre_dir)
    assert code == 0 and "LBW" in out and "energy removed" in out
    code, _, err = run(capsys, "inspect", ft_dirs[0], "--finetuned", ft_dirs[1])
    assert code == 2 and "--finetuned needs --pretrained" in err


def test_console_script_runs(tmp_path, tiny_checkpoints):
    pre_dir, ft_dirs, *_ = tiny_checkpoints
    exe = shutil.which("pact-jax") or pytest.fail("pact-jax console script not installed (pip install -e .)")
    res = subprocess.run([exe, "inspect", str(pre_dir)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "868 parameters" in res.stdout
    res = subprocess.run([sys.executable, "-m", "pact_jax.cli", "merge"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2


def test_merge_on_a_device_mesh_equals_single_device(tmp_path, capsys, tiny_checkpoints):
    import jax as _jax

    pre_dir, ft_dirs, *_ = tiny_checkpoints
    base = ["--method", "tsv", "--pact"]
    assert run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "plain", *base))[0] == 0
    mesh = "auto" if len(_jax.devices()) == 1 else f"2x{len(_jax.devices()) // 2}"
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "sharded", *base, "--mesh", mesh))
    assert code == 0, err
    assert_params_close(io.load(tmp_path / "sharded"), io.load(tmp_path / "plain"))
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "bad", *base, "--mesh", "3by"))
    assert code == 2 and "--mesh must be" in err
