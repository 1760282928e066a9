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

``PJRT_NPROC`` is read when the CPU backend starts (the first computation),
so :func:`configure_cpu_pool` runs when :mod:`pact_jax` is imported; a value
the user has set is kept. If the backend already started, nothing changes:
set ``PJRT_NPROC`` in the environment then (see ``docs/sharding.md``).
"""

from __future__ import annotations

import os
import re

__all__ = ["configure_cpu_pool", "cpu_pool_size"]

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def cpu_pool_size(xla_flags: str = "", cpu_count: int | None = None) -> int:
    """A deadlock-free XLA:CPU pool size: the virtual device count (from
    ``xla_flags``) plus the core count plus 8 spare threads."""
    devices = max((int(n) for n in _DEVICE_COUNT.findall(xla_flags)), default=1)
    return devices + (cpu_count or os.cpu_count() or 1) + 8


def configure_cpu_pool() -> str:
    """Sets ``PJRT_NPROC`` to :func:`cpu_pool_size` unless already set; returns its value."""
    return os.environ.setdefault("PJRT_NPROC", str(cpu_pool_size(os.environ.get("XLA_FLAGS", ""))))
