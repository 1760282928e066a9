"""Fault injection on the real command line (issue 14, item 9): the fast cases of benchmarks/faults.py.

Every case runs ``python -m pact_jax.cli`` on tiny checkpoints (3 layers, 3 tasks) and hurts it: kill -9
while the output is being written, SIGINT / SIGTERM, four writers to one output, a full disk (root
only), a damaged input. The invariants: inputs byte-identical, no half-written output (absent, or equal
to the reference merge), the next run succeeds and removes the dead run's leftovers, failures end with
exit 1 and a short message naming the file (and the leaf). The whole sweep is ``test_full_sweep``
(slow) and ``python -m benchmarks.faults`` (benchmarks/RESULTS.md, "Reliability (issue 14)").
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root
from benchmarks import faults  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")  # orbax's and absl's warnings about the tiny inputs

SMALL = dict(layers=3, width=16)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """``{format: Fixture}``: inputs of every format and their reference merge (in-process: no timing)."""
    root = tmp_path_factory.mktemp("faults")
    faults.use_compile_cache(root / "jax-cache")
    try:
        yield {fmt: faults.build(root / fmt, fmt, reference="in-process", **SMALL) for fmt in faults.FORMATS}
    finally:
        faults.use_compile_cache(None)


def assert_passed(rec):
    assert rec["passed"], rec
    assert not rec["output_lost"] and not rec["inputs_changed"] and not rec["crash"], rec


def test_a_half_written_output_is_caught(fixtures):
    """The harness can fail: an output that does not equal the reference counts as lost."""
    fix = fixtures["msgpack"]
    fix.clear_output()
    fix.out.write_bytes(fix.pre.read_bytes()[:100])
    rec = faults.check_after_kill(fix, {"point": "none", "phase": "published", "rc": -9, "stderr": ""})
    assert rec["output_lost"] and not rec["passed"] and "half-written output" in rec["detail"]
    fix.clear_output()


@pytest.mark.parametrize("point", [faults.Point("tmp", 0.0), faults.Point("lock", 0.3)], ids=str)
def test_kill9_never_leaves_a_half_written_output(fixtures, point):
    """SIGKILL as the staging copy appears (for msgpack and single-file safetensors: in the commit) and
    0.3 s after the lock (while groups are merged), in every format at once; then the next run."""
    recs = faults.kill9_parallel([(fixtures[fmt], point) for fmt in faults.FORMATS])
    for rec in recs:
        assert_passed(rec)
        assert rec["leftovers_cleaned"]
    # At least some kills hit a run that was writing, and left a lock or staging copy to clean.
    assert any(rec["leftovers_after_kill"] for rec in recs), recs


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_while_writing_exits_cleanly(fixtures, sig):
    rec = faults.signal_case(fixtures["orbax"], faults.Point("lock", 0.2), sig)
    assert_passed(rec)
    if not rec.get("completed_first"):
        assert rec["rc"] == (130 if sig == signal.SIGINT else 143) and rec["clear_error"], rec


SWALLOWED = """
import gc, sys, time
from pact_jax import cli
from pact_jax.io import streaming

state = []
real_read = streaming._read


def callback(phase, info):  # the signal lands in a gc callback, as it did in JAX's _xla_gc_callback
    if phase == "start" and state == ["read"]:
        state.append("in gc")
        print("in gc", flush=True)
        time.sleep(5)


def read(*args, **kwargs):
    if not state:
        state.append("read")
        gc.callbacks.append(callback)
        gc.collect()
    return real_read(*args, **kwargs)


streaming._read = read
sys.argv = ["pact-jax", *sys.argv[1:]]
cli.entry_point()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_swallowed_by_a_gc_callback_still_stops_the_merge(fixtures, sig):
    """Python ignores an exception raised in a gc callback ("Exception ignored in: <function
    _xla_gc_callback>"): 2 of 16 signals in the sweep were lost that way and the merge ran on to exit 0.
    The run must still stop at the next group, exit 130 / 143, and write nothing."""
    import subprocess
    import sys

    fix = fixtures["msgpack"]
    fix.clear_output()
    proc = subprocess.Popen([sys.executable, "-c", SWALLOWED, *fix.argv()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=faults._env(), cwd=faults.REPO)  # fmt: skip
    assert proc.stdout.readline().strip() == "in gc"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err  # not "Exception ignored in: ..."
    assert not fix.out.exists() and fix.leftovers() == []


def test_an_interrupt_between_taking_the_lock_and_the_writer_leaves_nothing(fixtures, monkeypatch):
    """SIGINT right as the lock appeared left it behind (the sweep, safetensors-dir, lock+0.00s): the
    interrupt came after the lock was taken and before the writer that releases it existed."""
    from pact_jax.io import owner

    real = owner.lock_output

    def interrupted(dest):
        real(dest)
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, "lock_output", interrupted)
    fix = fixtures["safetensors-dir"]
    fix.clear_output()
    code, _, err = faults.run_in_process(fix.argv())
    assert code == 130 and "interrupted after" in err, err
    assert list(fix.out_dir.iterdir()) == []


def test_a_failed_cleanup_does_not_hide_the_interrupt(tmp_path, monkeypatch):
    """SIGTERM during T5X's orbax partial save (the sweep): the abort's rmtree raced orbax's writing
    thread ("[Errno 39] Directory not empty"), and that error replaced the interrupt: exit 1, not 143."""
    from pact_jax import io
    from pact_jax.io import msgpack

    def racing(self):
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(msgpack.Writer, "_abort", racing)
    with pytest.raises(KeyboardInterrupt):
        with io.open_writer(tmp_path / "out.msgpack", {"w": faults_template()}):
            raise KeyboardInterrupt
    assert not (tmp_path / "out.msgpack.pact-lock").exists()


