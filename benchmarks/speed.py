"""Speed and memory of pact_jax merges against plain NumPy / PyTorch loops (issue 6).

    python -m benchmarks.speed                     # default grid (--dry-run estimates its time here: 40-80 min on 2 cores)
    python -m benchmarks.speed --quick --out /tmp/speed      # tiny shapes, seconds (the CI test)
    python -m benchmarks.speed --models vit_b32 --tasks 8 --recipes pact_tsv --svd exact   # one cell, full model
    python -m benchmarks.speed --profile /tmp/prof --models vit_b32 --depth 1 --tasks 8    # hotspots

Synthetic checkpoints shaped like ViT-B/32, ViT-L/14 and T5-base
(:mod:`benchmarks.models`) are merged with PACT + TSV-M / Iso-CTS / TIES
(:data:`benchmarks.baselines.RECIPES`, pact_jax's defaults written out), PACT's
SVDs exact or randomized, by

* ``pact_jax``: ``jax.jit(recipes.make_merge(...))`` as the README uses it,
  compiled ahead of time (``.lower().compile()``: the compile time), then run
  ``--repeats`` times (``jax.block_until_ready``); ``--pact-mode eager`` calls
  the merge without the outer jit (compile time = first call - median);
  ``--budget-mib B`` merges group of leaves by group of leaves within a
  working-set budget (``make_merge(..., budget_bytes=)``; use it with
  ``--pact-mode eager``, where each group's buffers are freed before the next);
* ``numpy`` / ``torch``: the plain per-leaf loops of :mod:`benchmarks.baselines`
  (torch threads = ``os.cpu_count()``; NumPy uses its BLAS threads).

Every configuration (one dataset, recipe, SVD, implementation) runs in a fresh
process (``--no-isolate``: one process per dataset), which builds the
checkpoints, then times the merge. Reported per row: compile time; steady
time (median of the runs; a run slower than ``--run-budget`` s stops the
repeats); the ratio baseline / pact_jax; the nominal SVD + matmul GFLOP of
the algorithm each implementation runs (:mod:`benchmarks.flops`) and GFLOP/s against the float32 matmul peak measured
at the start of the same run (best of jax / NumPy / torch); peak RSS during the
runs minus the RSS before them (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, or a 1 ms sampler where that is refused), and that
increase divided by the bytes of the stacked task vectors (``T x`` model);
agreement: the largest per-leaf ``||merged_impl - merged_pact_jax||_F /
||merged_impl - W0||_F``.

Agreement tolerances (exact SVD): TIES 1e-5; TSV-M / Iso-CTS 5e-3. A matrix
leaf whose polar factor (TSV-M / Iso-CTS orthogonalisation) is taken of a
numerically rank-deficient matrix (``s_min / s_max < 1e-4`` in the baseline) is
reported apart as "rank-deficient". That happens whenever PACT removes the
same subspace from every task vector and the concatenated bases fill
``min(m, n)`` columns (Iso-CTS always; TSV-M when ``T`` divides ``min(m, n)``).
A full polar factor is then decided by rounding; all three implementations
drop the null-space triplets (:func:`pact_jax.linalg.significant`) and take
the partial isometry, which is unique, so these leaves must agree too.
Randomized rows differ by the sketches as well
(each library draws its own), so their agreement is informational.

Writes ``speed.md``, ``speed.json``, ``speed_scaling_T.png`` and
``speed_scaling_width.png`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

IMPLS = ("pact_jax", "numpy", "torch")
TOL = {"pact_ties": 1e-5, "pact_tsv": 5e-3, "pact_iso_cts": 5e-3}
ILL_POSED = 1e-4
MIB = 2**20


# --------------------------------------------------------------------------
# Grid


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A synthetic model (``depth`` / ``width`` override the named spec) and ``T``."""

    model: str
    tasks: int
    depth: int | None = None
    width: int | None = None

    def spec(self):
        from benchmarks.models import SPECS

        return SPECS[self.model].replace(depth=self.depth, width=self.width)


@dataclasses.dataclass(frozen=True)
class Cell:
    section: str
    data: Dataset
    recipe: str
    svd: str
    impls: tuple[str, ...]


def _svds(recipe: str, svds: list[str]) -> list[str]:
    # TIES runs PACT's scalar perspective: no SVD, so one row.
    return ["exact"] if recipe == "pact_ties" else list(svds)


def _dedup(cells: list[Cell]) -> list[Cell]:
    """One cell per (dataset, recipe, SVD): sections joined with '+', implementations united."""
    merged: dict[tuple, Cell] = {}
    for c in cells:
        k = (c.data, c.recipe, c.svd)
        if k in merged:
            old = merged[k]
            sections = old.section.split("+") + [x for x in c.section.split("+") if x not in old.section.split("+")]
            impls = old.impls + tuple(i for i in c.impls if i not in old.impls)
            merged[k] = Cell("+".join(sections), c.data, c.recipe, c.svd, impls)
        else:
            merged[k] = c
    return list(merged.values())


