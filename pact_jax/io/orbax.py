"""orbax-checkpoint: the default format.

Reading accepts a PyTree checkpoint directory (the one holding ``_METADATA``,
as written by ``ocp.StandardCheckpointer().save(path, params)``) or a
directory with exactly one such item below it (``ocp.v1`` saves write
``<path>/pytree`` or ``<path>/state``; a ``CheckpointManager`` step directory
holds ``default/`` or ``params/``); :func:`pact_jax.io.open_reader` turns a
``CheckpointManager`` root into one of its steps first
(:mod:`pact_jax.io.orbax_manager`). Trees with tuples (an optax state) and
empty nodes (``EmptyState``) are read too
(:func:`~pact_jax.io.orbax_metadata.read_item_tree`). Every leaf's shape and
dtype come from orbax's own files without opening any array
(:func:`~pact_jax.io.orbax_metadata.read_array_metadata`: the
``_METADATA`` tree and each array's zarr ``zarr.json`` / ``.zarray``, read from
the OCDBT key-value store in one batch), falling back to orbax's metadata path
(which opens every leaf's TensorStore array, and keeps memory per leaf) for
layouts it does not cover. Leaves are read lazily, only those asked for, as
host NumPy arrays or as ``jax.Array`` placed with the ``shardings`` given
(restoring straight into the target sharding, without a host copy of the
whole leaf): through orbax's type handlers (:class:`ItemLeaves`) when the
metadata came from the files, else
with ``PyTreeRestore(partial_restore=True)``, which parses the whole
``_METADATA`` tree on every call (~10x slower per group, RESULTS.md).

Writing streams groups of leaves into one PyTree item: each :meth:`Writer.write`
serializes its leaves with orbax's type handlers (``NumpyHandler`` for host
arrays, ``ArrayHandler`` for ``jax.Array`` s, saved as they are, sharded)
into the item's per-process OCDBT database, and :meth:`Writer.commit` writes
``_METADATA`` once, merges the per-process databases
(``ocp.type_handlers.merge_ocdbt_per_process_files``, as orbax's own
``finalize`` does), adds the checkpoint-level files and renames the finished
directory into place. ``orbax.checkpoint.v1.partial`` would do the same job
with one sub-checkpoint per group, and its ``finalize`` costs memory and time
per group (+37 MiB kept at 344 groups, benchmarks/RESULTS.md). In a multi-process
run (``jax.distributed``) every process creates the writer and calls
``write``/``commit`` with the same global arrays and writes only its own
shards (NumPy leaves are written by process 0); all processes share one
staging directory, which process 0 completes and renames into place once
every process is done. The result has the
:class:`~pact_jax.io.orbax_layout.Layout` of the writer's ``source`` (the
pre-trained checkpoint): a StandardCheckpointer directory stays one
(``ocp.StandardCheckpointer().restore(path, target)``), a manager step's
named item keeps its name, with the source's key types and empty nodes, so
that a ``TrainState`` restores from it; without an orbax source it is an orbax
v1 save: load it with ``ocp.v1.load(path)`` or ``pact_jax.io.load(path)``
(``ocp.StandardCheckpointer().restore(path + "/state")`` also works).
``tests/io/test_orbax_io.py`` checks it against what orbax itself writes,
``tests/io/test_orbax_layouts.py`` the layouts (docs/orbax.md).

This module reads and writes one item's leaves; :mod:`pact_jax.io.orbax_metadata`
reads (and composes) the item's ``_METADATA``, :mod:`pact_jax.io.orbax_layout` says
where a checkpoint directory keeps its item, :mod:`pact_jax.io.orbax_manager`
handles ``CheckpointManager`` roots and steps. The names other code imports from
here (``Layout``, ``read_array_metadata``, ``item_directory``, ...) stay importable
from this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from pact_jax.io.base import (
    SEP,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    check_key_names,
    flatten,
    is_primary_process,
    primary_failed,
    publish,
    remove,
    staging_path,
    sync_processes,
    unflatten,
)
from pact_jax.io.orbax_layout import (
    _CHECKPOINT_METADATA,
    _INDICATOR,
    ITEM,
    STANDARD_HANDLER,
    V1_LAYOUT,
    Layout,
    checkpoint_metadata_json,
    item_directory,
    read_layout,
)

# read_array_metadata is looked up in this module's namespace when called (Reader.metadata; the T5X
# reader imports it from here at call time): patching pact_jax.io.orbax.read_array_metadata (the
# tests, benchmarks/streaming.py --orbax-metadata) sends both to orbax's metadata path.
from pact_jax.io.orbax_metadata import (
    _METADATA,
    ItemTree,
    joined_paths,
    param_name,
    read_array_metadata,
    read_item_tree,
    train_state_tree,
    tree_metadata_json,
)

# What other modules import from here (some re-exported from orbax_layout / orbax_metadata).
__all__ = [
    "ITEM",
    "STANDARD_HANDLER",
    "V1_LAYOUT",
    "ItemLeaves",
    "ItemTree",
    "Layout",
    "Reader",
    "Writer",
    "check_restored_shapes",
    "checkpoint_metadata_json",
    "detect",
    "item_directory",
    "joined_paths",
    "param_name",
    "read_array_metadata",
    "read_item_tree",
    "read_layout",
    "tree_metadata_json",
    "ts_context",
]

# The checkpoint-level file orbax writes last.
_COMMIT_MARKER = "commit_success.txt"
# Bytes of OCDBT B-tree nodes cached per checkpoint (orbax's default: 100 MB); see ts_context.
_OCDBT_CACHE_BYTES = 0


def detect(path: Path) -> bool:
    try:
        item_directory(path)
    except CheckpointError:
        return False
    return True


# --------------------------------------------------------------------------
# Leaves through orbax's type handlers (no PyTree handler, no partial saves)


@functools.cache
def _shared_pools() -> ts.Context:
    """orbax's TensorStore thread pools, one set for the process (see :func:`ts_context`)."""
    spec = ocp.type_handlers.get_ts_context(use_ocdbt=True).spec.to_json()
    return ts.Context({k: v for k, v in spec.items() if not k.startswith("cache_pool")})


