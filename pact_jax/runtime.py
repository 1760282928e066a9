"""Process settings for jaxlib's CPU backend that merging needs.

jaxlib 0.10's batched LAPACK kernels (the SVDs behind PACT and every SVD-based
merger) split their batch into sub-tasks on the CPU client's thread pool and
block until those finish. The pool has ``max(PJRT_NPROC or cores, devices)``
threads, so when as many such kernels run at once as the pool has threads
(asynchronously dispatched shape buckets on a 2-core machine, or one kernel
per virtual device) every thread waits and the process hangs forever.
Measured here (2 cores, one device): the PACT + TSV-M merge of one ViT-B/32
block at T = 8 hung with all threads idle on the default 2-thread pool, and
ran to completion with 8 threads. A larger pool costs only idle threads.

Each of those sub-tasks calls LAPACK from the OpenBLAS bundled with SciPy,
which by default starts one thread per core for every call: nested in the
pool, the threads oversubscribe the cores. Measured here (2 cores, PACT +
TSV-M, T = 8, 8 layers of 128 x 128, one process per setting): 13.8 s per
merge with OpenBLAS's default threads against 0.29 s with one thread (task
arithmetic after PACT: over 60 s against 0.17 s); the pool size itself (3 or
11 threads) made no difference with one BLAS thread.

Both variables are read late: ``PJRT_NPROC`` when the CPU backend starts (the
first computation), ``OPENBLAS_NUM_THREADS`` when jaxlib first loads SciPy's
OpenBLAS (the first SVD). So :func:`configure_cpu_runtime` runs when
:mod:`pact_jax` is imported and sets them unless the user has; a value the
user set is kept. If JAX already computed (or SciPy's LAPACK was used) before
the import, set them in the environment instead (see ``docs/sharding.md``).
One BLAS thread also applies to SciPy's own ``scipy.linalg`` calls in the
process; NumPy's separate OpenBLAS keeps its threads (this module imports
NumPy before setting the variable).
"""

from __future__ import annotations

import os
import re

# NumPy loads its own OpenBLAS, which reads OPENBLAS_NUM_THREADS once, on import:
# importing it before setting the variable keeps the user's NumPy multithreaded.
import numpy  # noqa: F401

__all__ = ["configure_cpu_runtime", "cpu_pool_size"]

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def cpu_pool_size(xla_flags: str = "", cpu_count: int | None = None) -> int:
    """A deadlock-free XLA:CPU pool size: the virtual device count (from
    ``xla_flags``) plus the core count plus 8 spare threads."""
    devices = max((int(n) for n in _DEVICE_COUNT.findall(xla_flags)), default=1)
    return devices + (cpu_count or os.cpu_count() or 1) + 8


def configure_cpu_runtime() -> dict[str, str]:
    """Sets ``PJRT_NPROC`` (:func:`cpu_pool_size`) and ``OPENBLAS_NUM_THREADS=1``
    unless already set; returns both values."""
    pool = str(cpu_pool_size(os.environ.get("XLA_FLAGS", "")))
    return {
        "PJRT_NPROC": os.environ.setdefault("PJRT_NPROC", pool),
        "OPENBLAS_NUM_THREADS": os.environ.setdefault("OPENBLAS_NUM_THREADS", "1"),
    }
