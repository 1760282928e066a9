"""Peak memory of a streamed merge against its budget (issue 3).

Writes ``T`` fine-tuned + 1 pre-trained synthetic orbax checkpoints whose
model is several times larger than the group budget, then merges them in
fresh processes:

* ``streamed``: :func:`pact_jax.io.streaming.merge_checkpoints` with the budget;
* ``in memory``: the same merge with the whole model loaded (budget ``None``),
  for comparison (small models only).

Each run first does a **warm-up**: the same streamed merge (same budget,
``T``, method) of a small model whose groups compile the same programs: every
bias of the model but only ``--warmup-kernels`` of its kernels (the groups
then hold the same bucket sizes: 2 or 3 kernels, all biases). It pays the
one-time costs: JAX/XLA runtime, compiling the programs for the group shapes
(each new shape keeps several MiB of compiled code), orbax/tensorstore first
use. A warm-up of a model with fewer layers would not do: its bias bucket
is smaller, so the measured merge would compile another program.
Then the peak-RSS counter of the process is reset (``/proc/self/clear_refs``,
Linux) and the *baseline* is the RSS at that point. RSS is sampled once the
inputs are opened and checked (``opened``: every leaf's metadata read, the
writer created), and after the first and the last group: a per-group leak
would make the last grow with the number of groups. After the last group the
peak counter is read (*peak in groups*) and reset again, so that ``VmHWM`` at
the end is the peak of the writer's ``commit`` (orbax: ``_METADATA`` and the
OCDBT merge of the item) alone (*peak in commit*). The merge's *peak* is the
larger of the two; the bound to check is ``peak - baseline <= budget +
fixed overhead``. *after* is the RSS once the merge has returned and
``gc.collect()`` ran (what the merge leaves behind).

``--orbax-metadata`` reads the inputs through orbax's PyTree handler, as
pact_jax did before :func:`pact_jax.io.orbax.read_array_metadata` and
:class:`~pact_jax.io.orbax.ItemLeaves`: metadata by opening every leaf's
TensorStore array, each group by a partial ``PyTreeRestore``. For comparison.

    python -m benchmarks.streaming        # T=8, models of 32, 128, 256 MiB (1x, 4x, 8x a 32 MiB budget)
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

from benchmarks.speed import status_kib

MIB = 2**20


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _model(key, layers: int, width: int, kernels: int | None = None):
    """``layers`` blocks of a ``(width, width)`` kernel and a ``(width,)`` bias; only the
    first ``kernels`` blocks (default: all) have the kernel."""
    import jax
    import numpy as np

    params = {}
    for i in range(layers):
        k = jax.random.fold_in(key, i)
        block = {"bias": np.zeros((width,), np.float32)}
        if kernels is None or i < kernels:
            block["kernel"] = np.asarray(jax.random.normal(k, (width, width)) / np.sqrt(width), np.float32)
        params[f"block_{i}"] = block
    return {"params": params}


def write_checkpoints(root: Path, tasks: int, layers: int, width: int, kernels: int | None = None) -> None:
    import jax
    import numpy as np

    from pact_jax import io

    root.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(0)
    pre = _model(key, layers, width, kernels)
    io.save(root / "pre", pre, "orbax")
    for t in range(tasks):
        upd = _model(jax.random.fold_in(key, 1000 + t), layers, width, kernels)
        ft = jax.tree_util.tree_map(lambda a, b: (a + 0.05 * b).astype(np.float32), pre, upd)
        io.save(root / f"ft{t}", ft, "orbax")


def _merge_fn(method: str):
    from pact_jax import recipes

    # PACT in the perspective the method calls for (scalar for ties, subspace for tsv).
    return recipes.make_merge(method, use_pact=True, alpha=0.5)


def reset_peak_rss() -> None:
    """Resets this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_merge(
    root: Path,
    tasks: int,
    budget: int | None,
    method: str,
    layers: int,
    width: int,
    warmup_kernels: int,
    limit_malloc: bool = True,
    orbax_metadata: bool = False,
) -> dict:
    """In this (fresh) process: warm up, reset the peak counter, merge; returns the measurements."""
    import gc
    import shutil

    from pact_jax.io import orbax as orbax_io
    from pact_jax.io import streaming

    if orbax_metadata:  # the old path: orbax metadata (every leaf opened) and partial restores
        orbax_io.read_array_metadata = lambda item: None

    merge = _merge_fn(method)
    # Warm-up: the same merge and budget on a small model with the same group shapes.
    warm = root / "warm"
    shutil.rmtree(warm, ignore_errors=True)
    write_checkpoints(warm, tasks, layers=layers, width=width, kernels=min(layers, warmup_kernels))
    streaming.merge_checkpoints(
        warm / "pre", [warm / f"ft{t}" for t in range(tasks)], warm / "out", merge, budget_bytes=budget,
        limit_malloc=limit_malloc,
    )  # fmt: skip
    shutil.rmtree(warm)
    gc.collect()
    reset_peak_rss()
    baseline = _rss_now()
    out = root / f"out-{budget}"
    shutil.rmtree(out, ignore_errors=True)
    samples: list[int] = []
    groups_peak: list[int] = []

    def sampled(groups):
        samples.append(_rss_now())  # inputs opened and checked (metadata read), writer created
        for g in groups:
            yield g
            samples.append(_rss_now())  # after the group was merged and written
        # Every group written; what follows is the writer's commit.
        groups_peak.append(status_kib("VmHWM") * 1024)
        reset_peak_rss()

    start = time.perf_counter()
    report = streaming.merge_checkpoints(
        root / "pre", [root / f"ft{t}" for t in range(tasks)], out, merge, budget_bytes=budget, progress=sampled,
        limit_malloc=limit_malloc,
    )  # fmt: skip
    num_leaves, num_groups, largest_group = report.num_leaves, report.num_groups, report.largest_group_bytes
    seconds = time.perf_counter() - start
    commit_peak = status_kib("VmHWM") * 1024
    del report
    gc.collect()
    return {
        "budget": budget,
        "baseline": baseline,
        "groups_peak": groups_peak[0],
        "commit_peak": commit_peak,
        "peak": max(groups_peak[0], commit_peak),
        "end": _rss_now(),
        "leaves": num_leaves,
        "opened": samples[0],
        "first_group": samples[1] if len(samples) > 1 else samples[0],
        "last_group": samples[-1],
        "groups": num_groups,
        "largest_group": largest_group,
        "seconds": seconds,
    }


