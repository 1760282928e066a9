"""What every checkpoint format provides: a lazy reader, an incremental writer.

A checkpoint is seen as a *flat* mapping ``path -> array`` where ``path`` is
the ``/``-joined key path of the parameter (``"params/dense_0/kernel"``, the
same string :func:`pact_jax.tree.path_str` gives), in the checkpoint's leaf
order. Readers load only the leaves asked for, so a merge can stream the
model bucket by bucket; writers take disjoint groups of leaves in any order
and publish the checkpoint atomically on :meth:`CheckpointWriter.commit`.

Formats register themselves in :data:`FORMATS` (see :mod:`pact_jax.io`).
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from pact_jax.tree import PactInputError, PyTree, leaves_with_paths

SEP = "/"


class CheckpointError(PactInputError):
    """A checkpoint cannot be read or written; the message names the file (and leaf)."""


# --------------------------------------------------------------------------
# Flat <-> nested


def flatten(tree: PyTree) -> dict[str, Any]:
    """Nested params -> ``{path: leaf}`` in the tree's leaf order."""
    return dict(leaves_with_paths(tree))


def unflatten(flat: Mapping[str, Any]) -> dict:
    """``{path: leaf}`` -> nested dicts (the layout Flax params use)."""
    return traverse_util.unflatten_dict({tuple(k.split(SEP)): v for k, v in flat.items()})


def check_key_names(tree: Mapping, where: str) -> None:
    """Keys must be strings without ``/`` (the path separator), else paths are ambiguous."""
    for key in traverse_util.flatten_dict(tree, keep_empty_nodes=False):
        for part in key:
            if not isinstance(part, str) or SEP in part:
                raise CheckpointError(
                    f"{where}: key {part!r} in path {key} is not a string free of '{SEP}'; "
                    "pact_jax names leaves by '/'-joined key paths."
                )


# --------------------------------------------------------------------------
# Reader / writer interface


