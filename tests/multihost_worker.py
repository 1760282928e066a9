"""One process of the multi-host test (tests/test_multihost.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python tests/multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT_DIR
    ... python tests/multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID cli merge ARGS...

Every process builds the same tiny model from fixed keys, joins the
``jax.distributed`` cluster, merges on one global mesh of all processes'
devices with :func:`pact_jax.sharding.shard_merge`, gathers the result with
``multihost_utils.process_allgather`` and process 0 writes
``OUT_DIR/<case>.npz`` (one array per leaf path).

With ``cli``, the process instead runs ``pact-jax merge ARGS... --distributed``
with the coordinator, process count and id given (a streamed merge of
checkpoints on disk over the global mesh).

Importing this module touches no JAX backend (the test imports :func:`model`
and :data:`CASES` from it to compute the single-process reference).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import numpy as np

import pact_jax
from pact_jax import merges

# One merge (each compiles a sharded program per process): keyed (randomized
# SVDs), PACT on both sides, Iso-CTS.
CASES = {
    "pact_randomized+iso_cts": pact_jax.chain(
        functools.partial(pact_jax.pact, svd="randomized", side="both"), merges.iso_cts, alpha=0.8
    ),
}
KEY_SEED = 11


def model(t: int = 3):
    """``(pretrained, [finetuned] * t)``: a dict of Dense/DenseGeneral-like
    leaves, the same in every process (fixed keys)."""
    key = jax.random.key(0)
    ks = iter(jax.random.split(key, 12))
    pre = {f"block_{i}": {"kernel": jax.random.normal(next(ks), (8, 8)), "bias": jax.random.normal(next(ks), (8,))}
           for i in range(4)}
    pre["attn"] = {"out": {"kernel": jax.random.normal(next(ks), (2, 4, 8))}}
    fts = [
        jax.tree_util.tree_map(lambda x, i=i: x + 0.1 * jax.random.normal(jax.random.fold_in(key, 100 + i), x.shape), pre)
        for i in range(t)
    ]
    return pre, fts


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def main(coordinator: str, num_processes: int, process_id: int, out_dir: Path) -> None:
    from jax.experimental import multihost_utils

    from pact_jax import sharding

    sharding.initialize(coordinator, num_processes, process_id, cpu_collectives="gloo", initialization_timeout=60)
    assert jax.process_count() == num_processes, jax.process_count()
    mesh = sharding.make_mesh()  # every process's devices
    print(f"process {process_id}: {len(jax.local_devices())} local of {len(jax.devices())} devices", flush=True)
    pre, fts = model()
    key = jax.random.key(KEY_SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, merge in CASES.items():
        out = sharding.shard_merge(merge, mesh)(pre, fts, key=key)
        leaf = jax.tree_util.tree_leaves(out)[0]
        assert not leaf.is_fully_addressable and leaf.sharding.mesh.size == mesh.size, leaf.sharding
        gathered = multihost_utils.process_allgather(out, tiled=True)
        if process_id == 0:
            np.savez(out_dir / f"{name}.npz", **flat(gathered))
    multihost_utils.sync_global_devices("pact_jax multihost test done")
    print(f"process {process_id}: ok", flush=True)


def cli_main(coordinator: str, num_processes: int, process_id: int, argv: list[str]) -> None:
    """``pact-jax`` with ``argv`` as process ``process_id`` of a ``jax.distributed`` run."""
    from pact_jax import cli

    code = cli.main([*argv, "--distributed", "--coordinator-address", coordinator,
                     "--num-processes", str(num_processes), "--process-id", str(process_id)])  # fmt: skip
    print(f"process {process_id}: {len(jax.local_devices())} local of {len(jax.devices())} devices", flush=True)
    assert code == 0, f"pact-jax exited with {code}"
    print(f"process {process_id}: ok", flush=True)


if __name__ == "__main__":
    coordinator, n, pid, out = sys.argv[1:5]
    if out == "cli":
        cli_main(coordinator, int(n), int(pid), sys.argv[5:])
    else:
        main(coordinator, int(n), int(pid), Path(out))
