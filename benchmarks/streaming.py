"""Peak memory of a streamed merge against its budget (issue 3).

Writes ``T`` fine-tuned + 1 pre-trained synthetic orbax checkpoints whose
model is several times larger than the group budget, then merges them in
fresh processes:

* ``streamed``: :func:`pact_jax.io.streaming.merge_checkpoints` with the budget;
* ``in memory``: the same merge with the whole model loaded (budget ``None``),
  for comparison.

Each run reports its RSS after imports and a warm-up merge of one group's
shapes (the fixed overhead: Python, JAX, XLA executables) and its peak RSS;
the bound to check is ``peak - overhead <= budget``.

    python -m benchmarks.streaming                 # T=8, 160 MiB model, 32 MiB budget
    python -m benchmarks.streaming --tasks 4 --layers 16 --width 256 --budget-mib 4   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _model(key, layers: int, width: int):
    import jax
    import numpy as np

    params = {}
    for i in range(layers):
        k = jax.random.fold_in(key, i)
        params[f"block_{i}"] = {
            "kernel": np.asarray(jax.random.normal(k, (width, width)) / np.sqrt(width), np.float32),
            "bias": np.zeros((width,), np.float32),
        }
    return {"params": params}


def write_checkpoints(root: Path, tasks: int, layers: int, width: int) -> None:
    import jax
    import numpy as np

    from pact_jax import io

    key = jax.random.key(0)
    pre = _model(key, layers, width)
    io.save(root / "pre", pre, "orbax")
    for t in range(tasks):
        upd = _model(jax.random.fold_in(key, 1000 + t), layers, width)
        ft = jax.tree_util.tree_map(lambda a, b: (a + 0.05 * b).astype(np.float32), pre, upd)
        io.save(root / f"ft{t}", ft, "orbax")


def _merge_fn(method: str):
    import functools

    import pact_jax

    merger = {"tsv": pact_jax.merges.tsv, "ties": functools.partial(pact_jax.merges.ties, density=0.2)}[method]
    return pact_jax.chain(pact_jax.pact, merger, alpha=0.5)


def run_merge(root: Path, tasks: int, budget: int | None, method: str) -> dict:
    """In this (fresh) process: warm up, then merge; returns the measurements."""
    import shutil

    import jax
    import numpy as np

    from pact_jax import io
    from pact_jax.io import streaming

    merge = _merge_fn(method)
    pre = io.open_reader(root / "pre")
    meta = pre.metadata()
    # Warm-up: compile the kernels for one group of this model's shapes on zeros,
    # so the overhead includes the XLA executables the real merge reuses.
    groups = streaming.plan_groups(meta, tasks, budget)
    shapes = {p: meta[p] for p in groups[0]}
    zeros = io.unflatten({p: np.zeros(s.shape, s.dtype) for p, s in shapes.items()})
    ones = io.unflatten({p: np.full(s.shape, 1e-3, s.dtype) for p, s in shapes.items()})
    jax.block_until_ready(merge(zeros, [ones] * tasks))
    del zeros, ones
    overhead = _rss_now()
    out = root / f"out-{budget}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = streaming.merge_checkpoints(
        root / "pre", [root / f"ft{t}" for t in range(tasks)], out, merge, budget_bytes=budget
    )
    seconds = time.perf_counter() - start
    return {
        "budget": budget,
        "overhead": overhead,
        "peak": report.peak_rss_bytes,
        "groups": report.num_groups,
        "largest_group": report.largest_group_bytes,
        "seconds": seconds,
    }


def _child(args) -> None:
    budget = None if args.budget_mib <= 0 else int(args.budget_mib * MIB)
    print(json.dumps(run_merge(Path(args.root), args.tasks, budget, args.method)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--budget-mib", type=float, default=32.0)
    ap.add_argument("--method", choices=("tsv", "ties"), default="ties")
    ap.add_argument("--root", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-in-memory", action="store_true", help="only the streamed merge")
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return

    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        root = Path(tmp)
        model_bytes = args.layers * (args.width * args.width + args.width) * 4
        print(
            f"# streaming merge, PACT + {args.method}, T={args.tasks}, model {args.layers} x "
            f"({args.width}x{args.width} + bias) float32 = {model_bytes / MIB:.0f} MiB per checkpoint, "
            f"budget {args.budget_mib:.0f} MiB ({model_bytes / (args.budget_mib * MIB):.1f}x smaller than the model)"
        )
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _WRITE, str(root), str(args.tasks), str(args.layers), str(args.width)], check=True)
        print(f"# wrote {args.tasks + 1} checkpoints in {time.perf_counter() - t0:.0f} s")
        runs = [("streamed", args.budget_mib)] + ([] if args.skip_in_memory else [("in memory", 0)])
        rows = []
        for name, budget_mib in runs:
            cmd = [sys.executable, "-m", "benchmarks.streaming", "--child", "--root", str(root),
                   "--tasks", str(args.tasks), "--budget-mib", str(budget_mib), "--method", args.method]  # fmt: skip
            res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
            rows.append((name, json.loads(res.stdout.strip().splitlines()[-1])))
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print("| run | budget MiB | groups | est. largest group MiB | overhead RSS MiB | peak RSS MiB | peak - overhead MiB | within budget | merge s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        extra = (r["peak"] - r["overhead"]) / MIB
        budget = r["budget"]
        ok = "yes" if budget and extra <= budget / MIB else ("-" if not budget else "NO")
        print(
            f"| {name} | {budget / MIB if budget else 'none'} | {r['groups']} | {r['largest_group'] / MIB:.1f} | "
            f"{r['overhead'] / MIB:.0f} | {r['peak'] / MIB:.0f} | {extra:.0f} | {ok} | {r['seconds']:.1f} |"
        )


_WRITE = (
    "import sys; from pathlib import Path; from benchmarks.streaming import write_checkpoints; "
    "write_checkpoints(Path(sys.argv[1]), *map(int, sys.argv[2:]))"
)

if __name__ == "__main__":
    main()
