"""Speed and memory of merging LoRA adapters from their factors against materialising every dense delta (issue 16).

    python -m benchmarks.lora_speed             # 8 rank-16 adapters on one LLaMA-7B layer's shapes (~10-15 min on 2 cores)
    python -m benchmarks.lora_speed --quick     # tiny shapes, seconds (the CI smoke test)

One process, one layer group of a 7B decoder (synthetic weights, torch
layout ``(d_out, d_in)`` as PEFT / Hugging Face store them): ``q, k, v, o``
4096 x 4096, ``gate, up`` 11008 x 4096, ``down`` 4096 x 11008, with ``T = 8``
adapters of rank 16 on every matrix (``s = lora_alpha / r = 2``). Each
distinct shape is measured once and counted as often as the layer holds it
(4 / 2 / 1; ``--every-matrix`` runs all seven), so the group totals are sums
of per-shape measurements.

Rows (each the merged delta of every matrix, from the same factors):

* ``dense TA`` / ``dense TSV-M`` / ``dense PACT + TA``: the dense route: the
  ``(T, d_out, d_in)`` stack of ``s B A`` (:func:`pact_jax.lora.dense_delta`,
  its build counted), then :meth:`recipes.make_merge(...).delta_from_stacked
  <pact_jax.chain>` (:func:`pact_jax.merges.task_arithmetic`,
  :func:`pact_jax.merges.tsv`, :func:`pact_jax.pact` with its paper
  defaults);
* ``factor TA`` / ``factor TSV-M``: :func:`pact_jax.lora.task_arithmetic` /
  :func:`pact_jax.lora.tsv` on the stacked factors (never a ``(T, d_out,
  d_in)`` array);
* ``PACT LoRA variant + TA``: the dense stack, :func:`pact_jax.pact` with
  ``task_spaces = row_space(A)`` (DESIGN §1a step 9: no SVD of the dense
  deltas; PACT's other steps, the SVD of ``W0`` included, are unchanged),
  then task arithmetic.

The dense SVD-based rows use ``--dense-svd`` (default ``randomized``: the
library's faster option, which a user at these shapes would pick; ``exact``
takes ~13 s / ~33 s per full SVD of a 4096 x 4096 / 4096 x 11008 matrix on
this machine, i.e. ~20 min for dense TSV-M alone); the factor-aware TSV-M is
exact. Routes run one after the other over every shape (``--routes`` order;
each factor route before its dense baseline), and the report is rewritten
after every measurement, so a run stopped early keeps what it measured (marked
INCOMPLETE). ``--matrices`` keeps only some of the layer's matrices. Times:
each call is made once to compile, then timed once more; a call whose first
run exceeds ``--repeat-under`` seconds is not repeated (its time includes
compilation; the table marks it). Memory:
the peak RSS increase during the timed call (``VmHWM`` reset before it,
:class:`benchmarks.speed.PeakRSS`) and the bytes of the arrays each route
must hold (dense stack ``T m n`` vs factors ``T r (m + n)``, float32).

Writes ``benchmarks/results_lora_speed.md`` and ``.json`` (``--out``; a
temporary folder for ``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import pact_jax
from pact_jax import lora, recipes
from benchmarks import quality, report
from benchmarks.speed import PeakRSS

# One LLaMA-7B decoder layer, torch (d_out, d_in).
LAYER_7B: tuple[tuple[str, tuple[int, int]], ...] = (
    ("q_proj", (4096, 4096)), ("k_proj", (4096, 4096)), ("v_proj", (4096, 4096)), ("o_proj", (4096, 4096)),
    ("gate_proj", (11008, 4096)), ("up_proj", (11008, 4096)), ("down_proj", (4096, 11008)),
)
QUICK_LAYER: tuple[tuple[str, tuple[int, int]], ...] = (
    ("q_proj", (64, 64)), ("v_proj", (64, 64)), ("gate_proj", (96, 64)), ("down_proj", (64, 96)),
)
# Run in this order, route by route over the shapes: each cheap factor route before its dense baseline.
ROUTES: tuple[str, ...] = ("factor TA", "dense TA", "factor TSV-M", "dense TSV-M", "PACT LoRA variant + TA",
                           "dense PACT + TA")
BASELINE = {"factor TA": "dense TA", "factor TSV-M": "dense TSV-M", "PACT LoRA variant + TA": "dense PACT + TA"}
RULES = pact_jax.LeafRules(matrix=r"(^|/)weight$", layout="torch")


@dataclasses.dataclass(frozen=True)
class SpeedConfig:
    layer: tuple[tuple[str, tuple[int, int]], ...] = LAYER_7B
    tasks: int = 8
    rank: int = 16
    lora_alpha: float = 32.0
    every_matrix: bool = False
    dense_svd: str = "randomized"
    repeat_under: float = 20.0
    seed: int = 0

    def groups(self) -> list[tuple[list[str], tuple[int, int]]]:
        """``[(names, shape)]``: one entry per matrix, or per distinct shape with the names sharing it."""
        if self.every_matrix:
            return [([n], s) for n, s in self.layer]
        out: dict[tuple[int, int], list[str]] = {}
        for n, s in self.layer:
            out.setdefault(s, []).append(n)
        return [(names, s) for s, names in out.items()]


QUICK = SpeedConfig(layer=QUICK_LAYER, tasks=4, rank=4, lora_alpha=8.0, repeat_under=60.0)


def make_inputs(cfg: SpeedConfig, shape: tuple[int, int], index: int):
    """``(W0 tree, stacked LoraFactors)`` of one matrix: ``W0 ~ N(0, 1/d_in)``, ``A ~ N(0, 1/d_in)``,
    ``B ~ N(0, 1e-4)`` (a trained adapter's small update), ``s = lora_alpha / r``."""
    d_out, d_in = shape
    k0, ka, kb = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), index), 3)
    w0 = jax.random.normal(k0, (d_out, d_in), jnp.float32) / np.sqrt(d_in)
    a = jax.random.normal(ka, (cfg.tasks, cfg.rank, d_in), jnp.float32) / np.sqrt(d_in)
    b = 0.01 * jax.random.normal(kb, (cfg.tasks, d_out, cfg.rank), jnp.float32)
    scale = jnp.full((cfg.tasks,), cfg.lora_alpha / cfg.rank, jnp.float32)
    return {"m": {"weight": w0}}, {"m/weight": lora.LoraFactors(a, b, scale)}


