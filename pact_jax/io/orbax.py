"""orbax-checkpoint: the default format.

Reading accepts a PyTree checkpoint directory (the one holding ``_METADATA``,
as written by ``ocp.StandardCheckpointer().save(path, params)``) or a
directory with exactly one such item below it (``ocp.v1`` saves write
``<path>/pytree`` or ``<path>/state``; a ``CheckpointManager`` step directory
holds ``default/`` or ``params/``); :func:`pact_jax.io.open_reader` turns a
``CheckpointManager`` root into one of its steps first
(:mod:`pact_jax.io.orbax_manager`). Trees with tuples (an optax state) and
empty nodes (``EmptyState``) are read too (:func:`read_item_tree`). Every leaf's shape and dtype come from
orbax's own files without opening any array (:func:`read_array_metadata`: the
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
every process is done. The result has the :class:`Layout` of the writer's
``source`` (the pre-trained checkpoint): a StandardCheckpointer directory stays
one (``ocp.StandardCheckpointer().restore(path, target)``), a manager step's
named item keeps its name, with the source's key types and empty nodes, so
that a ``TrainState`` restores from it; without an orbax source it is an orbax
v1 save: load it with ``ocp.v1.load(path)`` or ``pact_jax.io.load(path)``
(``ocp.StandardCheckpointer().restore(path + "/state")`` also works).
``tests/io/test_orbax_io.py`` checks it against what orbax itself writes,
``tests/io/test_orbax_layouts.py`` the layouts (docs/orbax.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
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
from flax import traverse_util

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

_METADATA = "_METADATA"
_OCDBT_MANIFEST = "manifest.ocdbt"
# orbax type strings of leaves stored as one zarr array each (np.ndarray, jax.Array, Python scalars).
_ARRAY_TYPES = ("np.ndarray", "jax.Array", "scalar")
_DICT_KEY = 2  # orbax's KeyType.DICT (also namedtuple fields)
_SEQUENCE_KEY = 1  # orbax's KeyType.SEQUENCE (tuple and list indices)
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
            "sub-directory, and no CheckpointManager step directories below it)."
        )
    names = [d.name for d in items]
    raise CheckpointError(f"{path}: holds several orbax items {names}; pass the one to merge.")


def detect(path: Path) -> bool:
    try:
        item_directory(path)
    except CheckpointError:
        return False
    return True


# orbax's value types of nodes that hold no array (optax's EmptyState is an empty tuple: 'None' or 'Dict').
_EMPTY_TYPES = ("None", "Dict", "List", "Tuple")


@dataclasses.dataclass(frozen=True)
class ItemTree:
    """What an item's ``_METADATA`` and zarr metadata say about its tree.

    Attributes:
      meta: ``{key tuple: ShapeDtypeStruct}`` of every array leaf, in sorted key order.
      keys: ``{'a/0/b': [{'key': 'a', 'key_type': 2}, ...]}``: orbax's key entries of every node
        listed (leaves and empty nodes); ``key_type`` 1 is a sequence index (a tuple or list: an optax
        state), 2 a dict key or namedtuple field. A writer copies them, so that a restore into the
        original structure (a ``TrainState``) finds tuples where there were tuples.
      empty: ``{path: orbax value type}`` of nodes that hold no array (``None``, ``{}``, ``()``:
        optax's ``EmptyState``), which orbax lists with ``skip_deserialize``.
    """

    meta: dict[tuple[str, ...], jax.ShapeDtypeStruct]
    keys: dict[str, list[dict]]
    empty: dict[str, str]


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
      then asks orbax. :func:`read_item_tree` also covers sequence keys and
      empty nodes (train states).
    """
    tree = read_item_tree(item, sequences=False)
    return None if tree is None or tree.empty else tree.meta


def read_item_tree(item: Path, *, sequences: bool = True) -> ItemTree | None:
    """:func:`read_array_metadata` with the tree's key types and empty nodes (:class:`ItemTree`).

    ``sequences``: accept sequence keys (tuples and lists, keyed ``'0'``, ``'1'``, ...) and nodes
    that hold no array (``None``, empty containers), as an optax state has; without it such a tree
    is not covered (``None``).
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
    key_types = (_DICT_KEY, _SEQUENCE_KEY) if sequences else (_DICT_KEY,)
    names: dict[tuple[str, ...], str] = {}
    keys: dict[str, list[dict]] = {}
    empty: dict[str, str] = {}
    for entry in entries.values():
        try:
            key_md = entry["key_metadata"]
            value = entry["value_metadata"]
            if not key_md or any(k.get("key_type") not in key_types or not isinstance(k.get("key"), str) for k in key_md):
                return None
            path = tuple(k["key"] for k in key_md)
            if value.get("skip_deserialize"):
                if not sequences or value.get("value_type") not in _EMPTY_TYPES:
                    return None
                empty[SEP.join(path)] = value["value_type"]
            elif value.get("value_type") not in _ARRAY_TYPES:
                return None
            else:
                names[path] = ".".join(path)  # orbax's parameter name (ParamInfo.name)
        except (KeyError, TypeError, AttributeError):
            return None
        keys[SEP.join(path)] = [{"key": k["key"], "key_type": k["key_type"]} for k in key_md]
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
    return ItemTree({p: out[p] for p in sorted(out)}, keys, empty)


def _train_state_tree(item: Path) -> ItemTree | None:
    """:func:`read_item_tree` where the tree has what :func:`read_array_metadata` leaves to orbax's
    metadata path: tuple keys or empty nodes (an optax state); else ``None``."""
    tree = read_item_tree(item)
    if tree is None or not (tree.empty or any(k["key_type"] != _DICT_KEY for ks in tree.keys.values() for k in ks)):
        return None
    return tree


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


# --------------------------------------------------------------------------
# Leaves through orbax's type handlers (no PyTree handler, no partial saves)

# The PyTree item of an orbax v1 save, and its checkpoint-level files.
ITEM = "state"
_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
_INDICATOR = "orbax.checkpoint"
_COMMIT_MARKER = "commit_success.txt"
# What orbax v1 records as the handler of a PyTree item (checked against orbax's own save in the tests;
# an orbax that names it otherwise still loads the checkpoint, with a warning).
_PYTREE_HANDLER = "orbax.checkpoint.experimental.v1._src.handlers.pytree_handler.PyTreeHandler"
# Bytes of OCDBT B-tree nodes cached per checkpoint (orbax's default: 100 MB); see ts_context.
_OCDBT_CACHE_BYTES = 0
# What StandardCheckpointer and CheckpointManager(...).save(step, args=StandardSave(...)) record.
STANDARD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a checkpoint directory keeps its PyTree item, and what it records about it.

    Attributes:
      item: the item's directory name below the checkpoint (``'state'``: an orbax v1 save;
        ``'default'`` or a name such as ``'params'``: a ``CheckpointManager`` step), or ``None``:
        the item is the checkpoint directory itself (``StandardCheckpointer().save(path, tree)``).
      handler: the item handler ``_CHECKPOINT_METADATA`` names (orbax picks it on restore).
      indicator: whether the directory holds orbax v1's ``orbax.checkpoint`` file.

    The writer mirrors the pre-trained checkpoint's layout (its ``source``), so the merged model
    restores with the call that restored the input: ``StandardCheckpointer().restore(out, target)``
    for a StandardCheckpointer save, ``Composite(params=...)`` for a step's ``params`` item.
    """

    item: str | None = ITEM
    handler: str = _PYTREE_HANDLER
    indicator: bool = True

    def item_dir(self, checkpoint: Path) -> Path:
        return checkpoint if self.item is None else checkpoint / self.item

    def checkpoint_metadata(self, now_ns: int) -> dict:
        """``_CHECKPOINT_METADATA``: a lone item at the top records its handler as a string, named
        items as ``{name: handler}`` (as orbax writes them)."""
        handlers = self.handler if self.item is None else {self.item: self.handler}
        return {**checkpoint_metadata_json(now_ns), "item_handlers": handlers}


V1_LAYOUT = Layout()  # what pact_jax.io.save writes: an orbax v1 save of one PyTree


def read_layout(checkpoint: Path, item: Path) -> Layout:
    """The :class:`Layout` of the checkpoint directory ``checkpoint`` whose item is ``item``."""
    try:
        handlers = json.loads((checkpoint / _CHECKPOINT_METADATA).read_text()).get("item_handlers")
    except (OSError, ValueError, AttributeError):
        handlers = None
    name = None if item == checkpoint else item.name
    if name is None:
        handler = handlers if isinstance(handlers, str) else STANDARD_HANDLER
    elif isinstance(handlers, Mapping) and isinstance(handlers.get(name), str):
        handler = handlers[name]
    else:
        handler = _PYTREE_HANDLER if name == ITEM else STANDARD_HANDLER
    return Layout(item=name, handler=handler, indicator=(checkpoint / _INDICATOR).exists())


def param_name(keys: Sequence[str]) -> str:
    """orbax's name of the leaf at ``keys`` (``ParamInfo.name``: its zarr array in the item)."""
    return ".".join(keys)


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
            self._tree = ItemTree(fast, {}, {}) if fast is not None else _train_state_tree(self.item)
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


def tree_metadata_json(
    value_types: Mapping[tuple[str, ...], str],
    *,
    use_zarr3: bool = True,
    key_metadata: Mapping[str, list[dict]] | None = None,
    empty: Mapping[str, str] | None = None,
) -> dict:
    """The ``_METADATA`` orbax writes for a tree with these leaves.

    ``value_types``: ``{key tuple: orbax type string}`` (``"np.ndarray"``,
    ``"jax.Array"``); entries in the order orbax flattens the tree (sorted).
    ``key_metadata``: ``{'/'-joined path: orbax key entries}`` where a node's keys are not all
    dict keys (tuple indices of an optax state; :attr:`ItemTree.keys`), else dict keys.
    ``empty``: ``{path: orbax value type}`` of nodes holding no array (``None``, ``()``).
    """
    key_metadata = key_metadata or {}

    def keys_of(keys: tuple[str, ...]) -> list[dict]:
        given = key_metadata.get(SEP.join(keys))
        if given is not None and tuple(k["key"] for k in given) == tuple(keys):
            return [dict(k) for k in given]
        return [{"key": k, "key_type": _DICT_KEY} for k in keys]

    nodes = {tuple(k): {"value_type": t, "skip_deserialize": False} for k, t in value_types.items()}
    nodes.update({tuple(p.split(SEP)): {"value_type": t, "skip_deserialize": True} for p, t in (empty or {}).items()})
    entries = {}
    for keys in sorted(nodes):
        entries[str(tuple(keys))] = {"key_metadata": keys_of(keys), "value_metadata": nodes[keys]}
    return {
        "tree_metadata": entries,
        "use_ocdbt": True,
        "use_zarr3": use_zarr3,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


def checkpoint_metadata_json(now_ns: int) -> dict:
    """The checkpoint-level ``_CHECKPOINT_METADATA`` of an orbax v1 save of one PyTree."""
    return {
        "item_handlers": {ITEM: _PYTREE_HANDLER},
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": now_ns,
        "commit_timestamp_nsecs": now_ns,
        "custom_metadata": {},
    }


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
