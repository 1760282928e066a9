"""Multi-host merging: 2 processes x 4 CPU devices (jax.distributed, gloo
collectives) on a global mesh of 8 devices give exactly the single-process
result on 8 devices (and the unsharded one up to float rounding), both for
``shard_merge`` in memory and for ``pact-jax merge --distributed`` streaming
orbax checkpoints from disk to disk.

The workers (tests/multihost_worker.py) run in subprocesses with their own
XLA_FLAGS, on a free localhost port, each under a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from pact_jax import cli, io, sharding

sys.path.insert(0, str(Path(__file__).parent))
import multihost_worker  # noqa: E402

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 240
CPUS = jax.devices("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_workers(out_dir: Path | str, num_processes: int = 2, extra: Sequence[str] = ()) -> list[subprocess.Popen]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=4"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PJRT_NPROC"] = str(8 + (os.cpu_count() or 1))  # > local devices: see tests/conftest.py
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    coordinator = f"localhost:{_free_port()}"
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), coordinator, str(num_processes), str(i), str(out_dir), *map(str, extra)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]


def _wait(procs: list[subprocess.Popen], deadline: float) -> list[str]:
    """Waits for every worker until ``deadline`` (time.monotonic()); on timeout kills them all.
    Returns their logs."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(f"multi-host workers timed out after {TIMEOUT_S} s:\n" + "\n---\n".join(logs))
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{log}"
        assert f"process {i}: 4 local of 8 devices" in log and f"process {i}: ok" in log, log
    return logs


@pytest.mark.skipif(len(CPUS) < 8, reason="needs 8 CPU devices for the single-process reference")
def test_two_processes_match_single_process(tmp_path):
    deadline = time.monotonic() + TIMEOUT_S
    procs = _start_workers(tmp_path)
    try:  # the single-process references, while the workers run
        pre, fts = multihost_worker.model()
        key = jax.random.key(multihost_worker.KEY_SEED)
        mesh = sharding.make_mesh(CPUS[:8])
        expected = {
            name: (
                multihost_worker.flat(sharding.shard_merge(merge, mesh)(pre, fts, key=key)),
                multihost_worker.flat(merge(pre, fts, key=key)),
            )
            for name, merge in multihost_worker.CASES.items()
        }
    finally:
        _wait(procs, deadline)
    for name, (single, unsharded) in expected.items():
        got = dict(np.load(tmp_path / f"{name}.npz"))
        assert got.keys() == single.keys()
        # The same partitioned program over the same 8-device mesh: bit-identical.
        chex.assert_trees_all_equal(got, single)
        chex.assert_trees_all_close(got, unsharded, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(len(CPUS) < 8, reason="needs 8 CPU devices for the single-process reference")
def test_cli_distributed_streaming_merge_matches_single_process(tmp_path, capsys):
    """pact-jax merge --distributed --mesh auto over 2 processes: each group is restored from the
    orbax checkpoints into the global mesh's shardings, merged, saved by both processes into one
    orbax checkpoint that process 0 publishes; equal to the one-process --mesh auto merge on 8 devices."""
    deadline = time.monotonic() + TIMEOUT_S
    pre, fts = multihost_worker.model()
    pre_dir = io.save(tmp_path / "pre", jax.tree_util.tree_map(np.asarray, pre))
    ft_dirs = [io.save(tmp_path / f"ft{i}", jax.tree_util.tree_map(np.asarray, ft)) for i, ft in enumerate(fts)]
    argv = ["merge", "--pretrained", pre_dir, "--finetuned", *ft_dirs, "--method", "tsv", "--pact",
            "--alpha", "0.8", "--budget-mib", "0.003", "--no-progress"]  # fmt: skip
    procs = _start_workers("cli", extra=[*argv, "--output", tmp_path / "multi"])
    try:  # the single-process reference, while the workers run
        code = cli.main([*map(str, argv), "--output", str(tmp_path / "single"), "--mesh", "auto"])
        single_out = capsys.readouterr()
    finally:
        logs = _wait(procs, deadline)
    assert code == 0, single_out.err
    groups = int(single_out.out.split(" group(s)")[0].rsplit(" in ", 1)[1])
    assert groups >= 3, single_out.out  # a streamed merge: several groups written
    # Only process 0 prints the summary.
    assert "merged 3 task(s)" in logs[0] and "2 processes, mesh {'tasks': 1, 'layers': 8}" in logs[0], logs[0]
    assert "merged 3 task(s)" not in logs[1], logs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft0", "ft1", "ft2", "multi", "pre", "single"]  # no staging left
    got, want = io.flatten(io.load(tmp_path / "multi")), io.flatten(io.load(tmp_path / "single"))
    assert got.keys() == want.keys()
    chex.assert_trees_all_equal(got, want)  # the same programs over the same 8-device mesh: bit-identical
    unsharded = io.flatten(_in_memory_merge(pre, fts))
    chex.assert_trees_all_close(got, {p: np.asarray(v) for p, v in unsharded.items()}, atol=2e-5, rtol=2e-5)


def _in_memory_merge(pre, fts):
    """The same merge in memory, on one device (the CLI's --method tsv --pact --alpha 0.8, seed 0)."""
    from pact_jax import recipes

    return recipes.make_merge("tsv", use_pact=True, alpha=0.8)(pre, fts, key=jax.random.key(0))
