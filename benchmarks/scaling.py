"""Sharded merge over 1, 2, 4, 8 devices: overhead (and, on real devices, speed-up).

Times a PACT + TSV-M merge (``pact_jax.chain(pact, merges.tsv)``) of a
synthetic model (``--layers`` Dense kernels ``(width, width)`` with biases,
``--tasks`` fine-tuned copies) with :func:`pact_jax.sharding.shard_merge` on
meshes of the first 1, 2, 4, 8 devices, plus the plain ``jax.jit`` merge on
one device for reference. Per row: first call (compile + run), median of
``--repeats`` steady-state calls (after one warm-up; inputs placed on the
mesh beforehand), ratio to the 1-device mesh, and the largest difference to
the unsharded result.

On a CPU-only machine the devices are *virtual*
(``--xla_force_host_platform_device_count``, set here before JAX starts): they
all share the same physical cores, so this measures the cost of partitioning
(collectives, padding, resharding), not a speed-up. Run it on a multi-GPU host
or a TPU slice for real scaling.

    python -m benchmarks.scaling                       # T=8, 8 layers of 128x128
    python -m benchmarks.scaling --layers 16 --width 512      # bigger
    python -m benchmarks.scaling --tasks 4 --layers 4 --width 64 --repeats 2   # quick
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def _model(key, layers: int, width: int, tasks: int):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(key, 2 * layers + 1)
    pre = {
        f"block_{i}": {
            "kernel": jax.random.normal(keys[i], (width, width)) / jnp.sqrt(width),
            "bias": jnp.zeros((width,)),
        }
        for i in range(layers)
    }

    def finetune(t):
        k = jax.random.fold_in(keys[-1], t)
        return jax.tree_util.tree_map(
            lambda x: x + 0.02 * jax.random.normal(jax.random.fold_in(k, x.size + x.ndim), x.shape), pre
        )

    return pre, [finetune(t) for t in range(tasks)]


def _timed(fn, repeats: int):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    jax.block_until_ready(fn())  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return out, first, statistics.median(runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--svd", choices=["exact", "randomized"], default="exact")
    args = parser.parse_args(argv)

    flag = "--xla_force_host_platform_device_count"
    if flag not in os.environ.get("XLA_FLAGS", ""):  # before the CPU backend starts
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={max(args.devices)}".strip()
    # jaxlib 0.10 CPU: a thread pool larger than the device count, or batched
    # LAPACK calls running on every device at once can deadlock it; and one
    # OpenBLAS thread per LAPACK call, which jaxlib already runs in parallel
    # (docs/sharding.md). Both apply to every row alike.
    os.environ.setdefault("PJRT_NPROC", str(max(args.devices) + (os.cpu_count() or 1)))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    import functools

    import jax
    import numpy as np

    import pact_jax
    from pact_jax import merges, sharding

    devices = jax.devices()
    if max(args.devices) > len(devices):
        raise SystemExit(f"asked for {max(args.devices)} devices, {len(devices)} available")
    pre, fts = _model(jax.random.key(0), args.layers, args.width, args.tasks)
    merge = pact_jax.chain(functools.partial(pact_jax.pact, svd=args.svd), merges.tsv, alpha=0.5)
    key = jax.random.key(1)

    print(
        f"PACT + TSV-M, T={args.tasks}, {args.layers} x ({args.width}, {args.width}) kernels + biases, "
        f"svd={args.svd}; {devices[0].platform} devices ({devices[0].device_kind}), "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; "
        f"PJRT_NPROC={os.environ['PJRT_NPROC']}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if devices[0].platform == "cpu":
        print(
            "NOTE: virtual CPU devices share the same physical cores: ratios show the "
            "overhead of partitioning, not a speed-up.",
            flush=True,
        )
    jitted = jax.jit(merge)
    header = f"{'':32} {'first call s':>12} {'median run s':>12} {'vs 1 dev':>9} {'max |diff|':>11}"
    print(header)
    print("-" * len(header), flush=True)

    def row(name, first, run, ratio, err):
        r = "" if ratio is None else f"{ratio:.2f}x"
        print(f"{name:32} {first:12.3f} {run:12.3f} {r:>9} {err:11.1e}", flush=True)

    reference, first, run = _timed(lambda: jitted(pre, fts, key=key), args.repeats)
    ref_leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(reference)]
    row("jax.jit, 1 device (no mesh)", first, run, None, 0.0)
    base = None
    for n in args.devices:
        mesh = sharding.make_mesh(devices[:n])
        smerge = sharding.shard_merge(merge, mesh)
        # Inputs placed once (as if restored sharded); each call still checks them for NaN/Inf.
        layout = sharding.param_shardings(pre, mesh)
        pre_n, fts_n = sharding.shard(pre, layout), [sharding.shard(ft, layout) for ft in fts]
        out, first, run = _timed(lambda: smerge(pre_n, fts_n, key=key), args.repeats)
        err = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree_util.tree_leaves(out), ref_leaves))
        base = run if base is None else base
        row(f"shard_merge, {n} device{'s' if n > 1 else ''}", first, run, run / base, err)


if __name__ == "__main__":
    main()