def faults_template():
    import jax

    return jax.ShapeDtypeStruct((2,), np.float32)


def test_an_interrupt_after_the_output_was_published_says_so(fixtures, monkeypatch):
    """SIGTERM after the rename into place, before the run returned (the sweep: msgpack, lock+2.80s)
    printed "terminated ...; nothing was written" beside a complete output."""
    from pact_jax.io import streaming

    real = streaming.merge_checkpoints

    def then_interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming, "merge_checkpoints", then_interrupted)
    fix = fixtures["msgpack"]
    fix.clear_output()
    code, _, err = faults.run_in_process(fix.argv())
    assert code == 130 and "nothing was written" not in err and f"{fix.out} was written" in err, err
    assert faults.equals_reference(fix)[0] and fix.leftovers() == []


def test_four_writers_to_one_output(fixtures):
    rec = faults.concurrent_case(fixtures["safetensors-dir"], overwrite=False, n=4)
    assert_passed(rec)
    assert rec["succeeded"] == 1 and rec["holder_named"] + rec["exists_named"] == 3, rec


CORRUPT_LEAF = {"orbax": "data", "msgpack": "nan-leaf", "safetensors": "nan-leaf", "safetensors-dir": "nan-leaf",
                "t5x": "leaf-chunk"}  # fmt: skip


@pytest.mark.parametrize("fmt", faults.FORMATS)
def test_a_corrupt_leaf_is_named_by_merge_and_inspect(fixtures, fmt):
    for command in ("merge", "inspect"):
        rec = faults.corrupt_case(fixtures[fmt], CORRUPT_LEAF[fmt], command, in_process=True)
        assert rec["rc"] == 1 and rec["names_file"] and rec["names_leaf"] and not rec["traceback"], rec
        assert_passed(rec)


@pytest.mark.parametrize("fmt", ["msgpack", "safetensors"])
def test_a_broken_header_is_named_by_inspect_alone(fixtures, fmt):
    """``inspect CKPT`` reads only the header; damage there must still be a one-line error, not a listing."""
    from benchmarks.faults import damages

    fix = fixtures[fmt]
    work = fix.root / "header"
    work.mkdir()
    victim = work / fix.fts[0].name
    victim.write_bytes(fix.fts[0].read_bytes())
    damages(fmt)["header"](fix, victim)
    code, out, err = faults.run_in_process(["inspect", str(victim)])
    assert code == 1 and str(victim) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("fmt,kind", [("orbax", "manifest"), ("orbax", "metadata"), ("t5x", "leaf-zarr-meta"),
                                      ("safetensors-dir", "index"), ("msgpack", "truncated")])
def test_a_broken_header_or_index_is_one_short_line(fixtures, fmt, kind):
    """TensorStore appends its whole JSON spec (~1 KB) to its errors: the message keeps the file and the
    reason, not the spec (a damaged manifest.ocdbt read as 1.2 KB before)."""
    rec = faults.corrupt_case(fixtures[fmt], kind, "merge", in_process=True)
    assert rec["rc"] == 1 and rec["short"] and rec["names_file"] and "tensorstore_spec" not in rec["message"], rec
    assert_passed(rec)


def test_a_full_disk_wrapped_by_the_writer_is_still_one_sentence(tmp_path, monkeypatch):
    """orbax's writer wraps TensorStore's ENOSPC in its own error, naming its staging directory: the
    message must still name the output and say the disk is full (without root: no tmpfs needed)."""
    from pact_jax import io
    from pact_jax.io import orbax

    def full(self, arrays):
        raise io.CheckpointError(f"{self._item}: orbax cannot save leaves {list(arrays)}... (RESOURCE_EXHAUSTED: "
                                 "Failed to write: No space left on device [os_error_code='28'])")  # fmt: skip

    monkeypatch.setattr(orbax.Writer, "_write", full)
    out = tmp_path / "out"
    with pytest.raises(io.CheckpointError, match=rf"^{out}: no space left on device while writing 1 leaves"):
        io.save(out, {"w": np.ones(3, np.float32)})
    assert list(tmp_path.iterdir()) == []


def test_disk_full_names_the_path(tmp_path):
    """The orbax output on a 1 MiB tmpfs (root only): exit 1, the path and the reason in one or two lines,
    no traceback (absl's background-thread log included), nothing left, inputs intact."""
    why = faults.tmpfs_unavailable()
    if why:
        pytest.skip(why)
    faults.use_compile_cache(tmp_path / "jax-cache")
    try:
        fix = faults.build(tmp_path / "orbax", "orbax", layers=3, width=320, reference=None)  # ~1.3 MiB
        rec = faults.diskfull_case(fix, size="1m")
    finally:
        faults.use_compile_cache(None)
    assert rec["rc"] == 1 and not rec["inputs_changed"], rec
    assert rec["clear_error"], rec["stderr"]
    assert_passed(rec)


@pytest.mark.slow
def test_full_sweep(tmp_path):
    """The whole sweep (~15 min on 2 cores): nothing lost, nothing changed, nothing crashed."""
    records = faults.sweep(faults.Sweep(), tmp_path, log=lambda s: None)
    tried = [r for r in records if not r.get("skipped")]
    assert tried
    assert sum(r["output_lost"] for r in tried) == 0, [r for r in tried if r["output_lost"]]
    assert sum(r["inputs_changed"] for r in tried) == 0
    assert sum(r["crash"] for r in tried) == 0, [r for r in tried if r["crash"]]
    assert [r for r in tried if not r["passed"]] == []
    assert np.all([r["clear_error"] for r in tried if r["clear_error"] is not None])