def _child(args) -> None:
    budget = None if args.budget_mib <= 0 else int(args.budget_mib * MIB)
    print(json.dumps(run_merge(Path(args.root), args.tasks, budget, args.method, args.child_layers, args.width,
                                args.warmup_kernels, not args.malloc_defaults, args.orbax_metadata)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--layers", type=int, nargs="+", default=[128, 512, 1024], help="model depths to compare")
    ap.add_argument("--warmup-kernels", type=int, default=8, help="kernels of the warm-up model (it has every bias)")
    ap.add_argument("--child-layers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--malloc-defaults", action="store_true",
                    help="merge with limit_malloc=False (glibc's adaptive mmap threshold: RSS creeps per group)")
    ap.add_argument("--orbax-metadata", action="store_true",
                    help="read the inputs through orbax's PyTree handler (metadata and partial restores), as before")
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

    import jax

    import pact_jax

    print(f"# streaming merge benchmark, PACT + {args.method}, T={args.tasks}, budget {args.budget_mib:g} MiB, "
          f"layers ({args.width}x{args.width} kernel + bias, float32), warm-up {args.warmup_kernels} kernels"
          f"{', glibc malloc defaults (limit_malloc=False)' if args.malloc_defaults else ''}"
          f"{', inputs read by orbax (--orbax-metadata)' if args.orbax_metadata else ''}; "
          f"{time.strftime('%Y-%m-%d')}")  # fmt: skip
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"jax {jax.__version__}, pact_jax {getattr(pact_jax, '__version__', '?')}")  # fmt: skip
    print("| model MiB | model / budget | run | leaves | groups | baseline RSS MiB | RSS opened / first / last group MiB "
          "| peak in groups / in commit MiB | peak - baseline MiB | / budget | peak - opened MiB "
          "| RSS after MiB | merge s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
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
                       "--tasks", str(args.tasks), "--budget-mib", str(budget_mib), "--method", args.method,
                       "--width", str(args.width), "--warmup-kernels", str(args.warmup_kernels),
                       "--child-layers", str(layers)] + (["--malloc-defaults"] if args.malloc_defaults else []) \
                      + (["--orbax-metadata"] if args.orbax_metadata else [])  # fmt: skip
                res = subprocess.run(cmd, check=True, capture_output=True, text=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                extra = (r["peak"] - r["baseline"]) / MIB
                ratio = f"{extra / (r['budget'] / MIB):.2f}" if r["budget"] else "-"
                print(
                    f"| {model_bytes / MIB:.0f} | {model_bytes / (args.budget_mib * MIB):.1f} | {name} | "
                    f"{r['leaves']} | {r['groups']} | "
                    f"{r['baseline'] / MIB:.0f} | {r['opened'] / MIB:.0f} / {r['first_group'] / MIB:.0f} / "
                    f"{r['last_group'] / MIB:.0f} | {r['groups_peak'] / MIB:.0f} / {r['commit_peak'] / MIB:.0f} | "
                    f"{extra:.0f} | {ratio} | {(r['peak'] - r['opened']) / MIB:.0f} | {r['end'] / MIB:.0f} | "
                    f"{r['seconds']:.1f} |",
                    flush=True,
                )


_WRITE = (
    "import sys; from pathlib import Path; from benchmarks.streaming import write_checkpoints; "
    "write_checkpoints(Path(sys.argv[1]), *map(int, sys.argv[2:]))"
)

if __name__ == "__main__":
    main()
