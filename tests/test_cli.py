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


@pytest.mark.parametrize("use_pact", [False, True])
def test_svd_randomized_applies_to_pact_and_tsv(tmp_path, capsys, tiny_checkpoints, use_pact):
    pre_dir, ft_dirs, pre, fts = tiny_checkpoints
    flags = ["--pact"] if use_pact else []
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "out", "--method", "tsv", "--svd",
                                           "randomized", "--seed", "3", *flags))  # fmt: skip
    assert code == 0, err
    want = recipes.make_merge("tsv", use_pact=use_pact, pact_kwargs={"svd": "randomized"} if use_pact else None,
                              method_kwargs={"svd": "randomized"})(pre, fts, key=jax.random.key(3))  # fmt: skip
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


def test_mesh_restores_into_shardings_and_writes_sharded_arrays(tmp_path, capsys, monkeypatch, tiny_checkpoints):
    """With --mesh, orbax inputs are restored straight into NamedShardings over the mesh and the
    merged leaves reach the orbax writer as sharded jax.Arrays: no host copy of a merged group."""
    import jax as _jax
    from jax.sharding import NamedSharding

    from pact_jax.io import orbax as orbax_io

    pre_dir, ft_dirs, *_ = tiny_checkpoints
    reads, writes = [], []
    orig_read, orig_write = orbax_io.Reader.read, orbax_io.Writer._write

    def spy_read(self, paths, shardings=None):
        out = orig_read(self, paths, shardings)
        reads.append((shardings, out))
        return out

    def spy_write(self, arrays):
        writes.append(dict(arrays))
        return orig_write(self, arrays)

    monkeypatch.setattr(orbax_io.Reader, "read", spy_read)
    monkeypatch.setattr(orbax_io.Writer, "_write", spy_write)
    base = ["--method", "tsv", "--pact", "--budget-mib", "0.005"]
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "sharded", *base, "--mesh", "auto"))
    assert code == 0, err
    n = len(_jax.devices())
    group_reads = [out for sh, out in reads if sh]
    assert len(group_reads) >= 4 * 3 and len(group_reads) == len(reads)  # every read: 4 checkpoints x >= 3 groups
    for out in group_reads:
        for p, a in out.items():
            assert isinstance(a, _jax.Array) and isinstance(a.sharding, NamedSharding), (p, type(a))
            assert a.sharding.mesh.size == n
    merged = {p: a for w in writes for p, a in w.items()}
    assert set(merged) == set(io.flatten(io.load(pre_dir)))
    for p, a in merged.items():
        assert isinstance(a, _jax.Array), (p, type(a))  # not NumPy: no gather before writing
        assert isinstance(a.sharding, NamedSharding) and a.sharding.mesh.size == n, (p, a.sharding)
    if n > 1:  # the 8-device test session: the kernels really are split over devices
        assert any(len(a.sharding.device_set) == n and not a.sharding.is_fully_replicated for a in merged.values())
    # The same numbers as the unsharded merge.
    monkeypatch.undo()
    assert run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "plain", *base))[0] == 0
    assert_params_close(io.load(tmp_path / "sharded"), io.load(tmp_path / "plain"))


def test_distributed_flags_are_checked(tmp_path, capsys, tiny_checkpoints):
    pre_dir, ft_dirs, *_ = tiny_checkpoints
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "o", "--method", "average", "--process-id", "1"))
    assert code == 2 and "--process-id need(s) --distributed" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"distributed": "yes"}))
    code, _, err = run(capsys, "merge", cfg)
    assert code == 2 and "'distributed' must be a bool" in err
    args = cli._parser().parse_args([*map(str, merge_args(pre_dir, ft_dirs, tmp_path / "o", "--method", "average")),
                                     "--distributed", "--num-processes", "2"])  # fmt: skip
    cfg = cli.merge_settings(args)
    assert cfg["distributed"] and cfg["mesh"] == "auto" and cfg["num_processes"] == 2
