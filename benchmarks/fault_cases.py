"""The case families of the fault-injection sweep (benchmarks/faults.py); each case returns a record (dict).

* kill9 (:func:`kill9_case`, :func:`check_after_kill`), sigint / sigterm (:func:`signal_case`),
  concurrent (:func:`concurrent_case`), diskfull (:func:`diskfull_case`, root only) and corrupt
  (:func:`damages` per format, :func:`corrupt_case`). Every record has ``family``, ``format``,
  ``case``, ``passed``, ``clear_error``, ``output_lost``, ``inputs_changed``, ``crash``, ``detail``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.fault_harness import (
    RUN_TIMEOUT_S,
    Fixture,
    Point,
    _out_name,
    _remove,
    equals_reference,
    hash_paths,
    hit,
    launch,
    run_cli,
    run_in_process,
    unignore_sigint,
)


# --------------------------------------------------------------------------
# Case families; each returns a list of case records (dicts)


def _record(family: str, fix: Fixture, case: str, **kw: Any) -> dict[str, Any]:
    rec = {"family": family, "format": fix.fmt, "case": case, "passed": False, "clear_error": None,
           "output_lost": False, "inputs_changed": False, "crash": False, "detail": ""}  # fmt: skip
    rec.update(kw)
    return rec


def _crashed(rc: int, sig: int | None = None) -> bool:
    """A negative status other than the signal sent (its default action): a segfault, an abort."""
    return rc < 0 and (sig is None or rc != -sig)


def kill_points(fix: Fixture, n: int) -> list[Point]:
    """``n`` SIGKILL points: the moments the lock, the staging copy and the output appear, then points
    spread over the whole reference run and over its writing phase (after the lock)."""
    fixed = [Point("lock", 0.0), Point("tmp", 0.0), Point("output", 0.0)]
    if n <= len(fixed):
        return fixed[:n]
    t = fix.timing or {}
    end, lock = t.get("end") or 5.0, t.get("lock") or 0.0
    rest = n - len(fixed)
    n_time, n_lock = rest // 2 + rest % 2, rest // 2
    by_time = [Point("start", end * (i + 0.5) / n_time) for i in range(n_time)]
    by_lock = [Point("lock", max(end - lock, 0.05) * (i + 0.5) / n_lock) for i in range(n_lock)]
    return fixed + by_time + by_lock


def kill9_case(fix: Fixture, point: Point) -> dict[str, Any]:
    fix.clear_output()
    h = hit(fix, point, signal.SIGKILL)
    return check_after_kill(fix, h)


def kill9_parallel(cases: Sequence[tuple[Fixture, Point]]) -> list[dict[str, Any]]:
    """:func:`kill9_case` of each ``(fixture, point)`` (distinct fixtures), the kills at once in threads
    (the runs overlap; each is anchored on its own files), the checks and next runs one by one after."""
    from concurrent.futures import ThreadPoolExecutor

    if len({id(f) for f, _ in cases}) != len(cases):
        raise ValueError("kill9_parallel: one case per fixture (they share the output path)")
    for fix, _ in cases:
        fix.clear_output()
    with ThreadPoolExecutor(len(cases)) as pool:
        hits = list(pool.map(lambda c: hit(c[0], c[1], signal.SIGKILL), cases))
    return [check_after_kill(fix, h) for (fix, _), h in zip(cases, hits)]


def check_after_kill(fix: Fixture, h: dict[str, Any]) -> dict[str, Any]:
    rec = _record("kill9", fix, h["point"], phase=h["phase"], rc=h["rc"])
    problems = []
    rec["crash"] = _crashed(h["rc"], signal.SIGKILL)
    if h["rc"] not in (0, -signal.SIGKILL):
        problems.append(f"rc {h['rc']}: {h['stderr'][-300:]}")
    if fix.out.exists():
        ok, why = equals_reference(fix)
        if not ok:
            rec["output_lost"] = True
            problems.append(f"half-written output: {why}")
    rec["leftovers_after_kill"] = fix.leftovers()
    rec["inputs_changed"] = hash_paths(fix.inputs()) != fix.input_hash
    # The next run: another process (this one); overwrites a complete output, else writes it afresh.
    code, _, err = run_in_process(fix.argv(*(["--overwrite"] if fix.out.exists() else [])))
    if code != 0:
        problems.append(f"next run failed ({code}): {err.strip()[-300:]}")
        rec["output_lost"] = True
    else:
        ok, why = equals_reference(fix)
        if not ok:
            rec["output_lost"] = True
            problems.append(f"next run's output: {why}")
    left = fix.leftovers()
    if left:
        problems.append(f"left after the next run: {left}")
    if rec["inputs_changed"]:
        problems.append("inputs changed")
    rec["leftovers_cleaned"] = not left
    rec["passed"] = not problems and not rec["crash"]
    rec["detail"] = "; ".join(problems)
    return rec


def signal_case(fix: Fixture, point: Point, sig: int) -> dict[str, Any]:
    unignore_sigint()
    fix.clear_output()
    h = hit(fix, point, sig)
    family = "sigint" if sig == signal.SIGINT else "sigterm"
    rec = _record(family, fix, h["point"], phase=h["phase"], rc=h["rc"], stderr=h["stderr"][-1500:])
    want = 130 if sig == signal.SIGINT else 143
    word = "interrupted" if sig == signal.SIGINT else "terminated"
    problems = []
    rc, err = h["rc"], h["stderr"]
    rec["crash"] = _crashed(rc, sig)
    rec["segfault"] = rc == -signal.SIGSEGV
    published = rc == want and "was written (complete)" in err  # the signal came after the rename
    if not h["sent"] or (rc == 0 and h["phase"] == "published") or published:
        rec["completed_first"] = True  # the merge was done before the signal: a complete output
        ok, why = equals_reference(fix)
        if rc not in (0, want) or not ok:
            problems.append(f"rc {rc}; {why}")
            rec["output_lost"] = not ok
        if published:
            rec["clear_error"] = "Traceback" not in err
    else:
        if rc != want:
            problems.append(f"rc {rc}, want {want}")
        if f"{word} after" not in err:
            problems.append(f"no '{word} after' message: {err.strip()[-300:]!r}")
        if "Traceback" in err:
            problems.append("traceback printed")
        if fix.out.exists():
            ok, why = equals_reference(fix)
            problems.append("output present after the signal" + ("" if ok else f" and broken: {why}"))
            rec["output_lost"] = not ok
        rec["clear_error"] = rc == want and f"{word} after" in err and "Traceback" not in err
    left = fix.leftovers()
    if left:
        problems.append(f"left behind: {left}")
    rec["inputs_changed"] = hash_paths(fix.inputs()) != fix.input_hash
    if rec["inputs_changed"]:
        problems.append("inputs changed")
    rec["passed"] = not problems and not rec["crash"]
    rec["detail"] = "; ".join(problems)
    return rec


def signal_points(fix: Fixture, n: int) -> list[Point]:
    """``n`` points in the writing phase: after the lock appeared, spread over the reference run's rest."""
    t = fix.timing or {}
    writing = max((t.get("end") or 5.0) - (t.get("lock") or 0.0), 0.05)
    return [Point("lock", 0.9 * writing * i / max(1, n)) for i in range(n)]