RECIPE_NAMES = ["pact_tsv", "pact_iso_cts", "pact_ties"]
T_SWEEP = Dataset("vit_b32", 0, depth=1, width=384)  # T filled in


def default_grid(baselines: list[str]) -> tuple[list[Cell], list[str]]:
    """The curated default grid (about 20-30 min on a quiet 2-core CPU) and what it leaves out, and why."""
    both = ["exact", "randomized"]
    cells = [Cell("key", Dataset("vit_b32", 8, depth=2), "pact_tsv", "exact", ("pact_jax", *baselines))]
    for t in (2, 4, 8, 14, 20):
        data = dataclasses.replace(T_SWEEP, tasks=t)
        for r in RECIPE_NAMES:
            for s in _svds(r, both):
                impls = ("pact_jax", *baselines) if t in (2, 8) and s == "exact" else ("pact_jax",)
                cells.append(Cell("T", data, r, s, impls))
    for w in (256, 384, 512, 768):
        cells.append(Cell("width", Dataset("vit_b32", 8, depth=1, width=w), "pact_tsv", "exact", ("pact_jax", *baselines)))
    for r in ("pact_tsv", "pact_ties"):
        cells.append(Cell("models", Dataset("t5_base", 4, depth=1), r, "exact", ("pact_jax", *baselines)))
    for s in both:
        cells.append(Cell("models", Dataset("vit_l14", 4, depth=1), "pact_tsv", s, ("pact_jax",)))
    skipped = [
        "Full-depth models: on 2 cores one full ViT-B/32 merge at T=8 (PACT + TSV-M, exact) is about 26 "
        "nominal TFLOP, several minutes per implementation. Every block of a model has the same shapes and "
        "cost, so the default grid uses 2 blocks of ViT-B/32 for the key cell (T=8, PACT + TSV-M exact, "
        "pact_jax vs NumPy vs PyTorch), 1 block at width 384 for the sweep in T, 1 block for the sweep in "
        "width, 1 layer per stack of T5-base (+ its 32128x768 shared embedding) and 1 block of ViT-L/14 "
        "at T=4. Full key cell (~20 min): `python -m benchmarks.speed --models vit_b32 --tasks 8 "
        "--recipes pact_tsv --svd exact`.",
        "Baselines (NumPy, PyTorch) in the sweep in T only at T in {2, 8} with exact SVD: each loop costs "
        "about as much as a pact_jax run, and the targets compare the exact paths.",
        "PACT + TIES with randomized SVD: PACT's scalar perspective (used with TIES) takes no SVD.",
        "ViT-L/14 at T=20 (and full depth): 20 x 1.2 GB of task vectors do not fit a 24 GB machine; that "
        "is the GPU run (`--models vit_l14 --tasks 20 --baselines` on the GPU host).",
        "Randomized vs exact at equal merged accuracy on the quality suite: not measured here (needs the "
        "quality benchmark's zoo); this benchmark reports the speed half of that target.",
    ]
    return _dedup(cells), skipped


def quick_grid(baselines: list[str]) -> tuple[list[Cell], list[str]]:
    """Tiny shapes, few compilations (3 processes, 4 pact_jax compilations): the CI test's run."""
    cells = [
        Cell("T+width", Dataset("vit_tiny", 2), "pact_tsv", "exact", ("pact_jax", *baselines)),
        Cell("T", Dataset("vit_tiny", 2), "pact_ties", "exact", ("pact_jax", *baselines[:1])),
        Cell("T", Dataset("vit_tiny", 3), "pact_tsv", "exact", ("pact_jax", *baselines)),
        Cell("width", Dataset("vit_tiny", 2, width=16), "pact_tsv", "exact", ("pact_jax", *baselines[:1])),
    ]
    return cells, ["--quick: tiny shapes, exact SVD only (the randomized path compiles for tens of "
                   "seconds); timings are not meaningful."]  # fmt: skip


def custom_grid(args) -> tuple[list[Cell], list[str]]:
    cells, skipped = [], []
    for model in args.models:
        for t in args.tasks:
            for r in args.recipes:
                for s in _svds(r, args.svd):
                    impls = ("pact_jax", *(args.baselines if t in args.baseline_tasks else []))
                    cells.append(Cell("T", Dataset(model, t, depth=args.depth, width=args.width), r, s, impls))
        if args.baselines and set(args.tasks) - set(args.baseline_tasks):
            skipped.append(f"{model}: baselines skipped at T in {sorted(set(args.tasks) - set(args.baseline_tasks))} "
                           "(--baseline-tasks)")  # fmt: skip
    for w in args.widths or []:
        for t in args.tasks:
            impls = ("pact_jax", *(args.baselines if t in args.baseline_tasks else []))
            cells.append(Cell("width", Dataset(args.models[0], t, depth=args.depth or 1, width=w),
                              args.recipes[0], args.svd[0], impls))  # fmt: skip
    return _dedup(cells), skipped


