"""Who owns an output path while a checkpoint is written there.

One writer per output path: :func:`lock_output` creates ``<dest>.pact-lock``
(whole or not at all: written under a staging name and hard-linked into place,
holding the owner's pid, host and start time) before anything is written; a
second writer fails at once, naming the path and the holder. A lock whose
owner process is gone (same host, pid no longer alive) is stale and taken
over. Staging and set-aside copies carry the owner's tag
(``<pid>@<host hash>``, :func:`owner_tag`), so a later run on the same output
removes the leftovers of owners that died (:func:`remove_leftovers`) and never
those of a live one, nor those written from another host; an interrupted run
removes its own (:func:`remove_own`). benchmarks/faults.py tries all of it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import zlib
from pathlib import Path

from pact_jax.io.base import CheckpointError

LOCK_SUFFIX = ".pact-lock"
# Names of staging / set-aside copies: <dest>.pact-tmp-<tag>-<token>, <dest>.pact-old-<tag>-<token>,
# and what a library derives from a staging name (orbax's partial save keeps its pending data in
# <staging>.partial_save.orbax-checkpoint-tmp): the same owner's.
LEFTOVER = re.compile(r"\.pact-(?:tmp|old)-(?P<pid>\d+)@(?P<host>[0-9a-f]{8})-[0-9a-f]+(?:\..+)?$")


def host_hash() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def owner_tag(pid: int | None = None) -> str:
    """``<pid>@<host hash>``: the part of a staging or set-aside name that says whose it is."""
    return f"{os.getpid() if pid is None else pid}@{host_hash()}"


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(pid: int, host: str) -> bool:
    return host == host_hash() and pid != os.getpid() and not alive(pid)


class OutputLock:
    """The lock file of one output path, held by this process until :meth:`release`."""

    def __init__(self, dest: Path):
        self.dest = Path(dest)
        self.path = self.dest.parent / (self.dest.name + LOCK_SUFFIX)
        self.held = False

    def acquire(self) -> OutputLock:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "host_hash": host_hash(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            for _ in range(2):  # a second try after taking over a stale lock
                self.held = True  # before the lock exists: an interrupt just after it appeared frees it
                if self._create(info):
                    return self
                self.held = False
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host_hash")
                if isinstance(pid, int) and _dead_here(pid, host or ""):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()  # stale: its owner died without releasing it
                    continue
                who = f"pid {pid} on {holder.get('host', '?')}, since {holder.get('started', '?')}" if pid else "unknown"
                raise CheckpointError(
                    f"{self.dest}: another pact-jax run is writing this output ({who}; lock file {self.path}). "
                    "Wait for it, or choose another output; remove the lock file only if that run is gone."
                )
        except BaseException:
            self.release()  # only if the lock file is this process's (see release)
            raise
        raise CheckpointError(f"{self.dest}: could not take the lock {self.path} (taken over by another run).")

    def _create(self, info: dict) -> bool:
        """Creates the lock file holding ``info``, whole or not at all: written to a staging name first and
        hard-linked into place (``link`` fails if the lock exists). A lock created empty and then written
        stayed empty when the run was killed in between, and no later run could tell whose it was.
        Where hard links are not supported, ``O_CREAT | O_EXCL`` and a write. False if the lock exists."""
        staged = self.dest.parent / f"{self.dest.name}.pact-tmp-{owner_tag()}-{os.urandom(5).hex()}"
        try:
            with open(staged, "x") as f:
                json.dump(info, f)
            try:
                os.link(staged, self.path)
            except FileExistsError:
                return False
            except OSError:  # no hard links here
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    json.dump(info, f)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        """Removes the lock file if this process holds it (not one another run took over since)."""
        if self.held:
            self.held = False
            if _mine(self._holder()):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()


def _mine(holder: dict) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host_hash") == host_hash()


def lock_output(dest: str | os.PathLike) -> OutputLock:
    """Takes the lock of output ``dest`` (see the module docstring); release it with ``.release()``."""
    return OutputLock(Path(dest)).acquire()


def remove_leftovers(dest: str | os.PathLike) -> list[Path]:
    """Removes the staging and set-aside copies next to ``dest`` whose owner process died on this
    host (a kill -9, a power cut); returns what it removed."""
    return _remove_copies(Path(dest), lambda pid, host: _dead_here(pid, host))


def remove_own(dest: str | os.PathLike) -> list[Path]:
    """Removes this process's lock of ``dest`` and its staging copies there (a set-aside output only
    where ``dest`` exists): what a run interrupted anywhere leaves, even before its writer took over
    the lock. Returns what it removed."""
    dest = Path(dest)
    removed = []
    lock = dest.parent / (dest.name + LOCK_SUFFIX)
    if _mine(OutputLock(dest)._holder()):
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
            removed.append(lock)
    return removed + _remove_copies(dest, lambda pid, host: pid == os.getpid() and host == host_hash())


def _remove_copies(dest: Path, whose) -> list[Path]:
    removed: list[Path] = []
    if not dest.parent.is_dir():
        return removed
    for p in dest.parent.glob(f"{glob_escape(dest.name)}.pact-*-*"):
        m = LEFTOVER.search(p.name)
        if not (m and p.name.startswith(dest.name + ".pact-") and whose(int(m["pid"]), m["host"])):
            continue
        if ".pact-old-" in p.name and not (dest.exists() or dest.is_symlink()):
            continue  # a publish that died between its two renames: this is the only copy of the output
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)