def concurrent_case(fix: Fixture, overwrite: bool, n: int = 4) -> dict[str, Any]:
    """``n`` runs to one output at once. Without ``overwrite``: one succeeds, the others fail naming the
    path and the holder (or that the output exists). With it, over an existing older output: each run
    succeeds or fails naming the holder; the final output is a complete merge."""
    fix.clear_output()
    if overwrite:  # an older output to replace: a copy of the pre-trained checkpoint
        (shutil.copytree if fix.pre.is_dir() else shutil.copy2)(fix.pre, fix.out)
    runs = [launch(fix.argv(*(["--overwrite"] if overwrite else []))) for _ in range(n)]
    results = []
    for r in runs:
        try:
            _, err = r.proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            _, err = r.proc.communicate()
        results.append((r.proc.returncode, err))
    rcs = [rc for rc, _ in results]
    ok_runs = rcs.count(0)
    holder = [err for rc, err in results if rc == 1 and "another pact-jax run is writing this output (pid" in err
              and str(fix.out) in err]  # fmt: skip
    exists = [err for rc, err in results if rc == 1 and "already exists" in err and str(fix.out) in err]
    problems = []
    if overwrite:
        if ok_runs < 1:
            problems.append("no run succeeded")
        if ok_runs + len(holder) != n:
            problems.append(f"rcs {rcs}: a failure that does not name the holder")
    else:
        if ok_runs != 1:
            problems.append(f"{ok_runs} runs exited 0, want exactly 1 (rcs {rcs})")
        if ok_runs + len(holder) + len(exists) != n:
            problems.append(f"rcs {rcs}: a failure that names neither the holder nor the existing output")
    ok, why = equals_reference(fix)
    if not ok:
        problems.append(f"output: {why}")
    left = fix.leftovers()
    if left:
        problems.append(f"left behind: {left}")
    changed = hash_paths(fix.inputs()) != fix.input_hash
    return _record("concurrent", fix, f"{n} runs" + (", --overwrite" if overwrite else ""), rc=rcs,
                   passed=not problems and not changed, clear_error=len(holder) + len(exists) == n - ok_runs,
                   output_lost=not ok or (not overwrite and ok_runs > 1), inputs_changed=changed,
                   crash=any(_crashed(rc) for rc in rcs), holder_named=len(holder), exists_named=len(exists),
                   succeeded=ok_runs, detail="; ".join(problems))  # fmt: skip


