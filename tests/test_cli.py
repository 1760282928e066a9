"""The pact-jax command line: merge from flags and YAML, inspect, exit codes, safe writes."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

import pact_jax
from pact_jax import cli, io, merges, recipes


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
        (["--method", "tsv", "--pact-arg", "task_rnak=3", "--pact"], "--pact-arg: pact got unknown hyperparameters"),
        (["--method", "tsv", "--sift", "--sift-arg", "task_rank=3"], "--sift-arg: sift got unknown hyperparameters"),
        (["--method", "tsv", "--pact-preset", "heavy"], "invalid choice: 'heavy'"),
        (["--method", "ties", "--pact-preset", "light"], "--pact-preset light: PACT preset 'light'"),
        (["--method", "tsv", "--pact-preset", "light", "--no-pact"], "--pact-preset light needs PACT"),
        (["--method", "tsv", "--sift", "--pact"], "--sift and --pact are exclusive"),
        (["--method", "tsv", "--sift", "--pact-preset", "paper"], "--sift and --pact-preset are exclusive"),
        (["--method", "tsv", "--sift-arg", "pretrained_rank=0.5"], "SIFT is off (add --sift)"),
        (["--method", "tsv", "--pact-layer-ratio", "0.5"], "--pact-layer-ratio need(s) --pact"),
        (["--method", "tsv", "--pact", "--pact-layer-ratio", "1.5"], "--pact-layer-ratio must lie in (0, 1]"),
        (["--method", "tsv", "--sift", "--pact-include", "dense_("], "--pact-include 'dense_(' is not a regular"),
        (["--method", "ties", "--pact", "--pact-only-2d"], "--pact-only-2d: PACT before ties uses the scalar"),
        (["--method", "tsv", "--pact", "--pact-arg", "paths=[a]"], "the CLI sets paths from the scope flags"),
        (["--method", "tsv", "--alpha", "nan"], "--alpha (alpha) must be a finite number"),
        (["--method", "tsv", "--alpha", "inf"], "--alpha (alpha) must be a finite number"),
        (["--method", "tsv", "--alpha", "1e40"], "--alpha (alpha) must be a finite number with |--alpha (alpha)| <= 1e+06"),
        (["--method", "tsv", "--budget-mib", "-5"], "--budget-mib (budget_mib) must be a positive number of MiB, got -5.0"),
        (["--method", "tsv", "--budget-mib", "nan"], "--budget-mib (budget_mib) must be a positive number of MiB"),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, tiny_checkpoints, argv_tail, message):
    pre_dir, ft_dirs, *_ = tiny_checkpoints
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "out", *argv_tail))
    assert code == 2 and message in err, err
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
    left = layer["subspace"]["left"]  # Flax kernels: the input side is the left one
    assert set(left) == {"pretrained_dims", "task_dims", "reliance_dims", "protect_dims"}
    assert left["pretrained_dims"] == 6  # floor(0.8 * min(8, 16)), the paper preset
    for k in ("task_dims", "reliance_dims", "protect_dims"):
        assert len(left[k]) == 3 and all(isinstance(d, int) for d in left[k]), (k, left[k])
    assert left["task_dims"] == [8, 8, 8]  # min(task_rank=10, 8)
    code, out, _ = run(capsys, "inspect", ft_dirs[0], "--pretrained", pre_dir)
    assert code == 0 and "energy removed" in out
    assert re.search(r"params/dense_0/kernel: rel [\d.]+ \| left K 6 task 8 reliance \d+ protect \d+, removed", out), out
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


# --------------------------------------------------------------------------
# PACT presets, SIFT and the PACT / SIFT scope


@pytest.fixture
def spy(monkeypatch):
    """Records the keywords every call of pact_jax.pact / pact_jax.sift gets (the real ones still run)."""
    calls: dict[str, list[dict]] = {"pact": [], "sift": []}
    for name in calls:
        real = getattr(pact_jax, name)

        @functools.wraps(real)
        def wrapper(*args, _real=real, _name=name, **kw):
            calls[_name].append({k: v for k, v in kw.items() if k not in ("pretrained", "stacked", "key", "rules")})
            return _real(*args, **kw)

        monkeypatch.setattr(pact_jax, name, wrapper)
    return calls


def float_shapes(params):
    return {p: tuple(np.shape(x)) for p, x in io.flatten(params).items()}


def test_pact_preset_reaches_pact_under_flags(tmp_path, capsys, tiny_checkpoints, spy):
    pre_dir, ft_dirs, pre, _ = tiny_checkpoints
    code, out, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "out", "--method", "task_arithmetic",
                                             "--pact-preset", "light", "--pact-arg", "task_rank=3"))  # fmt: skip
    assert code == 0, err
    assert "task_arithmetic + PACT (preset light, on 6 matrices), alpha 0.3" in out
    assert len(spy["pact"]) == 1 and not spy["sift"]
    kw = spy["pact"][0]
    want = {**pact_jax.pact_preset("light"), "task_rank": 3, "perspective": "subspace"}
    assert {k: kw[k] for k in want} == want  # the preset, with --pact-arg on top
    assert kw["paths"] == pact_jax.scope.select_matrices(float_shapes(pre), pact_jax.DEFAULT_RULES)
    assert not set(kw) & {"only_2d", "include", "exclude", "layer_ratio"}  # resolved into paths


def test_sift_chain_equals_python_api(tmp_path, capsys, tiny_checkpoints, spy):
    pre_dir, ft_dirs, pre, fts = tiny_checkpoints
    code, out, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "out", "--method", "task_arithmetic",
                                             "--sift", "--sift-arg", "pretrained_rank=0.5"))  # fmt: skip
    assert code == 0, err
    assert "task_arithmetic + SIFT (on 6 matrices), alpha 0.6" in out
    assert not spy["pact"] and [c["pretrained_rank"] for c in spy["sift"]] == [0.5]
    real_sift = pact_jax.sift.__wrapped__
    want = pact_jax.chain(functools.partial(real_sift, pretrained_rank=0.5), merges.task_arithmetic, alpha=0.6)(pre, fts)
    got = io.load(tmp_path / "out")
    assert_params_close(got, want)
    plain = recipes.make_merge("task_arithmetic")(pre, fts)
    diff = np.abs(np.asarray(got["params"]["dense_0"]["kernel"]) - np.asarray(plain["params"]["dense_0"]["kernel"]))
    assert diff.max() > 1e-3  # SIFT did filter


def test_yaml_pact_preset_scope_and_sift_keys(tmp_path, capsys, tiny_checkpoints, spy):
    pre_dir, ft_dirs, pre, _ = tiny_checkpoints
    base = {"pretrained": str(pre_dir), "finetuned": [str(d) for d in ft_dirs], "method": "tsv", "progress": False}
    cfg = tmp_path / "pact.yaml"
    cfg.write_text(yaml.safe_dump({**base, "output": "out1", "pact_preset": "adaptive", "pact_args": {"task_energy": 0.9},
                                   "pact_only_2d": True, "pact_include": ["dense", "head"],
                                   "pact_exclude": "head", "pact_layer_ratio": 0.5}))  # fmt: skip
    code, out, err = run(capsys, "merge", cfg)
    assert code == 0, err
    kw = spy["pact"][0]
    assert kw["task_energy"] == 0.9 and kw["pretrained_energy"] == pact_jax.pact_preset("adaptive")["pretrained_energy"]
    # 2-D, matching dense|head, not head: dense_0, dense_1; the first half of them.
    assert kw["paths"] == ("params/dense_0/kernel",)
    # A flag overrides the config's list; '' in --pact-exclude excludes nothing.
    code, out, err = run(capsys, "merge", cfg, "--pact-exclude", "", "--output", tmp_path / "out2")
    assert code == 0, err
    assert spy["pact"][1]["paths"] == ("params/dense_0/kernel", "params/dense_1/kernel")
    cfg.write_text(yaml.safe_dump({**base, "output": "out3", "sift": True, "sift_args": {"pretrained_rank": 2},
                                   "pact_exclude": ["conv", "query", "out/"]}))  # fmt: skip
    code, out, err = run(capsys, "merge", cfg)
    assert code == 0, err
    assert spy["sift"][0]["pretrained_rank"] == 2
    assert spy["sift"][0]["paths"] == ("params/dense_0/kernel", "params/dense_1/kernel", "params/head/kernel")
    cfg.write_text(yaml.safe_dump({**base, "output": "out4", "pact_preset": "light", "sift": True}))
    code, _, err = run(capsys, "merge", cfg)
    assert code == 2 and "--sift and --pact-preset are exclusive" in err
    cfg.write_text(yaml.safe_dump({**base, "output": "out4", "pact": True, "pact_layer_ratio": "half"}))
    code, _, err = run(capsys, "merge", cfg)
    assert code == 2 and "'pact_layer_ratio' must be a float" in err


def test_scope_resolves_to_the_same_paths_with_and_without_budget(tmp_path, capsys, tiny_checkpoints, spy):
    pre_dir, ft_dirs, pre, fts = tiny_checkpoints
    flags = ["--method", "task_arithmetic", "--pact", "--pact-layer-ratio", "0.5"]
    assert run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "whole", *flags))[0] == 0
    whole = list(spy["pact"])
    code, out, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "streamed", *flags, "--budget-mib", "0.001"))
    assert code == 0, err
    streamed = spy["pact"][len(whole):]
    want = pact_jax.scope.select_matrices(float_shapes(pre), pact_jax.DEFAULT_RULES, layer_ratio=0.5)
    assert want == ("params/conv/kernel", "params/dense_0/kernel", "params/dense_1/kernel")
    assert len(whole) == 1 and whole[0]["paths"] == want
    assert len(streamed) > 3 and all(c["paths"] == want for c in streamed)  # every group: the whole model's scope
    assert_params_close(io.load(tmp_path / "streamed"), io.load(tmp_path / "whole"))
    # Matrices out of scope are merged as without PACT; those in scope are filtered.
    # leaves outside the scope: merged as without PACT, at --pact's default alpha
    plain_merge = recipes.make_merge("task_arithmetic", alpha=recipes.default_alpha("task_arithmetic", "pact"))
    got, plain = io.flatten(io.load(tmp_path / "whole")), io.flatten(plain_merge(pre, fts))
    for p in ("params/query/kernel", "params/out/kernel", "params/head/kernel"):
        np.testing.assert_allclose(np.asarray(got[p]), np.asarray(plain[p]), rtol=1e-5, atol=1e-6, err_msg=p)
    assert np.abs(np.asarray(got["params/dense_1/kernel"]) - np.asarray(plain["params/dense_1/kernel"])).max() > 1e-3


def test_inspect_with_preset_and_scope(tmp_path, capsys, tiny_checkpoints):
    pre_dir, ft_dirs, *_ = tiny_checkpoints
    argv = ["inspect", ft_dirs[0], "--pretrained", pre_dir, "--finetuned", *ft_dirs[1:], "--json"]
    code, out, err = run(capsys, *argv, "--pact-preset", "light", "--pact-include", "dense", "--pact-layer-ratio", "0.5")
    assert code == 0, err
    layers = json.loads(out)["tasks"]["layers"]
    assert [p for p, e in layers.items() if "subspace" in e] == ["params/dense_0/kernel"]
    assert layers["params/dense_0/kernel"]["subspace"]["left"]["pretrained_dims"] == 1  # light: 0.1 of 8, at least 1
    assert "scalar" in layers["params/head/kernel"]  # the scalar statistics cover every leaf
    code, _, err = run(capsys, "inspect", ft_dirs[0], "--pact-preset", "light")
    assert code == 2 and "--pact-preset needs --pretrained" in err


def test_repeated_inputs_merge_with_a_warning(tmp_path, capsys, tiny_checkpoints):
    pre_dir, ft_dirs, *_ = tiny_checkpoints
    code, out, err = run(capsys, *merge_args(pre_dir, [ft_dirs[0], ft_dirs[0], pre_dir], tmp_path / "out",
                                             "--method", "task_arithmetic"))  # fmt: skip
    assert code == 0, err
    assert f"--finetuned {Path(ft_dirs[0]).resolve()} is given 2 times: it counts 2 times" in err
    assert f"the pre-trained checkpoint {pre_dir} is also given as --finetuned" in err



def test_version_and_help_lines(capsys):
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"pact-jax {pact_jax.__version__}"
    assert cli.main(["merge", "--help"]) == 0
    assert "merging method, one of: average, task_arithmetic" in capsys.readouterr().out
    assert cli.main(["inspect", "--help"]) == 0
    assert "List a checkpoint's leaves" in capsys.readouterr().out


@pytest.mark.parametrize("sig,code,word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_interrupt_and_terminate_exit_cleanly_and_leave_nothing(tmp_path, sig, code, word):
    import signal
    import textwrap

    out = tmp_path / "merged.msgpack"
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np, jax
        from pact_jax import cli, io

        def slow_merge(cfg):  # stands in for a long merge: a writer open, its staging file on disk
            with io.open_writer(cfg["output"], {{"w": jax.ShapeDtypeStruct((2,), np.float32)}}) as w:
                w._staged.write_text("half written")
                print("writing", flush=True)
                time.sleep(120)
            return 0

        cli.run_merge = slow_merge
        sys.argv = ["pact-jax", "merge", "--pretrained", "pre", "--finetuned", "ft", "--method", "task_arithmetic",
                    "--output", {str(out)!r}]
        cli.entry_point()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.iterdir())) == 2  # the lock and the staging file
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"pact-jax merge: {word} after" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_a_leaf_rule_that_matches_nothing_warns(tmp_path, capsys, tiny_checkpoints):
    pre_dir, ft_dirs, *_ = tiny_checkpoints
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "out", "--method", "task_arithmetic",
                                           "--freeze", "classifier"))  # fmt: skip
    assert code == 0, err
    assert f"warning: leaf rule freeze: 'classifier' (--freeze) matches no leaf of {pre_dir}" in err
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "out2", "--method", "task_arithmetic",
                                           "--freeze", "kernel"))  # fmt: skip
    assert code == 0 and "matches no leaf" not in err


def test_inspect_names_the_file_holding_nan(tmp_path, capsys, tiny_checkpoints):
    pre_dir, ft_dirs, pre, fts = tiny_checkpoints
    bad = jax.tree_util.tree_map(lambda x: np.asarray(x).copy(), fts[0])
    bad["params"]["dense_0"]["kernel"][0, 0] = np.nan
    bad_dir = io.save(tmp_path / "nan_ft", bad, "orbax")
    code, _, err = run(capsys, "inspect", bad_dir, "--pretrained", pre_dir)
    assert code == 1 and f"{bad_dir}: leaf 'params/dense_0/kernel' holds non-finite values" in err, err


def test_integer_leaves_follow_one_rule_in_cli_and_api(tmp_path, capsys, tiny_models):
    pre, fts = tiny_models
    with_ids = lambda t: {**t, "buffers": {"position_ids": np.arange(6, dtype=np.int32)}}  # noqa: E731
    pre_i, fts_i = with_ids(pre), [with_ids(f) for f in fts]
    pre_dir = io.save(tmp_path / "pre", pre_i, "orbax")
    ft_dirs = [io.save(tmp_path / f"ft{i}", f, "orbax") for i, f in enumerate(fts_i)]
    code, _, err = run(capsys, *merge_args(pre_dir, ft_dirs, tmp_path / "out", "--method", "tsv", "--alpha", "0.5"))
    assert code == 0, err
    want = recipes.make_merge("tsv", alpha=0.5)(pre_i, fts_i)  # the API merges the same tree
    assert_params_close(io.load(tmp_path / "out"), want)
    assert np.asarray(io.load(tmp_path / "out")["buffers"]["position_ids"]).dtype == np.int32


def test_positional_output_after_an_own_config(tmp_path, capsys, tiny_checkpoints):
    # pact-jax merge CONFIG OUT (as mergekit-yaml CONFIG OUT_DIR) for pact_jax's own configs too.
    pre_dir, ft_dirs, pre, fts = tiny_checkpoints
    path = tmp_path / "avg.yaml"
    path.write_text(yaml.safe_dump({"pretrained": str(pre_dir), "finetuned": [str(d) for d in ft_dirs],
                                    "method": "average", "weights": [1, 2, 1], "output": "ignored"}))  # fmt: skip
    code, _, err = run(capsys, "merge", path, tmp_path / "out", "--no-progress")
    assert code == 0, err
    want = recipes.make_merge("average", method_kwargs={"weights": (1.0, 2.0, 1.0)})(pre, fts)
    assert_params_close(io.load(tmp_path / "out"), want)
    code, _, err = run(capsys, "merge", path, tmp_path / "out2", "--output", tmp_path / "out3")
    assert code == 2 and "the output is given twice" in err