def route_fn(route: str, cfg: SpeedConfig) -> Callable[[Any, Any], jax.Array]:
    """``(pre, factors) -> merged delta (d_out, d_in)`` of one route."""
    key = jax.random.key(cfg.seed + 1)
    svd = {} if cfg.dense_svd == "exact" else {"svd": "randomized", "key": key}

    def stack(f):  # the dense route's (T, d_out, d_in) task vectors
        return {"m": {"weight": lora.dense_delta(f["m/weight"], layout="torch")}}

    def dense(method, **kw):
        def fn(pre, f):
            merge = recipes.make_merge(method, rules=RULES, **kw)
            return merge.delta_from_stacked(pre, stack(f), key=key)["m"]["weight"]
        return fn

    def pact_ta(spaces: bool):
        def fn(pre, f):
            kw = {**svd, "task_spaces": {"m/weight": lora.row_space(f["m/weight"].a)}} if spaces else dict(svd)
            cleaned = pact_jax.pact(pre, stack(f), rules=RULES, **kw)
            return pact_jax.merges.task_arithmetic(cleaned, rules=RULES)["m"]["weight"]
        return fn

    fns = {
        "dense TA": dense("task_arithmetic"),
        "factor TA": lambda pre, f: lora.task_arithmetic(f)["m/weight"],
        "dense TSV-M": dense("tsv", method_kwargs={"svd": cfg.dense_svd}),
        "factor TSV-M": lambda pre, f: lora.tsv(f)["m/weight"],
        "dense PACT + TA": pact_ta(False),
        "PACT LoRA variant + TA": pact_ta(True),
    }
    return fns[route]


def measure(fn, pre, f, repeat_under: float) -> dict[str, Any]:
    """First call (compiles), then a timed call when the first took under ``repeat_under`` s."""
    gc.collect()
    with PeakRSS() as mem0:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(pre, f))
        first = time.perf_counter() - t0
    res = {"first_s": first, "rss_first": mem0.delta, "repeated": first < repeat_under}
    if res["repeated"]:
        del out
        gc.collect()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(pre, f))
            res["time_s"] = time.perf_counter() - t0
        res["rss"] = mem.delta
    else:
        res["time_s"], res["rss"] = first, mem0.delta
    res["out"] = np.asarray(out)
    return res


