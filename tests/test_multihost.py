"""Multi-host merging: 2 processes x 4 CPU devices (jax.distributed, gloo
collectives) on a global mesh of 8 devices give exactly the single-process
result on 8 devices (and the unsharded one up to float rounding).

The workers (tests/multihost_worker.py) run in subprocesses with their own
XLA_FLAGS, on a free localhost port, each under a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from pact_jax import sharding

sys.path.insert(0, str(Path(__file__).parent))
import multihost_worker  # noqa: E402

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 240
CPUS = jax.devices("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_workers(out_dir: Path, num_processes: int = 2) -> list[subprocess.Popen]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=4"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PJRT_NPROC"] = str(8 + (os.cpu_count() or 1))  # > local devices: see tests/conftest.py
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    coordinator = f"localhost:{_free_port()}"
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), coordinator, str(num_processes), str(i), str(out_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]


def _wait(procs: list[subprocess.Popen], deadline: float) -> None:
    """Waits for every worker until ``deadline`` (time.monotonic()); on timeout kills them all."""
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