def ts_context() -> ts.Context:
    """A TensorStore context for one checkpoint's reads or writes: orbax's, without its
    OCDBT B-tree cache, on the process's shared thread pools.

    Measured reading 9 checkpoints of 512 leaves group by group (80 groups):
    with a context per checkpoint and a 4 MiB B-tree cache (orbax's default
    is 100 MB) RSS grew by 177 MiB, 112 MiB on shared thread pools (the
    cache holds more than it counts); with no cache and one set of thread
    pools by 2 MiB, at the same speed (local disk; own pools: 8 MiB;
    benchmarks/RESULTS.md). A cache is not shared across checkpoints: it
    would serve a checkpoint's old B-tree after its path was overwritten.
    """
    return ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": _OCDBT_CACHE_BYTES}}, parent=_shared_pools())


def _run(coro):
    """Runs ``coro`` to completion, also where an event loop is already running (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _param_info(item: Path, name: str, use_ocdbt: bool, use_zarr3: bool, context: ts.Context):
    return ocp.type_handlers.ParamInfo(
        name=name,
        parent_dir=epath.Path(item),
        is_ocdbt_checkpoint=use_ocdbt,
        use_zarr3=use_zarr3,
        ts_context=context,
    )


class ItemLeaves:
    """Reads leaves of the orbax PyTree item ``item`` through orbax's type handlers.

    ``NumpyHandler`` / ``ArrayHandler``.deserialize, one batch each: no
    ``_METADATA`` parsing per call, unlike a partial ``PyTreeRestore``. Only
    for items whose metadata :func:`read_array_metadata` read (every leaf a
    zarr array named by :func:`param_name`). Holds the item's TensorStore
    context (:func:`ts_context`).
    """

    def __init__(self, item: Path):
        self.item = item
        try:
            md = json.loads((item / _METADATA).read_text())
            self.use_ocdbt, self.use_zarr3 = bool(md["use_ocdbt"]), bool(md.get("use_zarr3", False))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{item / _METADATA}: cannot read the storage format ({e}).") from e
        self._context = ts_context()

    def read(
        self,
        names: Mapping[str, str],
        meta: Mapping[str, jax.ShapeDtypeStruct],
        shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    ) -> dict[str, Any]:
        """The arrays ``{path: orbax name}``: host NumPy arrays, or ``jax.Array`` with
        ``shardings[path]`` (each process reading only its devices' shards); each
        array's shape checked against ``meta[path]``."""
        shardings = shardings or {}
        host = [p for p in names if p not in shardings]
        placed = [p for p in names if p in shardings]

        def infos(paths):
            return [_param_info(self.item, names[p], self.use_ocdbt, self.use_zarr3, self._context) for p in paths]

        async def read():
            jobs = []
            if host:
                args = [ocp.RestoreArgs(restore_type=np.ndarray)] * len(host)
                jobs.append(ocp.type_handlers.NumpyHandler().deserialize(infos(host), args))
            if placed:
                args = [ocp.ArrayRestoreArgs(sharding=shardings[p]) for p in placed]
                jobs.append(ocp.type_handlers.ArrayHandler().deserialize(infos(placed), args))
            return [a for batch in await asyncio.gather(*jobs) for a in batch]

        try:
            arrays = dict(zip(host + placed, _run(read())))
        except Exception as e:  # tensorstore and orbax raise many types for missing or broken data
            if len(names) > 1:  # name the broken leaf, not the group: read them one by one
                for p in names:
                    self.read({p: names[p]}, meta, {p: shardings[p]} if p in shardings else None)
            if len(names) == 1:
                raise CheckpointError(f"{self.item}: cannot read leaf '{next(iter(names))}' ({e}).") from e
            raise CheckpointError(f"{self.item}: cannot read leaves {list(names)[:3]}... ({e}).") from e
        check_restored_shapes(self.item, arrays, meta)
        return arrays


def check_restored_shapes(item: Path, arrays: Mapping[str, Any], meta: Mapping[str, jax.ShapeDtypeStruct]) -> None:
    for p, a in arrays.items():
        if tuple(a.shape) != tuple(meta[p].shape):
            raise CheckpointError(f"{item}: leaf '{p}' restored as {a.shape}, metadata says {meta[p].shape}.")


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
        #: Where the item lies in the directory; an orbax writer given this reader as its source mirrors it.
        self.orbax_layout = read_layout(self.path.absolute(), self.item)
        # The handler, not a Checkpointer: no step-level metadata is needed (nor warned about).
        self._handler = ocp.PyTreeCheckpointHandler()
        self._meta: dict[str, jax.ShapeDtypeStruct] | None = None
        self._tree: ItemTree | None = None
        self._leaves: ItemLeaves | None = None  # where the metadata came from the files

    def metadata(self) -> dict[str, jax.ShapeDtypeStruct]:
        if self._meta is None:
            fast = read_array_metadata(self.item)
            self._tree = ItemTree(fast, {}, {}) if fast is not None else train_state_tree(self.item)
            if self._tree is None:
                self._meta = self._orbax_metadata()
            else:
                self._meta = joined_paths(self._tree.meta, str(self.item))
                self._leaves = ItemLeaves(self.item)
        return self._meta

    def key_metadata(self) -> dict[str, list[dict]]:
        """orbax's key entries of each node (:attr:`ItemTree.keys`); ``{}`` where orbax's metadata path was taken."""
        self.metadata()
        return {} if self._tree is None else dict(self._tree.keys)

    def empty_nodes(self) -> dict[str, str]:
        self.metadata()
        return {} if self._tree is None else dict(self._tree.empty)

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
        """Reads ``paths`` only; NumPy arrays, or ``jax.Array`` with ``shardings[path]``."""
        self.check_paths(paths)
        meta = self.metadata()
        if not paths:
            return {}
        if self._leaves is not None:
            return self._leaves.read({p: param_name(p.split(SEP)) for p in paths}, meta, shardings)
        flat = self._restore(paths, meta, shardings or {})
        out = {p: flat[p] for p in paths}
        check_restored_shapes(self.item, out, meta)
        return out

    def _restore(self, paths, meta, shardings) -> dict[str, Any]:
        """orbax's partial restore (layouts :func:`read_array_metadata` does not cover)."""
        item = unflatten({p: meta[p] for p in paths})
        restore_args = unflatten({p: _restore_arg(shardings.get(p)) for p in paths})
        try:
            restored = self._handler.restore(
                self.item,
                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
            )
        except Exception as e:
            raise CheckpointError(f"{self.item}: cannot restore leaves {list(paths)[:3]}... ({e}).") from e
        return flatten(restored)

    def close(self) -> None:
        self._handler.close()
        self._leaves = None


class Writer(CheckpointWriter):
    format = "orbax"
    writes_global_arrays = True

    def __init__(
        self,
        path: str | os.PathLike,
        template: Mapping[str, jax.ShapeDtypeStruct],
        *,
        source: CheckpointReader | None = None,
        layout: Layout | None = None,
    ):
        """``source``: the pre-trained checkpoint's reader, whose :class:`Layout` (an orbax
        source's), key types (tuples of an optax state) and empty nodes (``EmptyState``) the output
        copies; ``layout`` overrides the layout (a ``CheckpointManager`` step: :mod:`orbax_manager`).
        Without either: an orbax v1 save (:data:`V1_LAYOUT`)."""
        super().__init__(path, template)
        check_key_names(unflatten(self.template), str(self.path))
        source_layout = getattr(source, "orbax_layout", None)
        self.layout = layout or (source_layout if isinstance(source_layout, Layout) else V1_LAYOUT)
        keys = getattr(source, "key_metadata", None)
        self._key_metadata = keys() if callable(keys) else {}
        self._empty = dict(source.empty_nodes()) if source is not None and hasattr(source, "empty_nodes") else {}
        # orbax wants absolute paths; every process writes into process 0's staging directory.
        self._staged = staging_path(self.path.absolute(), shared=True)
        self._item = self.layout.item_dir(self._staged)
        self._types: dict[tuple[str, ...], str] = {}
        self._context = ts_context()
        self._started = time.time_ns()
        if is_primary_process():
            self._item.mkdir(parents=True)
        sync_processes(f"created {self._staged}")

    def _write(self, arrays: Mapping[str, Any]) -> None:
        # jax.Arrays are saved as they are (sharded, each process its shards);
        # anything else as an ndarray (NumPy scalars included).
        placed = {p: a for p, a in arrays.items() if isinstance(a, jax.Array)}
        host = {p: np.asarray(a) for p, a in arrays.items() if p not in placed}

        def infos(paths):
            return [_param_info(self._item, param_name(p.split(SEP)), True, True, self._context) for p in paths]

        async def save():
            futures = []
            if host:
                # No defensive copy: the merge does not touch a group once it is handed over.
                handler = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
                futures += await handler.serialize(list(host.values()), infos(host))
            if placed:
                futures += await ocp.type_handlers.ArrayHandler().serialize(list(placed.values()), infos(placed))
            for f in futures:
                f.result()

        try:
            _run(save())
        except Exception as e:
            raise CheckpointError(f"{self._item}: orbax cannot save leaves {list(arrays)[:3]}... ({e}).") from e
        for p in host:
            self._types[tuple(p.split(SEP))] = "np.ndarray"
        for p in placed:
            self._types[tuple(p.split(SEP))] = "jax.Array"

    def _commit(self) -> None:
        if not self.template:
            raise CheckpointError(f"{self.path}: nothing to write (empty template).")
        sync_processes(f"wrote the leaves of {self._staged}")  # every process's shards are on disk
        error = None
        if is_primary_process():
            try:
                self._complete()
                publish(self._staged, self.path, overwrite=self.overwrite)
            except Exception as e:
                error = e
        if primary_failed(error is not None):
            self.abort()
            detail = error if error is not None else "it failed on process 0"
            raise CheckpointError(f"{self._staged}: cannot complete the orbax checkpoint ({detail}).") from error
        sync_processes(f"published {self.path}")

    def _complete(self) -> None:
        """Process 0: ``_METADATA``, one OCDBT database for the item, the checkpoint-level files."""
        tree = tree_metadata_json(self._types, key_metadata=self._key_metadata, empty=self._empty)
        (self._item / _METADATA).write_text(json.dumps(tree))
        # As orbax's finalize leaves it: one root manifest; the data stays in ocdbt.process_*/.
        _run(
            ocp.type_handlers.merge_ocdbt_per_process_files(
                epath.Path(self._item), ts_context=self._context, use_zarr3=True, enable_validation=False
            )
        )
        (self._staged / _CHECKPOINT_METADATA).write_text(json.dumps(self.layout.checkpoint_metadata(self._started)))
        if self.layout.indicator:
            (self._staged / _INDICATOR).touch()
        (self._staged / _COMMIT_MARKER).write_text(f"Checkpoint commit was successful to {self.path}")

    def _abort(self) -> None:
        if is_primary_process():  # the staging directory is process 0's to remove
            remove(self._staged)