# --------------------------------------------------------------------------
# Disk full


def tmpfs_unavailable() -> str | None:
    """Why a tmpfs cannot be mounted here (``None`` if it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root (mount -t tmpfs needs it)"
    if shutil.which("mount") is None:
        return "no mount command"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d], capture_output=True, text=True)
        if r.returncode != 0:
            return f"mount -t tmpfs failed: {r.stderr.strip()}"
        subprocess.run(["umount", d], check=False)
    return None


@contextlib.contextmanager
def small_tmpfs(size: str = "5m"):
    d = Path(tempfile.mkdtemp(prefix="pact-faults-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True, capture_output=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False, capture_output=True)
        d.rmdir()


def diskfull_case(fix: Fixture, size: str = "5m") -> dict[str, Any]:
    """The merge's output on a ``size`` tmpfs (the model must be larger: ``build(..., width=...)``)."""
    with small_tmpfs(size) as mnt:
        out = mnt / _out_name(fix.fmt)
        rc, _, err = run_cli(fix.argv(out=out))
        left = sorted(p.name for p in mnt.iterdir())
    lines = [ln for ln in err.splitlines() if ln.strip()]
    named = f"{out}: no space left on device" in err  # the output, not its staging copy
    traceback_seen = "Traceback" in err
    clear = rc == 1 and named and len(lines) <= 2 and not traceback_seen
    changed = hash_paths(fix.inputs()) != fix.input_hash
    problems = []
    if rc != 1:
        problems.append(f"rc {rc}")
    if not clear:
        problems.append(f"{len(lines)} stderr lines{', traceback' if traceback_seen else ''}"
                        f"{'' if named else ', path / reason not named'}: {err.strip()[-400:]!r}")  # fmt: skip
    if left:
        problems.append(f"left on the disk: {left}")
    return _record("diskfull", fix, f"output on a {size} tmpfs", rc=rc, passed=not problems and not changed,
                   clear_error=clear, inputs_changed=changed, crash=_crashed(rc), stderr_lines=len(lines),
                   traceback=traceback_seen, detail="; ".join(problems), stderr=err[-2000:])  # fmt: skip


# --------------------------------------------------------------------------
# Corrupt inputs: each damage(fix, victim) returns (what it did, the leaf path or None)

ANY_LEAF = "*"  # damage to some leaves, which the format does not let us choose: any one must be named
MAX_MESSAGE_CHARS = 600  # "one or two lines": longer is raw library text (TensorStore's JSON specs)


