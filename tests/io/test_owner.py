"""One writer per output path, stale locks, leftovers of dead runs, publish's re-check (pact_jax.io.owner)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pact_jax import io
from pact_jax.io import CheckpointError, base, owner


def tree():
    return {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}


def template():
    import jax

    return {"params/w": jax.ShapeDtypeStruct((2, 3), np.float32)}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_writer_fails_at_once_naming_the_path_and_the_holder(tmp_path):
    dest = tmp_path / "out.msgpack"
    first = io.open_writer(dest, template())
    with pytest.raises(CheckpointError, match=rf"{dest}: another pact-jax run is writing this output \(pid {os.getpid()}"):
        io.open_writer(dest, template())
    first.write(io.flatten(tree()))
    first.commit()
    assert not (tmp_path / "out.msgpack.pact-lock").exists()  # released
    io.save(dest, tree(), overwrite=True)  # free again
    w = io.open_writer(tmp_path / "other", template())  # aborting frees it too
    w.abort()
    io.open_writer(tmp_path / "other", template()).abort()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dest = tmp_path / "out.msgpack"
    lock = tmp_path / "out.msgpack.pact-lock"
    lock.write_text(json.dumps({"pid": dead_pid(), "host": "here", "host_hash": owner.host_hash(), "started": "then"}))
    io.save(dest, tree())
    assert not lock.exists() and io.detect_format(dest) == "msgpack"


def test_a_lock_from_another_host_is_respected(tmp_path):
    (tmp_path / "out.msgpack.pact-lock").write_text(
        json.dumps({"pid": dead_pid(), "host": "elsewhere", "host_hash": "0badc0de", "started": "then"}))
    with pytest.raises(CheckpointError, match="another pact-jax run is writing this output .* on elsewhere"):
        io.save(tmp_path / "out.msgpack", tree())


def test_leftovers_of_dead_owners_are_removed_and_others_kept(tmp_path):
    dest = tmp_path / "out"
    dead, tag = dead_pid(), owner.host_hash()
    gone_tmp = tmp_path / f"out.pact-tmp-{dead}@{tag}-0123456789"
    gone_tmp.mkdir()
    mine = tmp_path / f"out.pact-tmp-{os.getpid()}@{tag}-0123456789"
    mine.mkdir()
    foreign = tmp_path / f"out.pact-tmp-{dead}@0badc0de-0123456789"
    foreign.write_text("another host's")
    old = tmp_path / f"out.pact-old-{dead}@{tag}-0123456789"
    old.mkdir()
    other_output = tmp_path / f"out2.pact-tmp-{dead}@{tag}-0123456789"
    other_output.write_text("x")
    # dest does not exist: the dead run's set-aside copy may be the only copy of the output, kept
    assert owner.remove_leftovers(dest) == [gone_tmp]
    assert mine.exists() and foreign.exists() and old.exists() and other_output.exists()
    dest.mkdir()
    assert owner.remove_leftovers(dest) == [old]


def test_staging_names_carry_the_owner(tmp_path):
    staged = base.staging_path(tmp_path / "out")
    assert owner.LEFTOVER.search(staged.name)["pid"] == str(os.getpid())


def test_an_output_that_appears_while_writing_is_not_replaced(tmp_path):
    dest = tmp_path / "out.msgpack"
    w = io.open_writer(dest, template())
    w.write(io.flatten(tree()))
    dest.write_text("written by someone else meanwhile")
    with pytest.raises(CheckpointError, match="appeared while this checkpoint was written; refusing to overwrite"):
        w.commit()
    assert dest.read_text() == "written by someone else meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.msgpack"]  # staging and lock removed


@pytest.mark.parametrize("restore_fails", [False, True])
def test_a_failed_publish_says_where_the_outputs_are(tmp_path, monkeypatch, restore_fails):
    dest = tmp_path / "out.msgpack"
    io.save(dest, tree())
    staged = tmp_path / "staged.msgpack"
    staged.write_text("new")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2 or (restore_fails and len(calls) == 3):
            raise OSError("disk says no")
        return real(src, dst)

    monkeypatch.setattr(base.os, "replace", flaky)
    with pytest.raises(CheckpointError) as e:
        base.publish(staged, dest)
    old = calls[0][1]
    if restore_fails:
        assert f"could not be moved back: it is at {old}; the new one is at {staged}" in str(e.value)
        assert old.exists() and not dest.exists()
    else:
        assert "the previous one is in place" in str(e.value) and dest.exists() and not old.exists()


def test_a_killed_writer_leaves_a_lock_and_staging_that_the_next_run_cleans(tmp_path):
    dest = tmp_path / "out.msgpack"
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np, jax
        from pact_jax import io
        w = io.open_writer({str(dest)!r}, {{"params/w": jax.ShapeDtypeStruct((2, 3), np.float32)}})
        w._staged.write_text("half written")
        print("ready", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(CheckpointError, match=rf"pid {proc.pid} on"):
            io.save(dest, tree())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if ".pact-" in p.name]
    assert len(leftovers) == 2  # the lock and the staged file of the killed run
    t0 = time.time()
    io.save(dest, tree())
    assert time.time() - t0 < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.msgpack"]


def test_leftovers_named_after_a_staging_path_are_removed_too(tmp_path):
    """orbax's partial save (the T5X orbax-layout writer) keeps its pending data in a sibling named
    after the staging path: ``<staging>.partial_save.orbax-checkpoint-tmp``; a kill -9 leaves it."""
    dest = tmp_path / "out"
    dead, tag = dead_pid(), owner.host_hash()
    pending = tmp_path / f"out.pact-tmp-{dead}@{tag}-0123456789.partial_save.orbax-checkpoint-tmp"
    pending.mkdir()
    live = tmp_path / f"out.pact-tmp-{os.getpid()}@{tag}-0123456789.partial_save.orbax-checkpoint-tmp"
    live.mkdir()
    assert owner.remove_leftovers(dest) == [pending]
    assert live.exists()


def test_a_lock_interrupted_while_being_written_leaves_no_empty_lock(tmp_path, monkeypatch):
    """kill -9 or Ctrl-C just after the lock file was created, before its holder was written, left an
    empty lock that no later run could take over ("another pact-jax run ... (unknown ...)")."""
    dest = tmp_path / "out.msgpack"
    real_dump = json.dump

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(owner.json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        owner.lock_output(dest)
    monkeypatch.setattr(owner.json, "dump", real_dump)
    assert not (tmp_path / "out.msgpack.pact-lock").exists()
    owner.remove_leftovers(dest)
    owner.lock_output(dest).release()
    assert list(tmp_path.iterdir()) == []


def test_release_removes_only_a_lock_this_process_holds(tmp_path):
    dest = tmp_path / "out"
    lock = owner.lock_output(dest)
    other = {"pid": dead_pid(), "host": "elsewhere", "host_hash": "0badc0de", "started": "then"}
    lock.path.write_text(json.dumps(other))  # taken over meanwhile by another run
    lock.release()
    assert json.loads(lock.path.read_text()) == other


def test_remove_own_removes_this_process_lock_and_staging_only(tmp_path):
    """What a run interrupted anywhere (even between taking the lock and handing it to its writer)
    removes on its way out: its lock and staging copies, not a set-aside output, nothing of others."""
    dest = tmp_path / "out"
    tag, dead = owner.owner_tag(), dead_pid()
    owner.lock_output(dest)  # never released: the interrupted run
    mine = tmp_path / f"out.pact-tmp-{tag}-0123456789"
    mine.mkdir()
    mine_old = tmp_path / f"out.pact-old-{tag}-0123456789"  # dest missing: the only copy of the output
    mine_old.mkdir()
    theirs = tmp_path / f"out.pact-tmp-{dead}@{owner.host_hash()}-0123456789"
    theirs.mkdir()
    removed = owner.remove_own(dest)
    assert sorted(removed) == sorted([tmp_path / "out.pact-lock", mine])
    assert mine_old.exists() and theirs.exists()