# --------------------------------------------------------------------------
# Memory


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakRSS:
    """Peak resident memory inside a ``with`` block, minus the RSS at its start (bytes).

    Resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and
    reads ``VmHWM`` at exit; where that is refused, a thread samples ``VmRSS``
    every millisecond.
    """

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.before = status_kib("VmRSS") * 1024
        self._stop = threading.Event()
        self._sampled = self.before
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "sampler"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, status_kib("VmRSS") * 1024)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            self.peak = status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self._sampled
        self.delta = max(0, self.peak - self.before)


# --------------------------------------------------------------------------
# Measurements (child process)


def _timed_runs(call, repeats: int, budget_s: float) -> tuple[list[float], Any, PeakRSS]:
    """Runs ``call()`` up to ``repeats`` times (at least once; stops once ``budget_s`` is spent)."""
    times, out = [], None
    with PeakRSS() as mem:
        while len(times) < repeats and (not times or sum(times) < budget_s):
            out = None
            gc.collect()
            t0 = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t0)
    return times, out, mem


def _pact_jax_merge(spec, recipe, svd: str, budget_mib: float | None = None):
    from benchmarks.models import rules_for
    from pact_jax import recipes

    # ``svd`` reaches every SVD of which only top factors are used: PACT's steps 1-2
    # and TSV-M's per-task truncation (Iso-CTS needs the full spectrum).
    return recipes.make_merge(
        recipe.method,
        use_pact=True,
        pact_kwargs=recipe.pact,
        method_kwargs=recipe.merger,
        svd=svd,
        alpha=recipe.alpha,
        rules=rules_for(spec),
        budget_bytes=None if budget_mib is None else int(budget_mib * MIB),
    )