def _overwrite_in(file: Path, needle: bytes, data: bytes) -> None:
    blob = bytearray(file.read_bytes())
    at = bytes(blob).find(needle)
    if at < 0:
        raise RuntimeError(f"{file}: the leaf's bytes are not stored raw here")
    blob[at : at + len(data)] = data
    file.write_bytes(bytes(blob))


def _nan_leaf(fix: Fixture, victim: Path) -> tuple[str, str | None]:
    """Overwrite the first 64 bytes of the leaf's data with 0xFF (NaN bit patterns): formats that store
    arrays raw (msgpack, safetensors) have no checksum, so only non-finite values can be caught."""
    needle = fix.victim_bytes()
    files = [victim] if victim.is_file() else sorted(victim.rglob("*.safetensors"))
    for f in files:
        with contextlib.suppress(RuntimeError):
            _overwrite_in(f, needle[:64], b"\xff" * 64)
            return "leaf bytes -> 0xFF", fix.victim_leaf
    raise RuntimeError(f"{victim}: leaf bytes not found")


def _truncate(file: Path, keep: float = 0.6) -> None:
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(int(size * keep))


def _safetensors_header_trash(file: Path) -> None:
    blob = bytearray(file.read_bytes())
    blob[8:24] = b"#" * 16  # inside the JSON header
    file.write_bytes(bytes(blob))


def _orbax_data_files(item: Path) -> list[Path]:
    return sorted(p for p in item.rglob("*") if p.is_file() and p.parent.name == "d")


