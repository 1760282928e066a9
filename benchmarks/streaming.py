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

    python -m benchmarks.streaming        # T=8, models of 8, 32 and 128 MiB, 32 MiB budget
    python -m benchmarks.streaming --tasks 4 --layers 4 16 --width 128 --budget-mib 2   # quick
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

    root.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(0)
    pre = _model(key, layers, width)
    io.save(root / "pre", pre, "orbax")
    for t in range(tasks):
        upd = _model(jax.random.fold_in(key, 1000 + t), layers, width)
        ft = jax.tree_util.tree_map(lambda a, b: (a + 0.05 * b).astype(np.float32), pre, upd)
        io.save(root / f"ft{t}", ft, "orbax")


def _merge_fn(method: str):
    from pact_jax import recipes

    # PACT in the perspective the method calls for (scalar for ties, subspace for tsv).
    return recipes.make_merge(method, use_pact=True, alpha=0.5)


def run_merge(root: Path, tasks: int, budget: int | None, method: str) -> dict:
    """In this (fresh) process: warm up, then merge; returns the measurements."""
    import shutil

    from pact_jax.io import streaming

    merge = _merge_fn(method)
    # Warm-up on a tiny model through the same path (orbax/tensorstore readers and
    # writer, JAX runtime, the merge code); the RSS after it is the fixed overhead.
    # Compiling the kernels for the real shapes is left to the measured merge.
    warm = root / "warm"
    shutil.rmtree(warm, ignore_errors=True)
    write_checkpoints(warm, tasks, layers=2, width=8)
    streaming.merge_checkpoints(warm / "pre", [warm / f"ft{t}" for t in range(tasks)], warm / "out", merge)
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
    ap.add_argument("--layers", type=int, nargs="+", default=[32, 128, 512], help="model depths to compare")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--budget-mib", type=float, default=32.0)
    ap.add_argument("--in-memory-max-layers", type=int, default=128, help="skip the in-memory run above this depth")
    ap.add_argument("--method", choices=("tsv", "ties"), default="ties")
    ap.add_argument("--root", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-in-memory", action="store_true", help="only the streamed merges")
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return

    print(f"# streaming merge benchmark, PACT + {args.method}, T={args.tasks}, budget {args.budget_mib:g} MiB, "
          f"layers ({args.width}x{args.width} kernel + bias, float32); {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print("| model MiB | model / budget | run | groups | overhead RSS MiB | peak RSS MiB | peak - overhead MiB "
          "| within budget | merge s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for layers in args.layers:
        model_bytes = layers * (args.width * args.width + args.width) * 4
        with tempfile.TemporaryDirectory(dir=args.root) as tmp:
            root = Path(tmp)
            subprocess.run([sys.executable, "-c", _WRITE, str(root), str(args.tasks), str(layers), str(args.width)],
                           check=True)  # fmt: skip
            in_memory = not args.skip_in_memory and layers <= args.in_memory_max_layers
            runs = [("streamed", args.budget_mib)] + ([("in memory", 0)] if in_memory else [])
            for name, budget_mib in runs:
                cmd = [sys.executable, "-m", "benchmarks.streaming", "--child", "--root", str(root),
                       "--tasks", str(args.tasks), "--budget-mib", str(budget_mib), "--method", args.method]  # fmt: skip
                res = subprocess.run(cmd, check=True, capture_output=True, text=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                extra = (r["peak"] - r["overhead"]) / MIB
                ok = "-" if not r["budget"] else ("yes" if extra <= r["budget"] / MIB else "NO")
                print(
                    f"| {model_bytes / MIB:.0f} | {model_bytes / (args.budget_mib * MIB):.1f} | {name} | {r['groups']} | "
                    f"{r['overhead'] / MIB:.0f} | {r['peak'] / MIB:.0f} | {extra:.0f} | {ok} | {r['seconds']:.1f} |",
                    flush=True,
                )


_WRITE = (
    "import sys; from pathlib import Path; from benchmarks.streaming import write_checkpoints; "
    "write_checkpoints(Path(sys.argv[1]), *map(int, sys.argv[2:]))"
)

if __name__ == "__main__":
    main()