def run(cfg: SpeedConfig, routes: Sequence[str] = ROUTES, log: Callable[[str], None] = print,
        progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every route on every shape, route by route in ``routes``' order; ``progress(results so far)`` after
    each measurement (the group totals hold the routes measured on every shape)."""
    t_start = time.perf_counter()
    groups = cfg.groups()
    inputs = [make_inputs(cfg, shape, i) for i, (_, shape) in enumerate(groups)]
    jax.block_until_ready(inputs)
    per_shape = [{"names": names, "shape": list(shape), "count": len(names),
                  "dense_stack_bytes": 4 * cfg.tasks * shape[0] * shape[1],
                  "factor_bytes": 4 * cfg.tasks * cfg.rank * (shape[0] + shape[1]), "routes": {}}
                 for names, shape in groups]
    res = {
        "command": None, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": quality.machine(), "load": f"{os.getloadavg()[0]:.1f}", "config": {**dataclasses.asdict(cfg), "routes": list(routes)},
        "per_shape": per_shape, "totals": {},
        "bytes": {"dense_stack": sum(r["count"] * r["dense_stack_bytes"] for r in per_shape),
                  "factors": sum(r["count"] * r["factor_bytes"] for r in per_shape)},
        "wall_s": 0.0, "complete": False,
    }
    outs: dict[tuple[int, str], np.ndarray] = {}
    pairs = {v: k for k, v in BASELINE.items()}
    for route in routes:
        for i, ((names, (d_out, d_in)), (pre, f)) in enumerate(zip(groups, inputs)):
            r = measure(route_fn(route, cfg), pre, f, cfg.repeat_under)
            out = r.pop("out")
            row = per_shape[i]
            row["routes"][route] = r
            log(f"{'/'.join(names):<28} {d_out}x{d_in} {route:<24} {r['time_s']:8.2f} s "
                f"(first {r['first_s']:.2f} s), peak RSS +{r['rss'] / 2**20:8.1f} MiB")
            fast, base = (route, BASELINE[route]) if route in BASELINE else (pairs.get(route), route)
            other = base if route == fast else fast
            if (i, other) in outs:
                ref, got = (outs.pop((i, other)), out) if route == fast else (out, outs.pop((i, other)))
                row["routes"][fast]["rel_diff_vs_dense"] = float(np.linalg.norm(got - ref)
                                                                 / max(np.linalg.norm(ref), 1e-30))
            elif other in routes:
                outs[(i, route)] = out
            del out
            gc.collect()
            if all(route in row["routes"] for row in per_shape):
                res["totals"][route] = {
                    "time_s": sum(row["count"] * row["routes"][route]["time_s"] for row in per_shape),
                    "rss_max": max(row["routes"][route]["rss"] for row in per_shape)}
            res["wall_s"] = time.perf_counter() - t_start
            if progress:
                progress(res)
    res["complete"] = True
    res["totals"] = {r: res["totals"][r] for r in routes}
    return res


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f}" if b >= 2**20 else f"{b / 2**20:.2f}"


def markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = [
        "# LoRA merging: factor-aware against dense task vectors, speed and memory (issue 16)",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}; load average {res.get('load', 'n/a')} at the start (other jobs make times "
        "indicative; ratios are from the same process)  ",
        f"Date: {res['date']}; wall time {res['wall_s']:.0f} s"
        + ("." if res.get("complete", True) else " — **INCOMPLETE: the run was stopped before every route had run "
           "on every shape; routes missing from the group table were not measured on every shape.**"),
        "",
        f"T = {cfg['tasks']} adapters of rank {cfg['rank']} (lora_alpha {cfg['lora_alpha']:g}) on every matrix of one "
        "layer group: " + ", ".join(f"{n} {s[0]}x{s[1]}" for n, s in cfg["layer"]) + " (torch (d_out, d_in), "
        "synthetic float32). "
        + ("Every matrix measured." if cfg["every_matrix"] else
           "Each distinct shape measured once; group time = sum over matrices (a shape's time × how many "
           "matrices have it); group peak memory = the largest per-shape peak (matrices are merged one at a time).")
        + f" Dense SVD-based routes use svd='{cfg['dense_svd']}'; factor TSV-M is exact. Each call ran once to "
        f"compile and was timed on a second call, except calls whose first run took over {cfg['repeat_under']:g} s "
        "(marked *: one call, compilation included).",
        "",
        f"Array bytes the routes must hold for the group: dense (T, d_out, d_in) stacks {_mib(res['bytes']['dense_stack'])} "
        f"MiB against factors {_mib(res['bytes']['factors'])} MiB "
        f"({res['bytes']['dense_stack'] / res['bytes']['factors']:.0f}x).",
        "",
        "Layer group (one LLaMA-7B layer):",
        "",
    ]
    tot = res["totals"]
    rows = []
    for route, t in tot.items():
        base = BASELINE.get(route)
        ratio = (f"{tot[base]['time_s'] / max(t['time_s'], 1e-9):.1f}x faster, "
                 f"{tot[base]['rss_max'] / max(t['rss_max'], 1):.1f}x less peak RSS" if base in tot
                 else f"{base} not measured on every shape (see per shape)")
        rows.append([route, f"{t['time_s']:.2f}", _mib(t["rss_max"]), ratio if base else "(dense baseline)"])
    lines += report._table(["route", "time (s)", "peak RSS increase (MiB)", "against its dense baseline"], rows)
    lines += ["", "Per shape:", ""]
    rows = []
    for r in res["per_shape"]:
        for route, m in r["routes"].items():
            base = BASELINE.get(route)
            b = r["routes"].get(base) if base else None
            rows.append([
                f"{'/'.join(r['names'])} {r['shape'][0]}x{r['shape'][1]}", route,
                f"{m['time_s']:.3f}" + ("" if m["repeated"] else "*"), f"{m['first_s']:.3f}", _mib(m["rss"]),
                f"{b['time_s'] / max(m['time_s'], 1e-9):.1f}x / {b['rss'] / max(m['rss'], 1):.1f}x" if b else "",
                f"{m['rel_diff_vs_dense']:.1e}" if "rel_diff_vs_dense" in m else "",
            ])
    lines += report._table(["matrices", "route", "time (s)", "first call (s)", "peak RSS + (MiB)",
                            "speed-up / memory vs dense", "rel. diff vs dense"], rows)
    lines += ["", "Rel. diff: ‖factor − dense‖ / ‖dense‖ of the merged delta (TSV-M: against the dense route's "
              f"{cfg['dense_svd']} SVD; PACT LoRA variant: a different explicit space than the dense PACT's "
              "top-10 SVD of each delta, so not expected to agree).", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (the CI smoke test; seconds)")
    p.add_argument("--tasks", type=int, default=None, help="adapters T (default 8)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 16)")
    p.add_argument("--routes", nargs="+", default=None, choices=ROUTES, help="routes (default: all)")
    p.add_argument("--matrices", nargs="+", default=None, choices=[n for n, _ in LAYER_7B],
                   help="only these matrices of the layer (default: all seven)")
    p.add_argument("--every-matrix", action="store_true", help="measure all 7 matrices, not each shape once")
    p.add_argument("--dense-svd", choices=("exact", "randomized"), default=None,
                   help="SVD of the dense TSV-M / PACT routes (default randomized)")
    p.add_argument("--repeat-under", type=float, default=None,
                   help="time a second call only when the first took under this many seconds (default 20)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown output, JSON next to it (default benchmarks/results_lora_speed.md; "
                        "a temporary folder with --quick)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = QUICK if args.quick else SpeedConfig()
    changes = {k: v for k, v in (("tasks", args.tasks), ("rank", args.rank), ("dense_svd", args.dense_svd),
                                 ("repeat_under", args.repeat_under)) if v is not None}
    if args.every_matrix:
        changes["every_matrix"] = True
    if args.matrices:
        changes["layer"] = tuple((n, s) for n, s in cfg.layer if n in args.matrices)
        if not changes["layer"]:
            raise SystemExit(f"--matrices {' '.join(args.matrices)}: none of them is in the layer")
    cfg = dataclasses.replace(cfg, **changes)
    out = report.output_path(args.out, Path(__file__).parent / "results_lora_speed.md", args.quick)
    command = "python -m benchmarks.lora_speed" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(res):  # after every measurement: a stopped run leaves what it measured, marked incomplete
        res["command"] = command
        out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
        out.write_text(markdown(res))

    res = run(cfg, tuple(args.routes or ROUTES), log=lambda s: print(s, flush=True), progress=write)
    write(res)
    print(out.read_text())
    print(f"wrote {out}, {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
