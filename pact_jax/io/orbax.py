"""orbax-checkpoint: the default format.

Reading accepts a PyTree checkpoint directory (the one holding ``_METADATA``,
as written by ``ocp.StandardCheckpointer().save(path, params)``) or a
directory with exactly one such item below it (``ocp.v1`` saves write
``<path>/pytree`` or ``<path>/state``; a ``CheckpointManager`` step directory
holds ``default/`` or ``params/``). Every leaf's shape and dtype come from
orbax's own files without opening any array (:func:`read_array_metadata`: the
``_METADATA`` tree and each array's zarr ``zarr.json`` / ``.zarray``, read from
the OCDBT key-value store in one batch), falling back to orbax's metadata path
(which opens every leaf's TensorStore array, and keeps memory per leaf) for
layouts it does not cover. Leaves are restored lazily with
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

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import traverse_util
from orbax.checkpoint import v1 as ocp_v1

from pact_jax.io.base import (
    SEP,
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
_OCDBT_MANIFEST = "manifest.ocdbt"
# orbax type strings of leaves stored as one zarr array each (np.ndarray, jax.Array, Python scalars).
_ARRAY_TYPES = ("np.ndarray", "jax.Array", "scalar")
_DICT_KEY = 2  # orbax's KeyType.DICT; sequences (1) are left to orbax
# Bytes of OCDBT B-tree nodes cached while reading one checkpoint's array metadata (freed after).
_METADATA_CACHE_BYTES = 8 << 20


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


def read_array_metadata(item: Path) -> dict[tuple[str, ...], jax.ShapeDtypeStruct] | None:
    """Shape and dtype of every leaf of the orbax PyTree item ``item``, opening no array.

    orbax's own metadata path (``PyTreeCheckpointHandler.metadata``) opens each
    leaf's TensorStore array to learn its shape, and with tensorstore 0.1.86
    every leaf leaves ~9 KiB of Python objects behind for good: the dicts
    ``TensorStore.spec().to_json()`` returns (orbax calls it per leaf) are
    never freed though nothing refers to them (a loop of ``Spec.to_json()``
    alone grows the same way). That was ~27 KiB of RSS per leaf and
    checkpoint: 184 MiB for 9 checkpoints of 2048 leaves (benchmarks/RESULTS.md). This reads the same facts from the files orbax
    writes: the leaf names and types from ``_METADATA``, then each array's zarr
    metadata (``<name>/zarr.json``, or ``<name>/.zarray`` for zarr v2) — from
    the item's OCDBT key-value store, all leaves in one batch of reads, or
    from plain files without OCDBT. Memory is freed with the store.

    Returns:
      ``{key tuple: ShapeDtypeStruct}`` in sorted key order (the order of the
      nested dicts' leaves), or ``None`` where this layout is not covered (no
      ``tree_metadata``, sequence keys, non-array leaves such as strings or
      ``None``, a missing zarr metadata entry, an unknown dtype): the caller
      then asks orbax.
    """
    try:
        md = json.loads((item / _METADATA).read_text())
        entries = md["tree_metadata"]
        use_ocdbt = md["use_ocdbt"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(entries, Mapping) or not entries or use_ocdbt not in (True, False):
        return None
    suffix = "zarr.json" if md.get("use_zarr3") else ".zarray"
    names: dict[tuple[str, ...], str] = {}
    for entry in entries.values():
        try:
            keys = entry["key_metadata"]
            value = entry["value_metadata"]
            if value.get("skip_deserialize") or value.get("value_type") not in _ARRAY_TYPES:
                return None
            if not keys or any(k.get("key_type") != _DICT_KEY or not isinstance(k.get("key"), str) for k in keys):
                return None
            path = tuple(k["key"] for k in keys)
        except (KeyError, TypeError, AttributeError):
            return None
        names[path] = ".".join(path)  # orbax's parameter name (ParamInfo.name)
    if use_ocdbt:
        raw = _read_ocdbt_keys(item, [f"{n}/{suffix}" for n in names.values()])
    else:
        raw = _read_files(item, [f"{n}/{suffix}" for n in names.values()])
    if raw is None:
        return None
    out = {}
    for path, blob in zip(names, raw):
        try:
            z = json.loads(blob)
            shape = tuple(int(d) for d in z["shape"])
            dtype = jax.numpy.dtype(z["data_type"] if "data_type" in z else z["dtype"])
        except (ValueError, KeyError, TypeError):
            return None
        out[path] = jax.ShapeDtypeStruct(shape, dtype)
    return {p: out[p] for p in sorted(out)}


def joined_paths(
    meta: Mapping[tuple[str, ...], jax.ShapeDtypeStruct], where: str
) -> dict[str, jax.ShapeDtypeStruct]:
    """``{key tuple: m}`` (from :func:`read_array_metadata`) as ``{'a/b/c': m}``,
    after checking that no key holds the separator (else paths are ambiguous)."""
    check_key_names(traverse_util.unflatten_dict(dict(meta)), where)
    return {SEP.join(k): m for k, m in meta.items()}


def _read_ocdbt_keys(item: Path, keys: Sequence[str]) -> list[bytes] | None:
    """Values of ``keys`` in the OCDBT database at ``item`` (``None`` if one is missing)."""
    if not (item / _OCDBT_MANIFEST).is_file():
        return None
    # A context of its own: its caches (B-tree nodes) go with it.
    context = ts.Context({"cache_pool": {"total_bytes_limit": _METADATA_CACHE_BYTES}})
    try:
        spec = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{item}/"}}
        store = ts.KvStore.open(spec, context=context).result()
        results = [f.result() for f in [store.read(k) for k in keys]]
    except Exception:  # noqa: BLE001 - tensorstore raises ValueError and others for a broken store
        return None
    if any(r.state != "value" for r in results):
        return None
    return [bytes(r.value) for r in results]


def _read_files(item: Path, keys: Sequence[str]) -> list[bytes] | None:
    try:
        return [(item / k).read_bytes() for k in keys]
    except OSError:
        return None


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
            fast = read_array_metadata(self.item)
            self._meta = self._orbax_metadata() if fast is None else joined_paths(fast, str(self.item))
        return self._meta

    def _orbax_metadata(self) -> dict[str, jax.ShapeDtypeStruct]:
        """orbax's own metadata path (opens every leaf's TensorStore array)."""
        try:
            tree = self._handler.metadata(self.item).tree
        except Exception as e:  # orbax raises many types for a broken directory
            raise CheckpointError(f"{self.item}: cannot read orbax metadata ({e}).") from e
        check_key_names(tree, str(self.item))
        return {p: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for p, m in flatten(tree).items()}

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

    def close(self) -> None:
        self._handler.close()


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
