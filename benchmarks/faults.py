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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io as _io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("orbax", "msgpack", "safetensors", "safetensors-dir", "t5x")
FAMILIES = ("kill9", "sigint", "sigterm", "concurrent", "diskfull", "corrupt")
METHOD = "task_arithmetic"
BUDGET_MIB = "0.02"  # several groups on the small model (each shape its own group)
NUM_TASKS = 3
REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.002
RUN_TIMEOUT_S = 180


# --------------------------------------------------------------------------
# Inputs


def model(seed: int, layers: int = 8, width: int = 24) -> dict:
    """``{"params": {"layer_i": {"kernel": (w+8i, w+4i+8), "bias": (w+4i+8,)}}}``: a shape per layer."""
    rng = np.random.default_rng(seed)
    params = {}
    for i in range(layers):
        d_in, d_out = width + 8 * i, width + 4 * i + 8
        params[f"layer_{i}"] = {"kernel": rng.normal(size=(d_in, d_out)).astype(np.float32),
                                "bias": rng.normal(size=(d_out,)).astype(np.float32)}  # fmt: skip
    return {"params": params}


def finetuned(pre: dict, seed: int) -> dict:
    rng = np.random.default_rng(1000 + seed)
    return _map(lambda a: (a + 0.05 * rng.normal(size=a.shape)).astype(a.dtype), pre)


def _map(f: Callable[[np.ndarray], np.ndarray], tree: dict) -> dict:
    return {k: _map(f, v) if isinstance(v, dict) else f(v) for k, v in tree.items()}


def _write_t5x(root: Path, params: dict) -> Path:
    """A T5X step directory in the orbax layout (``OrbaxCheckpointManagerInterface``, no OCDBT)."""
    import orbax.checkpoint as ocp

    param_states = _map(lambda a: np.zeros((1,), np.float32), params)
    state = {"target": params, "state": {"step": np.array(1, np.int32), "param_states": param_states}}
    manager = ocp.CheckpointManager(
        root.absolute(),
        item_names=("state",),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=False)},
        options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True),
    )
    manager.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    manager.wait_until_finished()
    manager.close()
    return root / "checkpoint_1"


def _write(path: Path, tree: dict, fmt: str) -> Path:
    from pact_jax import io

    if fmt == "t5x":
        return _write_t5x(path, tree["params"])
    name = {"msgpack": path.with_suffix(".msgpack"), "safetensors": path.with_suffix(".safetensors")}.get(fmt, path)
    return io.save(name, tree, "safetensors" if fmt == "safetensors-dir" else fmt)


@dataclasses.dataclass
class Fixture:
    """Inputs of one format under ``root/inputs``, the output path under ``root/out``."""

    fmt: str
    root: Path
    pre: Path
    fts: list[Path]
    out: Path
    layers: int = 8
    width: int = 24
    input_hash: str = ""
    reference: dict[str, np.ndarray] | None = None
    timing: dict[str, float] | None = None

    def argv(self, *extra: str, out: Path | None = None) -> list[str]:
        return ["merge", "--pretrained", str(self.pre), "--finetuned", *map(str, self.fts), "--method", METHOD,
                "--output", str(out or self.out), "--budget-mib", BUDGET_MIB, "--no-progress", *extra]  # fmt: skip

    @property
    def out_dir(self) -> Path:
        return self.out.parent

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.out_dir.iterdir() if ".pact-" in p.name)

    def clear_output(self) -> None:
        for p in self.out_dir.iterdir():
            _remove(p)

    def inputs(self) -> list[Path]:
        return [self.pre, *self.fts]

    @property
    def victim_leaf(self) -> str:
        """The leaf that corruption cases damage (in the second fine-tuned input), by pact_jax's path."""
        path = f"params/layer_{min(3, self.layers - 1)}/kernel"
        return path.removeprefix("params/") if self.fmt == "t5x" else path  # T5X paths are below 'target'

    def victim_bytes(self) -> bytes:
        """The victim leaf's bytes as a raw format stores them."""
        keys = f"params/{self.victim_leaf.removeprefix('params/')}".split("/")
        node = finetuned(model(0, self.layers, self.width), 1)
        for k in keys:
            node = node[k]
        return np.ascontiguousarray(node).tobytes()


def _out_name(fmt: str) -> str:
    return {"msgpack": "merged.msgpack", "safetensors": "merged.safetensors"}.get(fmt, "merged")


