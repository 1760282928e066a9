"""Who owns an output path while a checkpoint is written there.

One writer per output path: :func:`lock_output` creates ``<dest>.pact-lock``
(``O_CREAT | O_EXCL``, holding the owner's pid, host and start time) before
anything is written; a second writer fails at once, naming the path and the
holder. A lock whose owner process is gone (same host, pid no longer alive) is
stale and taken over. Staging and set-aside copies carry the owner's tag
(``<pid>@<host hash>``, :func:`owner_tag`), so a later run on the same output
removes the leftovers of owners that died (:func:`remove_leftovers`) and never
those of a live one, nor those written from another host.
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
# Names of staging / set-aside copies: <dest>.pact-tmp-<tag>-<token>, <dest>.pact-old-<tag>-<token>.
LEFTOVER = re.compile(r"\.pact-(?:tmp|old)-(?P<pid>\d+)@(?P<host>[0-9a-f]{8})-[0-9a-f]+$")


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
        for _ in range(2):  # a second try after taking over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
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
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return self
        raise CheckpointError(f"{self.dest}: could not take the lock {self.path} (taken over by another run).")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def lock_output(dest: str | os.PathLike) -> OutputLock:
    """Takes the lock of output ``dest`` (see the module docstring); release it with ``.release()``."""
    return OutputLock(Path(dest)).acquire()


def remove_leftovers(dest: str | os.PathLike) -> list[Path]:
    """Removes the staging and set-aside copies next to ``dest`` whose owner process died on this
    host (a kill -9, a power cut); returns what it removed."""
    dest = Path(dest)
    removed = []
    if not dest.parent.is_dir():
        return removed
    for p in dest.parent.glob(f"{glob_escape(dest.name)}.pact-*-*"):
        m = LEFTOVER.search(p.name)
        if not (m and p.name.startswith(dest.name + ".pact-") and _dead_here(int(m["pid"]), m["host"])):
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
