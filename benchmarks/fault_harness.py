"""The harness of the fault-injection sweep (benchmarks/faults.py): inputs and running the command line.

Inputs: tiny models (:func:`model`, a shape per layer) written as the pre-trained and ``NUM_TASKS``
fine-tuned checkpoints of one format, with a reference merge (:func:`build` -> :class:`Fixture`); the
checks every case makes on them: :func:`hash_paths` (inputs byte-identical), :func:`equals_reference`
(the output complete and equal to the reference), :meth:`Fixture.leftovers` (``.pact-*`` files left).

Running: ``python -m pact_jax.cli`` in a subprocess (:func:`launch`, :func:`run_cli`) or
``pact_jax.cli.main`` here (:func:`run_in_process`), and :func:`hit`, which sends a signal at a
:class:`Point` (a delay after the start or after the output's lock / staging copy / output appeared).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io as _io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("orbax", "msgpack", "safetensors", "safetensors-dir", "t5x")
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