def build(root: Path, fmt: str, *, layers: int = 8, width: int = 24, reference: str | None = "timed") -> Fixture:
    """Writes the pre-trained and ``NUM_TASKS`` fine-tuned checkpoints of ``fmt`` under ``root``, and
    the reference merge: ``"timed"`` through the command line, noting when the lock, the staging copy
    and the output appear (after a warm-up run where the compilation cache is on); ``"in-process"``
    through :func:`run_in_process` (no timing; faster); ``None``: none."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
    root = Path(root)
    (root / "inputs").mkdir(parents=True)
    (root / "out").mkdir()
    pre = model(0, layers, width)
    pre_path = _write(root / "inputs" / "pre", pre, fmt)
    fts = [_write(root / "inputs" / f"ft{t}", finetuned(pre, t), fmt) for t in range(NUM_TASKS)]
    fix = Fixture(fmt, root, pre_path, fts, root / "out" / _out_name(fmt), layers, width)
    fix.input_hash = hash_paths(fix.inputs())
    if reference is None:
        return fix
    ref_out = root / "ref" / _out_name(fmt)
    ref_out.parent.mkdir()
    if reference == "in-process":
        code, _, err = run_in_process(fix.argv(out=ref_out))
        if code != 0:
            raise RuntimeError(f"reference merge of {fmt} failed ({code}):\n{err}")
    else:
        for _ in range(2 if _CACHE else 1):
            _remove(ref_out)
            fix.timing = _timed_run(fix.argv(out=ref_out), ref_out)
    fix.reference = load_flat(ref_out)
    return fix


def _timed_run(argv: Sequence[str], out: Path) -> dict[str, float | None]:
    """Runs the command line; seconds from the start until the lock, staging copy, output appeared, and the end."""
    run = launch(argv)
    times: dict[str, float | None] = {"lock": None, "tmp": None, "output": None}
    anchors = _anchors(out)
    while run.proc.poll() is None:
        for name, seen in anchors.items():
            if times[name] is None and seen():
                times[name] = time.perf_counter() - run.t0
        time.sleep(POLL_S)
    _, err = run.proc.communicate()
    if run.proc.returncode != 0:
        raise RuntimeError(f"reference merge {argv} failed ({run.proc.returncode}):\n{err}")
    times["end"] = time.perf_counter() - run.t0
    return times


def hash_paths(paths: Sequence[Path]) -> str:
    """SHA-256 over every file under ``paths`` (names and bytes)."""
    h = hashlib.sha256()
    for top in paths:
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for f in files:
            h.update(str(f.relative_to(top.parent)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def load_flat(path: Path) -> dict[str, np.ndarray]:
    from pact_jax import io

    return {k: np.asarray(v) for k, v in io.flatten(io.load(path)).items()}


def equals_reference(fix: Fixture, path: Path | None = None) -> tuple[bool, str]:
    """Whether the checkpoint at ``path`` (default: the output) loads and equals the reference."""
    try:
        got = load_flat(path or fix.out)
    except Exception as e:  # noqa: BLE001 - any failure to load is a broken output
        return False, f"does not load: {e}"
    want = fix.reference or {}
    if set(got) != set(want):
        return False, f"leaves differ: {sorted(set(got) ^ set(want))[:3]}"
    bad = [k for k in want if got[k].shape != want[k].shape or not np.array_equal(got[k], want[k])]
    return (not bad), (f"leaves differ from the reference: {bad[:3]}" if bad else "")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# --------------------------------------------------------------------------
# Running the command line


@dataclasses.dataclass
class Run:
    proc: subprocess.Popen
    t0: float


# A persistent XLA compilation cache shared by the runs of a sweep (set by :func:`use_compile_cache`):
# each group's first compile costs ~1 s on 2 busy cores, so cold runs spend ~90 % of their time
# compiling; with the cache a run is start-up, reading and writing, which is what the faults hit.
_CACHE: dict[str, str] = {}


def use_compile_cache(directory: Path | None) -> None:
    _CACHE.clear()
    if directory is not None:
        _CACHE.update(JAX_COMPILATION_CACHE_DIR=str(directory), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(_CACHE)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # the tests' 8 virtual devices: not what a user runs
    return env


def unignore_sigint() -> None:
    """A harness started in the background (nohup, ``&``) has SIGINT ignored, and its children inherit
    that: Python then installs no KeyboardInterrupt handler and a SIGINT would not reach the run. A
    handler of ours (any but ``SIG_IGN``) is reset to the default in a child at exec. Main thread only."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def launch(argv: Sequence[str]) -> Run:
    cmd = [sys.executable, "-m", "pact_jax.cli", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    return Run(proc, time.perf_counter())


def run_cli(argv: Sequence[str], timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, str]:
    run = launch(argv)
    try:
        out, err = run.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        out, err = run.proc.communicate()
        return -999, out, err + "\n[harness: timed out]"
    return run.proc.returncode, out, err


def run_in_process(argv: Sequence[str]) -> tuple[int, str, str]:
    """``pact_jax.cli.main(argv)`` here (no interpreter start-up): the "next run" after a kill."""
    from pact_jax import cli

    out, err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _anchors(out: Path) -> dict[str, Callable[[], bool]]:
    d, name = out.parent, out.name
    return {
        "lock": lambda: (d / f"{name}.pact-lock").exists(),
        "tmp": lambda: any(d.glob(f"{name}.pact-tmp-*")),
        "output": lambda: out.exists(),
    }


def phase(fix: Fixture) -> str:
    """Where the run is, from what is on disk: reading (no lock yet), writing, published."""
    a = _anchors(fix.out)
    if a["output"]():
        return "published"
    if a["lock"]() or a["tmp"]():
        return "writing"
    return "starting/reading"


@dataclasses.dataclass(frozen=True)
class Point:
    """``delay`` seconds after ``anchor`` (``start`` of the process, or the first moment the output's
    ``lock`` / staging ``tmp`` / ``output`` exists)."""

    anchor: str
    delay: float

    def __str__(self) -> str:
        return f"{self.anchor}+{self.delay:.2f}s"


def hit(fix: Fixture, point: Point, sig: int, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the merge and sends ``sig`` at ``point``; returns rc, stderr, the phase at the signal."""
    run = launch(argv or fix.argv())
    seen = _anchors(fix.out).get(point.anchor)
    sent, where = False, "exited first"
    while run.proc.poll() is None:
        if seen is None or seen():
            start = run.t0 if seen is None else time.perf_counter()
            while run.proc.poll() is None and time.perf_counter() < start + point.delay:
                time.sleep(POLL_S)
            if run.proc.poll() is None:
                where = phase(fix)
                run.proc.send_signal(sig)
                sent = True
            break
        time.sleep(POLL_S)
    try:
        _, err = run.proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        _, err = run.proc.communicate()
        err += "\n[harness: timed out after the signal]"
    return {"rc": run.proc.returncode, "stderr": err, "sent": sent, "phase": where, "point": str(point)}


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
