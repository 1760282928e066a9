"""Fault injection for ``pact-jax merge`` / ``inspect`` (issue 14, item 9).

Runs the real command line (``python -m pact_jax.cli``) on tiny models in every
output format and hurts it:

* **kill9** -- SIGKILL at a sweep of points: fixed delays after the start, and
  delays after the output's lock file, its staging copy (``*.pact-tmp-*``) or
  the output itself appeared (polled every ~2 ms). Then: inputs byte-identical,
  the output absent or complete and equal to a reference merge, and the next
  run (in this process, so another pid) succeeds and leaves no ``.pact-*``
  file of the dead run behind.
* **sigint** / **sigterm** -- the same points (anchored on the lock, i.e. while
  writing), repeated: exit 130 / 143 with the one-line message, no crash (a
  negative exit status other than the signal's default action), nothing left
  behind, no output.
* **concurrent** -- four runs to one output path at once, without and with
  ``--overwrite``: without, exactly one succeeds and the others fail naming the
  path and the holder (or that the output exists); with, every run either
  succeeds or fails naming the holder. The output is complete either way.
* **diskfull** -- the output on a 5 MiB tmpfs (root only, ``mount -t tmpfs``;
  skipped with the reason otherwise): exit 1, one or two lines naming the path,
  no traceback, nothing left on the tmpfs, inputs intact.
* **corrupt** -- one fine-tuned input damaged (a leaf's bytes overwritten with
  NaN bit patterns or truncated, a broken header / index / metadata file):
  ``merge`` and ``inspect --pretrained`` exit 1 with a message naming the file
  and, where the damage is in one leaf, the leaf; never a traceback, never a
  merge.

``python -m benchmarks.faults`` prints a table (family x format: cases tried,
passed, clear errors, outputs lost or half-written, inputs changed, crashes)
and writes it to ``benchmarks/results_faults.{md,json}``; ``--quick`` runs a
small sweep and writes nothing unless ``--out`` is given. tests/test_faults.py
runs a few cases of each family in CI and the whole sweep as a slow test.

This file is the sweep, its table and the command line; the inputs, the checks
and running the command line are in benchmarks/fault_harness.py, the case
families in benchmarks/fault_cases.py (their names are re-exported here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.fault_cases import (
    ANY_LEAF,
    MAX_MESSAGE_CHARS,
    _record,
    check_after_kill,
    concurrent_case,
    corrupt_case,
    damages,
    diskfull_case,
    kill9_case,
    kill9_parallel,
    kill_points,
    signal_case,
    signal_points,
    small_tmpfs,
    tmpfs_unavailable,
)
from benchmarks.fault_harness import (
    BUDGET_MIB,
    FORMATS,
    METHOD,
    NUM_TASKS,
    POLL_S,
    REPO,
    RUN_TIMEOUT_S,
    Fixture,
    Point,
    Run,
    _env,
    _remove,
    build,
    equals_reference,
    finetuned,
    hash_paths,
    hit,
    launch,
    load_flat,
    model,
    phase,
    run_cli,
    run_in_process,
    unignore_sigint,
    use_compile_cache,
)

__all__ = [
    "ANY_LEAF", "BUDGET_MIB", "FAMILIES", "FORMATS", "MAX_MESSAGE_CHARS", "METHOD", "NUM_TASKS", "POLL_S", "QUICK",
    "REPO", "RUN_TIMEOUT_S", "Fixture", "Point", "Run", "Sweep", "_env", "build", "check_after_kill",
    "concurrent_case", "corrupt_case", "damages", "diskfull_case", "equals_reference", "finetuned", "hash_paths",
    "hit", "kill9_case", "kill9_parallel", "kill_points", "launch", "load_flat", "machine", "main", "model", "phase",
    "run_cli", "run_in_process", "signal_case", "signal_points", "small_tmpfs", "sweep", "table",
    "tmpfs_unavailable", "unignore_sigint", "use_compile_cache",
]  # fmt: skip

FAMILIES = ("kill9", "sigint", "sigterm", "concurrent", "diskfull", "corrupt")


# --------------------------------------------------------------------------
# The sweep


@dataclasses.dataclass(frozen=True)
class Sweep:
    kill_points: int = 8
    signal_points: int = 3
    signal_repeats: int = 2
    concurrent: int = 4
    formats: tuple[str, ...] = FORMATS
    families: tuple[str, ...] = FAMILIES
    diskfull_width: int = 448  # 8 layers, ~7 MiB per checkpoint: more than the 5 MiB tmpfs


QUICK = Sweep(kill_points=4, signal_points=1, signal_repeats=1)


def sweep(cfg: Sweep, root: Path, log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []

    def add(rec):
        records.append(rec)
        mark = "ok " if rec["passed"] else "BAD"
        log(f"{mark} {rec['family']:<10} {rec['format']:<15} {rec['case']:<40} rc={rec.get('rc')} "
            f"{rec.get('phase', '')} {rec['detail'][:200]}")  # fmt: skip

    unignore_sigint()
    no_tmpfs = tmpfs_unavailable() if "diskfull" in cfg.families else None
    use_compile_cache(root / "jax-cache")
    for fmt in cfg.formats:
        fix = build(root / fmt, fmt)
        log(f"-- {fmt}: reference run {json.dumps({k: round(v, 2) for k, v in fix.timing.items() if v})}")
        if "kill9" in cfg.families:
            for p in kill_points(fix, cfg.kill_points):
                add(kill9_case(fix, p))
        for fam, sig in (("sigint", signal.SIGINT), ("sigterm", signal.SIGTERM)):
            if fam in cfg.families:
                for _ in range(cfg.signal_repeats):
                    for p in signal_points(fix, cfg.signal_points):
                        add(signal_case(fix, p, sig))
        if "concurrent" in cfg.families:
            for ow in (False, True):
                add(concurrent_case(fix, ow, cfg.concurrent))
        if "corrupt" in cfg.families:
            for kind in damages(fmt):
                for command in ("merge", "inspect"):
                    add(corrupt_case(fix, kind, command))
        if "diskfull" in cfg.families:
            if no_tmpfs:
                records.append(_record("diskfull", fix, "skipped", skipped=no_tmpfs))
                log(f"skip diskfull {fmt}: {no_tmpfs}")
            else:
                big = build(root / f"{fmt}-big", fmt, width=cfg.diskfull_width, reference=None)
                add(diskfull_case(big))
                _remove(root / f"{fmt}-big")
        _remove(root / fmt)
    use_compile_cache(None)
    return records


def table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: family x format -> cases, passed, clear errors, outputs lost, inputs changed, crashes."""
    rows = ["| family | format | cases | passed | clear errors | outputs lost or half-written | inputs changed "
            "| crashes (segfaults) | notes |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = list(dict.fromkeys((r["family"], r["format"]) for r in records))
    for fam, fmt in keys:
        rs = [r for r in records if r["family"] == fam and r["format"] == fmt]
        skipped = [r for r in rs if r.get("skipped")]
        if skipped:
            rows.append(f"| {fam} | {fmt} | 0 | — | — | — | — | — | skipped: {skipped[0]['skipped']} |")
            continue
        errs = [r for r in rs if r["clear_error"] is not None]
        notes = _notes(fam, rs)
        rows.append(
            f"| {fam} | {fmt} | {len(rs)} | {sum(r['passed'] for r in rs)} | "
            + (f"{sum(bool(r['clear_error']) for r in errs)} / {len(errs)}" if errs else "—")
            + f" | {sum(bool(r['output_lost']) for r in rs)} | {sum(bool(r['inputs_changed']) for r in rs)} | "
            f"{sum(bool(r['crash']) for r in rs)} ({sum(r.get('rc') == -11 for r in rs)}) | {notes} |"
        )
    return "\n".join(rows)


def _notes(fam: str, rs: Sequence[dict[str, Any]]) -> str:
    if fam == "kill9":
        phases = {}
        for r in rs:
            phases[r["phase"]] = phases.get(r["phase"], 0) + 1
        dirty = sum(bool(r.get("leftovers_after_kill")) for r in rs)
        cleaned = sum(bool(r.get("leftovers_after_kill")) and r.get("leftovers_cleaned") for r in rs)
        where = ", ".join(f"{k} {v}" for k, v in phases.items())
        return f"killed while {where}; leftovers cleaned by the next run {cleaned}/{dirty}"
    if fam in ("sigint", "sigterm"):
        first = sum(bool(r.get("completed_first")) for r in rs)
        return f"merge completed before the signal: {first}" if first else ""
    if fam == "concurrent":
        return "; ".join(f"{r['case']}: {r['succeeded']} ok, {r['holder_named']} named the holder, "
                         f"{r['exists_named']} the existing output" for r in rs)  # fmt: skip
    if fam == "diskfull":
        return "; ".join(f"{r['stderr_lines']} stderr line(s){', traceback' if r['traceback'] else ''}" for r in rs)
    return ""


def machine() -> str:
    import jax

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, jax {jax.__version__}, "
            f"load average {os.getloadavg()[0]:.1f} at the start")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small sweep (4 kill points, 1 signal point per format)")
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--kill-points", type=int, help="SIGKILL points per format (default 8; --quick 4)")
    ap.add_argument("--signal-points", type=int, help="SIGINT / SIGTERM points per format (default 3; --quick 1)")
    ap.add_argument("--repeats", type=int, help="repeats of each signal point (default 2; --quick 1)")
    ap.add_argument("--out", help="write OUT.md and OUT.json (default: benchmarks/results_faults; --quick: none)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else Sweep()
    cfg = dataclasses.replace(cfg, formats=tuple(args.formats), families=tuple(args.families))
    given = {"kill_points": args.kill_points, "signal_points": args.signal_points, "signal_repeats": args.repeats}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    out = args.out or (None if args.quick else str(REPO / "benchmarks" / "results_faults"))
    start, host = time.time(), machine()
    with tempfile.TemporaryDirectory(prefix="pact-faults-") as d:
        records = sweep(cfg, Path(d))
    minutes = (time.time() - start) / 60
    command = " ".join(["python -m benchmarks.faults", *(argv if argv is not None else sys.argv[1:])])
    head = (f"Command: `{command}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(start))}; {host}; "
            f"{minutes:.1f} min.")  # fmt: skip
    md = head + "\n\n" + table(records)
    print("\n" + md)
    bad = [r for r in records if not r["passed"] and not r.get("skipped")]
    for r in bad:
        print(f"FAILED {r['family']} {r['format']} {r['case']}: {r['detail']}")
    if out:
        Path(out + ".md").write_text(md + "\n")
        Path(out + ".json").write_text(json.dumps({"command": command, "machine": host, "records": records},
                                                  indent=1, default=str))  # fmt: skip
    lost = sum(bool(r["output_lost"]) for r in records) + sum(bool(r["inputs_changed"]) for r in records)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
