"""The CPU thread-pool setting applied on import (pact_jax/runtime.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from pact_jax import runtime


def test_pool_size_counts_virtual_devices_and_cores():
    assert runtime.cpu_pool_size("", cpu_count=2) == 1 + 2 + 8
    assert runtime.cpu_pool_size("--foo --xla_force_host_platform_device_count=8", cpu_count=2) == 8 + 2 + 8


def _pjrt_nproc_after_import(env: dict[str, str]) -> str:
    code = "import os, pact_jax; print(os.environ['PJRT_NPROC'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_sets_pjrt_nproc_and_keeps_a_user_value():
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS")}
    assert _pjrt_nproc_after_import(env) == str(runtime.cpu_pool_size(""))
    assert _pjrt_nproc_after_import({**env, "PJRT_NPROC": "5"}) == "5"


def test_import_makes_the_cpu_pool_larger_than_the_cores():
    # The pool is sized when the backend starts; count its worker threads.
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS")}
    code = (
        "import pact_jax, jax.numpy as jnp, os\n"
        "(jnp.ones((64, 64)) @ jnp.ones((64, 64))).block_until_ready()\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "print(sum(n.startswith('tf_XLAEigen') for n in names))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) >= runtime.cpu_pool_size("")