def measure_pact_jax(
    spec, pre, fts, recipe, svd: str, *, mode: str, repeats: int, budget_s: float, seed: int, budget_mib=None
):
    """``(result dict, merged flat numpy dict)`` for pact_jax on flat NumPy inputs."""
    import jax
    import numpy as np

    from benchmarks.models import flatten, nest

    merge = _pact_jax_merge(spec, recipe, svd, budget_mib)
    key = jax.random.key(seed)
    pre_j = jax.device_put(nest(pre))
    fts_j = [jax.device_put(nest(ft)) for ft in fts]
    jax.block_until_ready((pre_j, fts_j))
    res: dict[str, Any] = {}
    if mode == "jit":
        fn = jax.jit(lambda p, f, k: merge(p, f, key=k))
        t0 = time.perf_counter()
        lowered = fn.lower(pre_j, fts_j, key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        res["trace_s"], res["compile_s"] = t1 - t0, time.perf_counter() - t1
        call = lambda: jax.block_until_ready(compiled(pre_j, fts_j, key))  # noqa: E731
    else:
        call = lambda: jax.block_until_ready(merge(pre_j, fts_j, key=key))  # noqa: E731
        t0 = time.perf_counter()
        call()
        res["first_s"] = time.perf_counter() - t0
    times, out, mem = _timed_runs(call, repeats, budget_s)
    if mode != "jit":
        res["compile_s"] = max(0.0, res["first_s"] - statistics.median(times))
    res.update(times=times, rss_before=mem.before, rss_delta=mem.delta, rss_method=mem.method, mode=mode,
               budget_mib=budget_mib)  # fmt: skip
    dev = jax.devices()[0]
    if dev.platform != "cpu" and hasattr(dev, "memory_stats"):
        res["device_peak_bytes"] = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    return res, {k: np.asarray(v) for k, v in flatten(out).items()}


def measure_baseline(impl: str, spec, pre, fts, recipe, svd: str, *, repeats: int, budget_s: float, seed: int):
    import numpy as np

    from benchmarks import baselines
    from benchmarks.models import AVERAGE

    average = AVERAGE[spec.family]
    conds: dict[str, float] = {}
    if impl == "torch":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        pre_i = {k: torch.from_numpy(v) for k, v in pre.items()}
        fts_i = [{k: torch.from_numpy(v) for k, v in ft.items()} for ft in fts]
    else:
        pre_i, fts_i = pre, fts
    merge = baselines.MERGES[impl]
    times, out, mem = _timed_runs(
        lambda: merge(pre_i, fts_i, recipe, average=average, svd=svd, seed=seed, conds=conds), repeats, budget_s
    )
    res = dict(times=times, rss_before=mem.before, rss_delta=mem.delta, rss_method=mem.method, conds=conds)
    return res, {k: np.asarray(v) for k, v in out.items()}


def agreement(pre, ref, got, conds: dict[str, float]) -> dict[str, Any]:
    """Largest per-leaf ``||got - ref||_F / ||got - W0||_F``, split by well-posed / ill-posed leaves."""
    import numpy as np

    worst = {"max_rel_err": 0.0, "leaf": None, "ill_posed_leaves": 0, "ill_posed_max_rel_err": 0.0}
    for path, w0 in pre.items():
        a = np.asarray(got[path], np.float64)
        b = np.asarray(ref[path], np.float64)
        err = float(np.linalg.norm(a - b) / max(np.linalg.norm(a - w0), 1e-30))
        if conds.get(path, 1.0) < ILL_POSED:
            worst["ill_posed_leaves"] += 1
            worst["ill_posed_max_rel_err"] = max(worst["ill_posed_max_rel_err"], err)
        elif err >= worst["max_rel_err"]:
            worst["max_rel_err"], worst["leaf"] = err, path
    return worst


def _save(path: Path, flat: dict) -> None:
    import numpy as np

    np.savez(path, **{k.replace("/", "|"): v for k, v in flat.items()})


def _load(path: Path) -> dict:
    import numpy as np

    with np.load(path) as z:
        return {k.replace("|", "/"): z[k] for k in z.files}


def run_child(payload: dict) -> None:
    """Builds one dataset and measures its jobs; prints one JSON line per job."""
    # Before the first JAX computation (building the models): pact_jax's CPU runtime
    # settings (pact_jax/runtime.py) only apply then. Without them the pact_jax
    # merge of one ViT-B/32 block at T = 8 hung here. NumPy (imported first by
    # pact_jax.runtime) and torch keep their default BLAS threads.
    import pact_jax  # noqa: F401
    import jax

    from benchmarks import baselines
    from benchmarks.flops import merge_flops
    from benchmarks.models import make_models, tree_bytes

    data = Dataset(**payload["data"])
    spec = data.spec()
    t0 = time.perf_counter()
    pre, fts = make_models(spec, data.tasks, jax.random.key(payload["seed"]))
    gen_s = time.perf_counter() - t0
    work = Path(payload["work"])
    for job in payload["jobs"]:
        recipe = baselines.RECIPES[job["recipe"]]
        kw = dict(repeats=payload["repeats"], budget_s=payload["run_budget"], seed=payload["seed"])
        if job["impl"] == "pact_jax":
            res, out = measure_pact_jax(
                spec, pre, fts, recipe, job["svd"], mode=payload["pact_mode"], budget_mib=payload["budget_mib"], **kw
            )
            _save(work / f"{job['id']}.npz", out)
        else:
            res, out = measure_baseline(job["impl"], spec, pre, fts, recipe, job["svd"], **kw)
            ref_file = work / f"{job['id']}.npz"
            if ref_file.exists():
                res["agreement"] = agreement(pre, _load(ref_file), out, res["conds"])
        del out
        res.pop("conds", None)
        res.update(
            job,
            data=dataclasses.asdict(data),
            label=spec.label,
            width=spec.width,
            depth=spec.depth,
            gen_s=gen_s,
            model_bytes=tree_bytes(pre),
            stacked_bytes=data.tasks * tree_bytes(pre),
            gflop=merge_flops(spec, data.tasks, recipe, job["svd"], job["impl"]) / 1e9,
        )
        print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------
# Parent


def matmul_peak(n: int, impls: list[str], repeats: int = 5) -> dict[str, float]:
    """Best float32 ``(n, n) @ (n, n)`` GFLOP/s in jax, NumPy and (if asked and installed) torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    flop = 2.0 * n**3
    ja, jdot = jnp.asarray(a), jax.jit(jnp.dot)
    calls = {"jax": lambda: jdot(ja, ja).block_until_ready(), "numpy": lambda: a @ a}
    if "torch" in impls:
        try:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            ta = torch.from_numpy(a)
            calls["torch"] = lambda: ta @ ta
        except ImportError:
            pass
    out = {}
    for name, call in calls.items():
        call()
        best = min(_time(call) for _ in range(repeats))
        out[name] = flop / best / 1e9
    return out


def _time(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def _job_id(cell: Cell) -> str:
    d = cell.data
    return f"{d.model}-d{d.depth}-w{d.width}-T{d.tasks}-{cell.recipe}-{cell.svd}"


def plan_children(cells: list[Cell], isolate: bool) -> list[tuple[Dataset, list[dict]]]:
    """Groups the jobs into child processes (pact_jax before the baselines of a cell)."""
    groups: dict[Dataset, list[dict]] = {}
    for cell in cells:
        for impl in cell.impls:
            job = {"id": _job_id(cell), "section": cell.section, "recipe": cell.recipe, "svd": cell.svd, "impl": impl}
            groups.setdefault(cell.data, []).append(job)
    if not isolate:
        return list(groups.items())
    return [(data, [job]) for data, jobs in groups.items() for job in jobs]


def run_grid(cells: list[Cell], args, work: Path) -> tuple[list[dict], list[str]]:
    results, failures = [], []
    children = plan_children(cells, not args.no_isolate)
    for i, (data, jobs) in enumerate(children, 1):
        payload = {
            "data": dataclasses.asdict(data),
            "jobs": jobs,
            "work": str(work),
            "seed": args.seed,
            "repeats": args.repeats,
            "run_budget": args.run_budget,
            "pact_mode": args.pact_mode,
            "budget_mib": args.budget_mib,
        }
        what = f"{data.model} d={data.depth} w={data.width} T={data.tasks}: " + ", ".join(
            f"{j['recipe']}/{j['svd']}/{j['impl']}" for j in jobs
        )
        print(f"[{i}/{len(children)}] {what}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "benchmarks.speed", "--child", json.dumps(payload)]
        root = Path(__file__).resolve().parents[1]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=args.child_timeout)
            stdout, stderr, status = proc.stdout, proc.stderr, f"exit {proc.returncode}" if proc.returncode else ""
        except subprocess.TimeoutExpired as e:  # a hung child must not stall the grid
            decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
            stdout, stderr, status = decode(e.stdout), decode(e.stderr), f"killed after {args.child_timeout:.0f} s"
        got = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
        results.extend(got)
        if status:
            tail = (stderr.strip().splitlines() or ["?"])[-1]
            failures.append(f"{what}: {status} after {len(got)} of {len(jobs)} jobs ({tail})")
            print(stderr[-3000:], file=sys.stderr)
    return results, failures


# --------------------------------------------------------------------------
# Report


def _median(r: dict) -> float:
    return statistics.median(r["times"])


def _rows(results: list[dict], peak: float) -> list[str]:
    by_cell = {(r["id"], r["impl"]): r for r in results}
    head = (
        "| section | model | T | recipe | SVD | impl | compile s | steady s (runs) | baseline / pact_jax | "
        "GFLOP | GFLOP/s | % peak | RSS Δ MiB | RSS Δ / stacked τ | max rel err | rank-deficient leaves (max err) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        t = _median(r)
        jx = by_cell.get((r["id"], "pact_jax"))
        ratio = f"{t / _median(jx):.2f}" if jx and r["impl"] != "pact_jax" else ""
        gf = r["gflop"]
        flops = f"{gf:.3g} | {gf / t:.3g} | {100 * gf / t / peak:.0f}" if gf else "- | - | -"
        agree, err, ill = r.get("agreement"), "", ""
        if agree:
            ok = agree["max_rel_err"] <= TOL[r["recipe"]]
            flag = "" if r["svd"] != "exact" else (" ok" if ok else " **MISMATCH**")
            err = f"{agree['max_rel_err']:.1e}{flag}"
            if agree["ill_posed_leaves"]:
                ill = f"{agree['ill_posed_leaves']} ({agree['ill_posed_max_rel_err']:.1e})"
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        lines.append(
            f"| {r['section']} | {r['label']} | {r['data']['tasks']} | {r['recipe']} | {r['svd']} | {r['impl']} | "
            f"{compile_s} | {t:.3g} ({len(r['times'])}) | {ratio} | {flops} | "
            f"{r['rss_delta'] / MIB:.0f} | {r['rss_delta'] / r['stacked_bytes']:.2f} | {err} | {ill} |"
        )
    return lines


def _targets(results: list[dict]) -> list[str]:
    out = []
    by = {(r["id"], r["impl"]): r for r in results}
    for r in results:
        tr = by.get((r["id"], "torch"))
        is_key = r["data"]["model"] == "vit_b32" and r["data"]["tasks"] == 8 and r["data"]["width"] is None
        if is_key and r["recipe"] == "pact_tsv" and r["svd"] == "exact" and r["impl"] == "pact_jax" and tr:
            ratio = _median(tr) / _median(r)
            verdict = "met" if ratio >= 2 else "NOT met"
            out.append(f"- PyTorch loop / pact_jax, exact, {r['label']} T={r['data']['tasks']}: **{ratio:.2f}x** "
                       f"(target >= 2x: {verdict})")  # fmt: skip
    pairs: dict[tuple, dict[str, float]] = {}
    for r in results:
        if r["impl"] == "pact_jax":
            pairs.setdefault((r["label"], r["data"]["tasks"], r["recipe"]), {})[r["svd"]] = _median(r)
    speedups = [v["exact"] / v["randomized"] for v in pairs.values() if {"exact", "randomized"} <= set(v)]
    if speedups:
        verdict = "met in some cells" if max(speedups) >= 5 else "NOT met"
        out.append(f"- Randomized vs exact (pact_jax, whole merge): {min(speedups):.2f}x .. {max(speedups):.2f}x "
                   f"over {len(speedups)} cells (target >= 5x: {verdict}; the equal-accuracy half of this target "
                   "needs the quality suite and is not measured here)")  # fmt: skip
    mem = [(r["rss_delta"] / r["stacked_bytes"], r) for r in results if r["impl"] == "pact_jax"]
    big = [(m, r) for m, r in mem if r["stacked_bytes"] >= 256 * MIB]
    if mem:
        worst, r = max(big or mem, key=lambda x: x[0])
        scope = "cells with >= 256 MiB of task vectors" if big else "all cells (all small: fixed overheads dominate)"
        verdict = "met" if worst <= 1.5 else "NOT met"
        out.append(f"- pact_jax peak RSS increase / stacked task vectors, worst over {scope}: {worst:.2f} "
                   f"({r['label']} T={r['data']['tasks']} {r['recipe']} {r['svd']}; target <= 1.5: {verdict})")  # fmt: skip
    return out


def _pact_jax_setting(results: list[dict]) -> str:
    rows = [r for r in results if r["impl"] == "pact_jax"]
    if not rows:
        return "not run"
    mode = "one jax.jit around the merge" if rows[0].get("mode", "jit") == "jit" else "eager (bucket kernels jitted)"
    budget = rows[0].get("budget_mib")
    return mode + ("; whole tree at once" if budget is None else f"; groups of leaves within a {budget:g} MiB budget")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        mem = f", {_status_mem_total() / 2**30:.0f} GiB RAM"
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def _status_mem_total() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024


def _versions() -> str:
    import jax
    import numpy as np

    parts = [f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind})", f"numpy {np.__version__}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({os.cpu_count()} threads)")
    except ImportError:
        parts.append("torch not installed")
    return ", ".join(parts)


def write_report(out: Path, results, failures, skipped, peaks, argv, wall_s) -> Path:
    peak = max(peaks.values())
    lines = [
        "# pact_jax speed & memory benchmark",
        "",
        f"- command: `python -m benchmarks.speed {shlex.join(argv)}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; wall time {wall_s / 60:.1f} min",
        f"- machine: {_machine()}",
        f"- software: {_versions()}, python {platform.python_version()}",
        "- float32 matmul peak measured in this run: "
        + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items())
        + f" GFLOP/s; '% peak' uses the best, {peak:.1f}",
        f"- pact_jax: {_pact_jax_setting(results)}",
        "",
        "## Targets",
        "",
        *(_targets(results) or ["- (no cell of this run measures a target)"]),
        "",
        "## Results",
        "",
        "Steady time: median of the runs after compilation. GFLOP: nominal SVD + matmul work of the "
        "algorithm each implementation runs (`benchmarks/flops.py`: pact_jax takes a Gram-matrix path for "
        "small truncated SVDs, the loops take full SVDs; TIES is element-wise: '-'). RSS Δ: peak RSS during the runs minus the RSS "
        "before them (inputs loaded). Agreement vs pact_jax: max over well-posed leaves of "
        "||x - x_pact_jax||_F / ||x - W0||_F (tolerance TIES 1e-5, TSV-M / Iso-CTS 5e-3; checked for exact SVD "
        "only); rank-deficient leaves: polar factor of a numerically rank-deficient matrix, null-space triplets dropped (see the module docstring).",
        "",
        *_rows(results, peak),
        "",
        "## Not run",
        "",
        *[f"- {s}" for s in skipped],
        *[f"- FAILED: {f}" for f in failures],
        "",
        "![scaling in T](speed_scaling_T.png) ![scaling in width](speed_scaling_width.png)",
        "",
    ]
    path = out / "speed.md"
    path.write_text("\n".join(lines))
    (out / "speed.json").write_text(json.dumps({"peaks": peaks, "results": results, "skipped": skipped,
                                                "failures": failures}, indent=1))  # fmt: skip
    return path


def plot(out: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for axis, section, fname in (("tasks", "T", "speed_scaling_T.png"), ("width", "width", "speed_scaling_width.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series: dict[tuple, list[tuple[int, float]]] = {}
        for r in results:
            if section not in r["section"].split("+"):
                continue
            x = r["data"]["tasks"] if axis == "tasks" else r["width"]
            where = f"{r['data']['model']} d={r['depth']}" + (f" w={r['width']}" if axis == "tasks" else f" T={r['data']['tasks']}")
            label = f"{r['impl']} {r['recipe']} {r['svd']} [{where}]"
            series.setdefault(label, []).append((x, _median(r)))
        ticks: set[int] = set()
        for label, pts in sorted(series.items()):
            pts.sort()
            ticks.update(p[0] for p in pts)
            style = "-o" if label.startswith("pact_jax") else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=4)
        if not series:
            ax.text(0.5, 0.5, f"no {axis} sweep in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("T (tasks)" if axis == "tasks" else "width d (MLP 4d)")
        ax.set_ylabel("steady merge time, s")
        ax.set_yscale("log")
        if ticks:
            ax.set_xticks(sorted(ticks))
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=6, ncol=2)
        ax.set_title(f"pact_jax vs plain loops: scaling in {'T' if axis == 'tasks' else 'width'}")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


# --------------------------------------------------------------------------
# Dry run


def estimate(cells: list[Cell], args) -> list[str]:
    """The plan with a rough time per job: nominal GFLOP / the nominal GFLOP/s of one
    NumPy ``768 x 768`` SVD measured now (TIES: 1 GB/s over the task vectors), plus
    guessed fixed costs (5 s process start and data, compile 5 s exact / 15 s randomized)."""
    import numpy as np

    from benchmarks import baselines, flops
    from benchmarks.models import num_params

    a = np.random.default_rng(0).standard_normal((768, 768), dtype=np.float32)
    np.linalg.svd(a, full_matrices=False)
    rate = flops.svd(768, 768) / min(_time(lambda: np.linalg.svd(a, full_matrices=False)) for _ in range(3))
    lines, total = [f"nominal SVD rate now: {rate / 1e9:.1f} GFLOP/s (NumPy, 768x768)"], 0.0
    for c in cells:
        spec = c.data.spec()
        gf = flops.merge_flops(spec, c.data.tasks, baselines.RECIPES[c.recipe], c.svd, "numpy")
        per_run = gf / rate if gf else 4.0 * num_params(spec) * c.data.tasks / 1e9
        runs = min(args.repeats, int(args.run_budget // max(per_run, 1e-9)) + 1)
        for impl in c.impls:
            fixed = 5.0 + ((5.0 if c.svd == "exact" else 15.0) if impl == "pact_jax" else 0.0)
            t = fixed + runs * per_run
            total += t
            lines.append(f"{c.section:8s} {spec.label:24s} T={c.data.tasks:<3d} {c.recipe:13s} {c.svd:10s} "
                         f"{impl:8s} ~{t:6.0f} s ({runs} x {per_run:.1f} s)")  # fmt: skip
    lines.append(f"ESTIMATE (rough, from the FLOP model): {total / 60:.0f} min")
    return lines


# --------------------------------------------------------------------------
# Profile


def profile(args, cell: Cell, out: Path) -> None:
    """One pact_jax merge under ``jax.profiler.trace`` plus a per-kernel breakdown (eager calls)."""
    import jax

    from benchmarks import baselines
    from benchmarks.models import make_models, matrix_views, nest
    from pact_jax import buckets

    spec = cell.data.spec()
    pre, fts = make_models(spec, cell.data.tasks, jax.random.key(args.seed))
    recipe = baselines.RECIPES[cell.recipe]
    merge = _pact_jax_merge(spec, recipe, cell.svd)
    pre_j, fts_j = nest(pre), [nest(f) for f in fts]
    key = jax.random.key(args.seed)
    timings: list[tuple[str, str, float]] = []
    original = buckets.batched_kernel

    def timed_kernel(kernel, static):
        fn = original(kernel, static)

        def call(*a):
            t0 = time.perf_counter()
            res = jax.block_until_ready(fn(*a))
            shapes = " ".join(str(tuple(x.shape)) for x in a if x is not None)
            timings.append((kernel.__name__, shapes, time.perf_counter() - t0))
            return res

        return call

    buckets.batched_kernel = timed_kernel
    try:
        jax.block_until_ready(merge(pre_j, fts_j, key=key))  # compiles
        timings.clear()
        t0 = time.perf_counter()
        jax.block_until_ready(merge(pre_j, fts_j, key=key))
        total = time.perf_counter() - t0
    finally:
        buckets.batched_kernel = original
    fn = jax.jit(lambda p, f, k: merge(p, f, key=k))
    jax.block_until_ready(fn(pre_j, fts_j, key))
    out.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(out)):
        t1 = time.perf_counter()
        jax.block_until_ready(fn(pre_j, fts_j, key))
        jit_s = time.perf_counter() - t1
    lines = [f"# profile: {spec.label} T={cell.data.tasks} {cell.recipe} {cell.svd}", "",
             f"eager merge {total:.3f} s (bucket kernels {sum(t for *_, t in timings):.3f} s); "
             f"jit merge {jit_s:.3f} s; trace in {out} (TensorBoard / Perfetto)", "",
             "| kernel | bucket shapes | s | % of eager merge |", "|---|---|---|---|"]  # fmt: skip
    for name, shapes, t in sorted(timings, key=lambda x: -x[2]):
        lines.append(f"| {name} | {shapes} | {t:.3f} | {100 * t / total:.0f} |")
    outside = total - sum(t for *_, t in timings)
    lines.append(f"| (outside the bucket kernels: validation, task vectors, stacking, apply) | | {outside:.3f} | "
                 f"{100 * outside / total:.0f} |")  # fmt: skip
    m, n = max(((m, n) for _, m, n in matrix_views(spec)), key=lambda mn: mn[0] * mn[1])
    lines += ["", *component_breakdown(m, n, cell.data.tasks, recipe, cell.svd, args.seed)]
    text = "\n".join(lines) + "\n"
    (out / "profile.md").write_text(text)
    print(text)


def component_breakdown(m: int, n: int, t: int, recipe, svd: str, seed: int = 0) -> list[str]:
    """Time of each decomposition PACT (``side='left'``, ``exclude_self``) + TSV-M run on one ``(m, n)``
    matrix with ``t`` tasks, each jitted alone on random input (best of 3): where a merge spends its time."""
    import jax
    import jax.numpy as jnp

    from benchmarks.baselines import resolve_rank, tsv_rank
    from pact_jax import linalg

    p = recipe.pact
    k, r, rt = resolve_rank(p["pretrained_rank"], m, n), resolve_rank(p["task_rank"], m, n), tsv_rank(m, n, t)
    keys = jax.random.split(jax.random.key(seed), 4)
    w0 = jax.random.normal(keys[0], (m, n))
    tau = jax.random.normal(keys[1], (t, m, n))
    cols = jax.random.normal(keys[2], (t, m, t * min(m, k)))
    kw = dict(method=svd, key=keys[3], oversample=p["oversample"], power_iters=p["power_iters"])
    parts = {
        f"PACT step 1: top {k} of W0": (lambda x: linalg.truncated_svd(x, k, **kw).u, w0),
        f"PACT step 2: top {r} of each tau_t": (lambda x: linalg.truncated_svd(x, r, **kw).u, tau),
        f"PACT step 3: SVD of M_t ({m}x{k}) per task": (lambda x: jnp.linalg.svd(x[:, :, :k], full_matrices=False)[0], cols),
        f"PACT step 4: span bases ({m}x{t * min(m, k)}) per task": (lambda x: linalg.span_basis(x, p["span_tol"])[0], cols),
        f"TSV-M: top {rt} of each tau_t": (lambda x: linalg.truncated_svd(x, rt, **kw).u, tau),
        f"TSV-M: polar factors ({m}x{t * rt}, {n}x{t * rt})": (
            lambda x: (linalg.polar(x[0, :, : t * rt]), linalg.polar(jnp.swapaxes(x[0], 0, 1)[:, : t * rt])),
            tau,
        ),
    }
    times = {}
    for name, (fn, x) in parts.items():
        f = jax.jit(fn)
        jax.block_until_ready(f(x))
        times[name] = min(_time(lambda: jax.block_until_ready(f(x))) for _ in range(3))
    total = sum(times.values())
    out = [f"## Decompositions on one {m}x{n} matrix, T={t}, svd={svd} (each jitted alone, best of 3)", "",
           "| part | s | % of the parts |", "|---|---|---|"]  # fmt: skip
    out += [f"| {name} | {v:.3g} | {100 * v / total:.0f} |" for name, v in times.items()]
    return out + [f"| total | {total:.3g} | 100 |"]


# --------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=("vit_b32", "vit_l14", "t5_base", "vit_tiny", "t5_tiny"))
    ap.add_argument("--tasks", nargs="+", type=int)
    ap.add_argument("--recipes", nargs="+", choices=("pact_tsv", "pact_iso_cts", "pact_ties"))
    ap.add_argument("--svd", nargs="+", choices=("exact", "randomized"))
    ap.add_argument("--baselines", nargs="*", choices=("numpy", "torch"), default=None,
                    help="default: numpy and torch (torch only if installed)")  # fmt: skip
    ap.add_argument("--baseline-tasks", nargs="+", type=int, default=[2, 8], help="T at which baselines run (custom grid)")
    ap.add_argument("--depth", type=int, default=None, help="blocks (ViT) / layers per stack (T5); default: the real model's")
    ap.add_argument("--width", type=int, default=None, help="override the width (MLP 4w, heads w/64)")
    ap.add_argument("--widths", nargs="+", type=int, default=None, help="custom grid: also sweep these widths")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one process per dataset (CI)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for speed.md, speed.json and the PNGs")
    ap.add_argument("--profile", metavar="DIR", help="profile one pact_jax merge (first cell of the grid) into DIR")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--run-budget", type=float, default=20.0, help="stop repeating once the runs took this many s")
    ap.add_argument("--pact-mode", choices=("jit", "eager"), default="jit")
    ap.add_argument("--budget-mib", type=float, default=None,
                    help="pact_jax merges groups of leaves within this working-set budget (with --pact-mode eager)")  # fmt: skip
    ap.add_argument("--no-isolate", action="store_true", help="one process per dataset instead of per job")
    ap.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (default 3072; --quick 256)")
    ap.add_argument("--child-timeout", type=float, default=900.0, help="kill a configuration's process after this many s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and a rough time estimate, run nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(json.loads(args.child))
        return 0

    if args.baselines is None:
        try:
            import torch  # noqa: F401

            args.baselines = ["numpy", "torch"]
        except ImportError:
            args.baselines = ["numpy"]
            print("torch not installed: NumPy baseline only (pip install torch==2.13.0)", file=sys.stderr)
    custom = any(v is not None for v in (args.models, args.tasks, args.recipes, args.svd, args.widths, args.width, args.depth))
    if args.quick:
        args.no_isolate = True
        args.repeats = min(args.repeats, 2)
        args.child_timeout = min(args.child_timeout, 300.0)
        cells, skipped = quick_grid(args.baselines)
    elif custom:
        args.models = args.models or ["vit_b32"]
        args.tasks = args.tasks or [2, 4, 8, 14, 20]
        args.recipes = args.recipes or ["pact_tsv", "pact_iso_cts", "pact_ties"]
        args.svd = args.svd or ["exact", "randomized"]
        cells, skipped = custom_grid(args)
    else:
        cells, skipped = default_grid(args.baselines)
    out = Path(args.out)
    if args.dry_run:
        print("\n".join(estimate(cells, args)))
        print("\n".join(f"not run: {x}" for x in skipped))
        return 0
    if args.profile:
        profile(args, cells[0], Path(args.profile))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    peaks = matmul_peak(args.peak_n or (256 if args.quick else 3072), args.baselines)
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="pact_speed_") as tmp:
        results, failures = run_grid(cells, args, Path(tmp))
    report = write_report(out, results, failures, skipped, peaks, argv, time.perf_counter() - start)
    plot(out, results)
    print(report.read_text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