def damages(fmt: str) -> dict[str, Callable[[Fixture, Path], tuple[str, str | None]]]:
    """The corruptions tried per format: name -> damage(fix, victim) -> (description, leaf or None)."""

    def truncate_whole(fix, victim):
        _truncate(victim)
        return "file truncated to 60 %", None

    def header_bytes(fix, victim):
        blob = bytearray(victim.read_bytes())
        blob[:16] = b"\x00" * 16
        victim.write_bytes(bytes(blob))
        return "first 16 bytes zeroed", None

    def st_header(fix, victim):
        f = victim if victim.is_file() else sorted(victim.glob("*.safetensors"))[0]
        _safetensors_header_trash(f)
        return f"header of {f.name} overwritten", None

    def st_truncate_shard(fix, victim):
        f = sorted(victim.glob("*.safetensors"))[0]
        _truncate(f)
        return f"{f.name} truncated to 60 %", None

    def st_index(fix, victim):
        idx = victim / "model.safetensors.index.json"
        idx.write_text(idx.read_text()[:-20] if idx.exists() else "{not json")
        return "index JSON cut short", None

    def orbax_metadata(fix, victim):
        from pact_jax.io.orbax import item_directory

        md = item_directory(victim) / "_METADATA"
        md.write_text(md.read_text()[: len(md.read_text()) // 2])
        return "_METADATA cut in half", None

    def orbax_data(fix, victim):
        from pact_jax.io.orbax import item_directory

        biggest = max(_orbax_data_files(item_directory(victim)), key=lambda f: f.stat().st_size)
        _truncate(biggest, 0.5)
        return "largest OCDBT data file truncated to 50 %", ANY_LEAF  # OCDBT packs leaves: some are broken

    def orbax_manifest(fix, victim):
        from pact_jax.io.orbax import item_directory

        m = item_directory(victim) / "manifest.ocdbt"
        m.write_bytes(b"\x00" * m.stat().st_size)
        return "manifest.ocdbt zeroed", None

    def t5x_leaf(fix, victim):
        name = "target." + fix.victim_leaf.replace("/", ".")
        chunks = sorted(p for p in (victim / "state" / name).rglob("*")
                        if p.is_file() and not p.name.startswith((".z", "zarr.json")))  # fmt: skip
        if not chunks:
            raise RuntimeError(f"{victim}: no chunk files of {name}")
        for c in chunks:
            _truncate(c, 0.5)
        return f"{len(chunks)} chunk(s) of {name} truncated", fix.victim_leaf

    def t5x_leaf_meta(fix, victim):
        name = "target." + fix.victim_leaf.replace("/", ".")
        meta = [p for p in (victim / "state" / name / "zarr.json", victim / "state" / name / ".zarray") if p.exists()]
        if not meta:
            raise RuntimeError(f"{victim}: no zarr metadata of {name}")
        for m in meta:
            m.write_text("{broken")
        return f"zarr metadata of {name} broken", fix.victim_leaf

    def t5x_metadata(fix, victim):
        md = victim / "state" / "_METADATA"
        md.write_text(md.read_text()[: len(md.read_text()) // 2])
        return "state/_METADATA cut in half", None

    return {
        "orbax": {"data": orbax_data, "metadata": orbax_metadata, "manifest": orbax_manifest},
        "msgpack": {"nan-leaf": _nan_leaf, "truncated": truncate_whole, "header": header_bytes},
        "safetensors": {"nan-leaf": _nan_leaf, "truncated": truncate_whole, "header": st_header},
        "safetensors-dir": {"nan-leaf": _nan_leaf, "truncated-shard": st_truncate_shard, "header": st_header,
                            "index": st_index},  # fmt: skip
        "t5x": {"leaf-chunk": t5x_leaf, "leaf-zarr-meta": t5x_leaf_meta, "metadata": t5x_metadata},
    }[fmt]


def corrupt_case(fix: Fixture, kind: str, command: str = "merge", *, in_process: bool = False) -> dict[str, Any]:
    """Damages a copy of the second fine-tuned input with ``kind``, then runs ``command`` (``merge``;
    ``inspect`` = ``inspect FT --pretrained PRE``, which reads every leaf) on it; ``in_process`` runs
    ``pact_jax.cli.main`` here instead of a new interpreter (faster; absl's thread output not seen)."""
    fix.clear_output()
    victim_src = fix.fts[1]
    work = fix.root / "corrupt"
    _remove(work)
    work.mkdir()
    victim = work / victim_src.name
    (shutil.copytree if victim_src.is_dir() else shutil.copy2)(victim_src, victim)
    fts = list(fix.fts)
    fts[1] = victim
    damaged = dataclasses.replace(fix, fts=fts)
    what, leaf = damages(fix.fmt)[kind](fix, victim)
    argv = damaged.argv() if command == "merge" else ["inspect", str(victim), "--pretrained", str(fix.pre)]
    rc, _, err = (run_in_process if in_process else run_cli)(argv)
    message = err.strip()
    names_file = str(victim) in message
    if leaf == ANY_LEAF:
        names_leaf = any(f"leaf '{p}'" in message for p in (fix.reference or {}))
    else:  # by pact_jax's path, or by the file of the leaf (orbax names arrays with '.')
        names_leaf = leaf is None or leaf in message or f"{leaf.replace('/', '.')}/" in message
    traceback_seen = "Traceback" in err
    short = len(message.splitlines()) <= 2 and len(message) <= MAX_MESSAGE_CHARS
    clear = rc == 1 and names_file and names_leaf and not traceback_seen and short
    problems = []
    if rc == 0:
        problems.append("exit 0: a silent " + command)
    if not clear:
        problems.append(f"unclear (rc {rc}, file named: {names_file}, leaf named: {names_leaf}, traceback: "
                        f"{traceback_seen}, {len(message)} chars): {message[-300:]!r}")  # fmt: skip
    out_written = fix.out.exists() or bool(fix.leftovers())
    if out_written:
        problems.append(f"output written: {fix.leftovers() or fix.out.name}")
    changed = hash_paths(fix.inputs()) != fix.input_hash
    rec = _record("corrupt", fix, f"{command}: {kind} ({what})", rc=rc, passed=not problems and not changed,
                  clear_error=clear, inputs_changed=changed, crash=_crashed(rc), output_lost=out_written,
                  names_file=names_file, names_leaf=names_leaf, short=short, traceback=traceback_seen,
                  detail="; ".join(problems), message=message[-2000:])  # fmt: skip
    _remove(work)
    return rec