class CheckpointReader(abc.ABC):
    """Lazy access to one checkpoint's parameters.

    Attributes:
      path: the checkpoint's file or directory.
      format: the registered format name.
    """

    format: str = ""
    #: ``read(paths, shardings=...)`` restores each leaf straight into its
    #: ``jax.sharding.Sharding`` (every process reading only its devices'
    #: shards). Readers without it load whole leaves to host memory; a merge
    #: over a device mesh then places them itself.
    reads_sharded: bool = False

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @abc.abstractmethod
    def metadata(self) -> dict[str, jax.ShapeDtypeStruct]:
        """``{path: ShapeDtypeStruct}`` for every parameter, in leaf order, reading no array."""

    @abc.abstractmethod
    def read(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        """Loads the named leaves (host NumPy arrays in their stored dtype)."""

    def check_paths(self, paths: Sequence[str]) -> None:
        """Raises :class:`CheckpointError` naming the first of ``paths`` not in :meth:`metadata`."""
        meta = self.metadata()
        for p in paths:
            if p not in meta:
                raise CheckpointError(f"{self.path}: no leaf '{p}' in this checkpoint.")

    def empty_nodes(self) -> dict[str, str]:
        """``{path: kind}`` of subtrees that hold no array (``None``, ``{}``, ``()``: optax's
        ``EmptyState``; kind as orbax names it: ``'None'``, ``'Dict'``, ...). Not leaves; a writer
        given this reader as ``source`` puts them back, so that the output restores into the
        original structure (a ``TrainState``)."""
        return {}

    def read_all(self) -> dict[str, np.ndarray]:
        return self.read(list(self.metadata()))

    def load(self) -> dict:
        """The whole checkpoint as nested dicts of NumPy arrays."""
        return unflatten(self.read_all())

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases open files; readers are also context managers."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class CheckpointWriter(abc.ABC):
    """Writes one checkpoint from groups of leaves, published atomically.

    ``write`` may be called any number of times with disjoint groups of
    leaves, in any order; every leaf of ``template`` must be written exactly
    once before ``commit``. Nothing appears at the destination before
    ``commit``; ``abort`` (or an exception inside a ``with`` block) removes
    everything written.
    """

    format: str = ""
    #: ``write`` takes global ``jax.Array`` leaves as they are: in a
    #: multi-process run every process creates the writer and calls ``write``
    #: and ``commit`` with the same leaves, each writing only its own devices'
    #: shards. Writers without it need host values: a sharded merge gathers
    #: each group to the host first, and in a multi-process run only process 0
    #: writes (see :mod:`pact_jax.io.streaming`).
    writes_global_arrays: bool = False
    #: Without ``writes_global_arrays``: whether process 0 alone may write it
    #: in a multi-process run (plain file I/O; no collectives inside).
    runs_on_one_process: bool = True

    #: Set by :func:`pact_jax.io.open_writer`: whether an output that appears at ``path`` while
    #: writing may be replaced at commit, and the lock of ``path`` (:mod:`pact_jax.io.owner`),
    #: released by ``commit`` and ``abort``.
    overwrite: bool = True
    _lock: Any = None

    def __init__(self, path: str | os.PathLike, template: Mapping[str, jax.ShapeDtypeStruct]):
        self.path = Path(path)
        self.template = dict(template)
        self._written: set[str] = set()

    def write(self, arrays: Mapping[str, Any]) -> None:
        for p, a in arrays.items():
            want = self.template.get(p)
            if want is None:
                raise CheckpointError(f"{self.path}: leaf '{p}' is not in the checkpoint's template.")
            if p in self._written:
                raise CheckpointError(f"{self.path}: leaf '{p}' written twice.")
            if tuple(np.shape(a)) != tuple(want.shape) or np.dtype(a.dtype) != np.dtype(want.dtype):
                raise CheckpointError(
                    f"{self.path}: leaf '{p}' is {np.shape(a)} {a.dtype}, the template says "
                    f"{want.shape} {want.dtype}."
                )
        with _named_disk_errors(self.path, f"writing {len(arrays)} leaves"):
            self._write(arrays)
        self._written.update(arrays)

    def commit(self) -> Path:
        missing = [p for p in self.template if p not in self._written]
        if missing:
            self.abort()
            raise CheckpointError(
                f"{self.path}: {len(missing)} leaves were never written (first: '{missing[0]}'); "
                "nothing was published."
            )
        try:
            with _named_disk_errors(self.path, "finishing the checkpoint"):
                self._commit()
        finally:
            self._release()
        return self.path

    def abort(self) -> None:
        """Removes everything written; nothing is published."""
        try:
            self._abort()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @abc.abstractmethod
    def _write(self, arrays: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def _commit(self) -> None: ...

    @abc.abstractmethod
    def _abort(self) -> None: ...

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            # The failure (or Ctrl-C) that stops the writer is what to report, not a cleanup that failed
            # after it (orbax's threads may still be writing into the staging copy: "Directory not
            # empty"); what is left carries this run's pid and the next run on the output removes it.
            with contextlib.suppress(Exception):
                self.abort()
        self._release()  # a writer left neither committed nor aborted frees its output path


def no_space(e: BaseException) -> bool:
    """Whether ``e`` (or what it was raised from) is a full disk: ``ENOSPC``, or its text in a message
    (safetensors and TensorStore wrap it in their own errors)."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def _named_disk_errors(path: Path, doing: str):
    """A full disk while writing ``path`` becomes one sentence naming it and the space left (also when
    a format's writer wrapped it: orbax's reads as its staging path and 3 KB of TensorStore text)."""
    try:
        yield
    except Exception as e:
        if not no_space(e) or (isinstance(e, CheckpointError) and "no space left on device while" in str(e)):
            raise
        try:
            free = human_bytes(shutil.disk_usage(path.parent).free)
        except OSError:
            free = "unknown"
        raise CheckpointError(f"{path}: no space left on device while {doing} ({free} free on its file system); "
                              "nothing was published.") from e


# --------------------------------------------------------------------------
# Atomic publication


def staging_path(dest: Path, *, shared: bool = False) -> Path:
    """A fresh sibling of ``dest`` (same file system, so the final rename is atomic).

    Not a dot-file: orbax finds its pending partial saves with ``glob``, which
    skips hidden names. With ``shared`` in a multi-process run, every process
    gets process 0's name (a collective: every process must call it, in the
    same order), so that they all write into one staging directory.
    """
    from pact_jax.io.owner import owner_tag

    token = f"{owner_tag()}-{uuid.uuid4().hex[:10]}".ljust(40)  # the owner's pid and host: see io.owner
    if shared and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        raw = np.frombuffer(token.encode("ascii"), np.uint8)
        token = bytes(np.asarray(multihost_utils.broadcast_one_to_all(raw))).decode("ascii")
    return dest.parent / f"{dest.name}.pact-tmp-{token.strip()}"


def is_primary_process() -> bool:
    """Whether this is process 0 (always, without ``jax.distributed``)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """A barrier across every process of a multi-process run; a no-op in a single process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"pact_jax: {name}")


def primary_failed(failed: bool) -> bool:
    """Process 0's ``failed`` on every process: a collective in a multi-process run, so that
    the others raise too instead of waiting at the next barrier; ``failed`` itself otherwise."""
    if jax.process_count() == 1:
        return failed
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(failed))))


def publish(staged: Path, dest: Path, *, overwrite: bool = True) -> None:
    """Moves ``staged`` to ``dest`` with one rename.

    If ``dest`` exists it is first renamed aside (``<dest>.pact-old-<owner>-<token>``) and deleted
    only after the new checkpoint is in place, so an interruption never leaves ``dest``
    half-written. ``overwrite=False``: ``dest`` appearing since the writer opened (another program
    wrote it) is an error, not replaced. If the second rename fails, the old output is moved back;
    if even that fails, the error says where it is.
    """
    from pact_jax.io.owner import owner_tag

    old = None
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            remove(staged)
            raise CheckpointError(f"{dest} appeared while this checkpoint was written; refusing to overwrite it "
                                  "(pass --overwrite, or overwrite=True in Python). Nothing was written.")
        old = dest.parent / f"{dest.name}.pact-old-{owner_tag()}-{uuid.uuid4().hex[:10]}"
        os.replace(dest, old)
    try:
        os.replace(staged, dest)
    except OSError as e:
        if old is None:
            raise
        try:
            os.replace(old, dest)
        except OSError:
            raise CheckpointError(f"{dest}: publishing the new checkpoint failed ({e}), and the previous one could not "
                                  f"be moved back: it is at {old}; the new one is at {staged}.") from e
        raise CheckpointError(f"{dest}: publishing the new checkpoint failed ({e}); the previous one is in place, "
                              f"the new one is at {staged}.") from e
    if old is not None:
        remove(old)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
