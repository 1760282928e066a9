"""orbax-checkpoint: the default format.

Reading accepts a PyTree checkpoint directory (the one holding ``_METADATA``,
as written by ``ocp.StandardCheckpointer().save(path, params)``) or a
directory with exactly one such item below it (``ocp.v1`` saves write
``<path>/pytree`` or ``<path>/state``; a ``CheckpointManager`` step directory
holds ``default/`` or ``params/``). Leaves are restored lazily with
``PyTreeRestore(partial_restore=True)``: only the leaves asked for are read,
as host NumPy arrays, or as ``jax.Array`` placed with the ``shardings`` given
(restoring straight into the target sharding, without a host copy of the whole
leaf).

Writing uses ``orbax.checkpoint.v1.partial``: each :meth:`Writer.write` call
adds a disjoint group of leaves to a pending checkpoint, ``finalize`` commits
it, and the finished directory is renamed into place. ``jax.Array`` leaves are
saved as they are, sharded: in a multi-process run (``jax.distributed``) every
process creates the writer and calls ``write``/``commit`` with the same global
arrays and writes only its own shards (orbax's own barriers; NumPy leaves are
written by process 0); all processes share one staging directory, which
process 0 renames into place after ``finalize``, when every process is done. The result is an orbax
v1 checkpoint: load it with ``ocp.v1.load(path)`` or
``pact_jax.io.load(path)`` (``ocp.StandardCheckpointer().restore(path + "/state")``
also works).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import v1 as ocp_v1

from pact_jax.io.base import (
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    check_key_names,
    flatten,
    is_primary_process,
    publish,
    remove,
    staging_path,
    sync_processes,
    unflatten,
)

_METADATA = "_METADATA"


def item_directory(path: Path) -> Path:
    """The directory holding the PyTree item (``_METADATA``) at or just below ``path``."""
    if (path / _METADATA).is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: not an orbax checkpoint directory.")
    items = sorted(d for d in path.iterdir() if d.is_dir() and (d / _METADATA).is_file())
    if len(items) == 1:
        return items[0]
    if not items:
        raise CheckpointError(
            f"{path}: not an orbax checkpoint (no '{_METADATA}' file here or in a "
            "sub-directory). If it is a CheckpointManager root, pass a step directory."
        )
    names = [d.name for d in items]
    raise CheckpointError(f"{path}: holds several orbax items {names}; pass the one to merge.")


def detect(path: Path) -> bool:
    try:
        item_directory(path)
    except CheckpointError:
        return False
    return True


def _restore_arg(sharding: jax.sharding.Sharding | None) -> ocp.RestoreArgs:
    if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(sharding=sharding)


class Reader(CheckpointReader):
    format = "orbax"
    reads_sharded = True

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.item = item_directory(self.path.absolute())  # orbax wants absolute paths
        # The handler, not a Checkpointer: no step-level metadata is needed (nor warned about).
        self._handler = ocp.PyTreeCheckpointHandler()
        self._meta: dict[str, jax.ShapeDtypeStruct] | None = None

    def metadata(self) -> dict[str, jax.ShapeDtypeStruct]:
        if self._meta is None:
            try:
                tree = self._handler.metadata(self.item).tree
            except Exception as e:  # orbax raises many types for a broken directory
                raise CheckpointError(f"{self.item}: cannot read orbax metadata ({e}).") from e
            check_key_names(tree, str(self.item))
            self._meta = {
                p: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for p, m in flatten(tree).items()
            }
        return self._meta

    def read(
        self,
        paths: Sequence[str],
        shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    ) -> dict[str, Any]:
        """Restores ``paths`` only; NumPy arrays, or ``jax.Array`` with ``shardings[path]``."""
        self.check_paths(paths)
        meta = self.metadata()
        if not paths:
            return {}
        shardings = shardings or {}
        item = unflatten({p: meta[p] for p in paths})
        restore_args = unflatten({p: _restore_arg(shardings.get(p)) for p in paths})
        try:
            restored = self._handler.restore(
                self.item,
                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
            )
        except Exception as e:
            raise CheckpointError(f"{self.item}: cannot restore leaves {list(paths)[:3]}... ({e}).") from e
        flat = flatten(restored)
        for p in paths:
            got, want = flat[p], meta[p]
            if tuple(got.shape) != tuple(want.shape):
                raise CheckpointError(f"{self.item}: leaf '{p}' restored as {got.shape}, metadata says {want.shape}.")
        return {p: flat[p] for p in paths}


class Writer(CheckpointWriter):
    format = "orbax"
    writes_global_arrays = True

    def __init__(self, path: str | os.PathLike, template: Mapping[str, jax.ShapeDtypeStruct], *, source=None):
        super().__init__(path, template)
        check_key_names(unflatten(self.template), str(self.path))
        # orbax wants absolute paths; every process writes into process 0's staging directory.
        self._staged = staging_path(self.path.absolute(), shared=True)

    def _write(self, arrays: Mapping[str, Any]) -> None:
        # jax.Arrays are saved as they are (sharded, each process its shards);
        # anything else as an ndarray (orbax has no handler for NumPy scalars).
        tree = {p: a if isinstance(a, jax.Array) else np.asarray(a) for p, a in arrays.items()}
        try:
            ocp_v1.partial.save(self._staged, unflatten(tree))
        except Exception as e:
            raise CheckpointError(f"{self._staged}: orbax partial save of leaves {list(arrays)[:3]} failed ({e}).") from e

    def _commit(self) -> None:
        if not self.template:
            raise CheckpointError(f"{self.path}: nothing to write (empty template).")
        try:
            ocp_v1.partial.finalize(self._staged)  # collective: process 0 merges and renames
        except Exception as e:
            raise CheckpointError(f"{self._staged}: orbax finalize failed ({e}).") from e
        if is_primary_process():
            publish(self._staged, self.path)
        sync_processes(f"published {self.path}")

    def abort(self) -> None:
        if not is_primary_process():  # the staging directory is process 0's to remove
            return
        # orbax keeps pending partial saves in siblings named after the staging path.
        for p in self._staged.parent.glob(self._staged.name + "*"):
            remove(p)
