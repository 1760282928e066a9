"""The CPU thread-pool setting applied on import (pact_jax/runtime.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from pact_jax import runtime


def test_pool_size_counts_virtual_devices_and_cores():
    assert runtime.cpu_pool_size("", cpu_count=2) == 1 + 2 + 8
    assert runtime.cpu_pool_size("--foo --xla_force_host_platform_device_count=8", cpu_count=2) == 8 + 2 + 8


_VARS = ("PJRT_NPROC", "OPENBLAS_NUM_THREADS", "XLA_FLAGS")


def _fresh_python(code: str, **env: str) -> list[str]:
    """Whitespace-split stdout of ``code`` in a new interpreter without the runtime variables (plus ``env``)."""
    clean = {k: v for k, v in os.environ.items() if k not in _VARS}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_sets_the_cpu_runtime_and_keeps_user_values():
    code = "import os, pact_jax; print(os.environ['PJRT_NPROC'], os.environ['OPENBLAS_NUM_THREADS'])"
    assert _fresh_python(code) == [str(runtime.cpu_pool_size("")), "1"]
    assert _fresh_python(code, PJRT_NPROC="5", OPENBLAS_NUM_THREADS="2") == ["5", "2"]


def test_import_makes_the_cpu_pool_larger_than_the_cores():
    # The pool is sized when the backend starts; count its worker threads.
    code = (
        "import pact_jax, jax.numpy as jnp, os\n"
        "(jnp.ones((64, 64)) @ jnp.ones((64, 64))).block_until_ready()\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "print(sum(n.startswith('tf_XLAEigen') for n in names))"
    )
    (threads,) = _fresh_python(code)
    assert int(threads) >= runtime.cpu_pool_size("")


def test_jaxlib_lapack_runs_with_one_openblas_thread():
    # The setting must reach the OpenBLAS that jaxlib's LAPACK loads (SciPy's), i.e. be
    # in place before the first SVD: count that library's threads after one.
    code = (
        "import pact_jax, jax.numpy as jnp, os\n"
        "jnp.linalg.svd(jnp.ones((256, 256)))[1].block_until_ready()\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('scipy_openblas' in maps or 'openblas' in maps.lower())\n"
        "import threadpoolctl\n"
        "info = threadpoolctl.threadpool_info()\n"
        "print(*[i['num_threads'] for i in info if 'scipy.libs' in i['filepath']][:1] or ['none'])\n"
        "print(*[i['num_threads'] for i in info if 'numpy.libs' in i['filepath']][:1] or ['none'])"
    )
    out = _fresh_python(code)
    loaded, jaxlib_blas, numpy_blas = out
    assert loaded == "True"
    assert jaxlib_blas == "1", out
    # NumPy's own OpenBLAS, imported by pact_jax before the variable is set, keeps its threads.
    assert numpy_blas == "none" or int(numpy_blas) == (os.cpu_count() or 1), out
