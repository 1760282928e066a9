"""orbax's ``_METADATA`` file of a PyTree item: read without orbax's restore, and written.

:func:`read_array_metadata` (and :func:`read_item_tree`, which also covers the
key types and empty nodes of a train state) learn every leaf's shape and dtype
from the files orbax writes, opening no array: the leaf names and types from
``_METADATA``, then each array's zarr metadata (``zarr.json`` / ``.zarray``),
read from the item's OCDBT key-value store in one batch (or from plain files
without OCDBT). Where a layout is not covered they return ``None`` and the
reader (:mod:`pact_jax.io.orbax`) falls back to orbax's own metadata path.
:func:`tree_metadata_json` is the other direction: the ``_METADATA`` a writer
records for the leaves it streamed. :func:`param_name` is orbax's name of a
leaf's array in the item, used by both.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import tensorstore as ts
from flax import traverse_util

from pact_jax.io.base import SEP, check_key_names

_METADATA = "_METADATA"
_OCDBT_MANIFEST = "manifest.ocdbt"
# orbax type strings of leaves stored as one zarr array each (np.ndarray, jax.Array, Python scalars).
_ARRAY_TYPES = ("np.ndarray", "jax.Array", "scalar")
_DICT_KEY = 2  # orbax's KeyType.DICT (also namedtuple fields)
_SEQUENCE_KEY = 1  # orbax's KeyType.SEQUENCE (tuple and list indices)
# Bytes of OCDBT B-tree nodes cached while reading one checkpoint's array metadata (freed after).
_METADATA_CACHE_BYTES = 8 << 20

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
    checkpoint: 184 MiB for 9 checkpoints of 2048 leaves
    (benchmarks/RESULTS.md). This reads the same facts from the files orbax
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
                names[path] = param_name(path)
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


def train_state_tree(item: Path) -> ItemTree | None:
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


def param_name(keys: Sequence[str]) -> str:
    """orbax's name of the leaf at ``keys`` (``ParamInfo.name``: its zarr array in the item)."""
    return ".".join(keys)


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
