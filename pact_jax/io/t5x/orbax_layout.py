"""T5X orbax step directories (``t5x.checkpoints.OrbaxCheckpointManagerInterface``).

::

    checkpoint_<step>/
      _CHECKPOINT_METADATA  commit_success.txt
      state/                        # ocp.PyTreeCheckpointHandler item "state"
        _METADATA  [_sharding]  [array_metadatas/]  commit_success.txt
        manifest.ocdbt  ocdbt.process_0/  d/       (OCDBT, t5x's setting) or
        target.encoder.layers_0.attention.query.kernel/ ...  (use_ocdbt=False)
      [dataset/]                    # t5x's DatasetCheckpointHandler item

t5x's ``CheckpointManager`` (``step_prefix='checkpoint'``) saves the train
state dict (``{"target", "state"}``, without the legacy ``version`` /
``optimizer`` wrapper) as the item ``state``; the ``state`` item directory
itself is accepted too. Reading is lazy (``_METADATA`` for the metadata, orbax's
type handlers for the leaves asked for).

Writing (``source=`` an orbax T5X step): each group is added with
``orbax.checkpoint.v1.partial.save`` (with the source's ``use_ocdbt`` /
``use_zarr3``) under ``target``; at commit the non-target state is restored
from the source and added in groups of at most ``_COPY_GROUP_BYTES``, then
``partial.finalize``. The step directory gets the source's
``_CHECKPOINT_METADATA`` (fresh timestamps) and marker files, and the source's
other items (``dataset/``) are copied byte for byte.

What is not byte-exact (verified against orbax 0.12.8 and a checkpoint written
by ``ocp.CheckpointManager`` the way t5x configures it):

* OCDBT: every partial save is its own OCDBT sub-database, so the ``state/``
  item holds several ``ocdbt.process_0<id>/`` directories (all referenced by
  the root ``manifest.ocdbt``) where a single save writes one
  ``ocdbt.process_0/``. orbax and t5x read it the same way. Writing one save
  would need the whole tree in memory, which a streaming merge avoids. With
  ``use_ocdbt=False`` the per-leaf array directories are named exactly as in
  the source.
* ``_sharding`` and ``array_metadatas/`` are written by orbax only for
  ``jax.Array`` leaves; merged leaves arrive as host NumPy arrays, so these
  files are absent unless ``jax.Array`` leaves are written. t5x restores with
  explicit mesh axes and does not need them.
* Leaves the source stored in an orbax *aggregate* ``checkpoint`` file beside
  ``_METADATA`` (``SaveArgs(aggregate=True)``) are rewritten as arrays;
  current orbax no longer writes aggregate values. (A step with an aggregate
  file and no ``_METADATA`` is the older layout of
  :mod:`pact_jax.io.t5x.legacy`.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pact_jax.io.base import SEP, CheckpointError, check_key_names, flatten, publish, remove, unflatten
from pact_jax.io.t5x.common import Reader, Writer, copy_except, marker
from pact_jax.io.t5x.detect import (
    COMMIT_MARKER,
    ORBAX,
    ORBAX_INDICATOR,
    ORBAX_METADATA,
    STATE_ITEM,
    STEP_METADATA,
    TARGET,
    orbax_item,
    resolve_or_raise,
)

# Non-target state is copied in groups of at most this many bytes.
_COPY_GROUP_BYTES = 256 * 1024 * 1024


def _restore_arg(meta: Any, sharding: jax.sharding.Sharding | None = None, *, array: bool = False):
    """Restore as a host NumPy array (or a ``jax.Array`` with ``sharding``); scalars as saved."""
    import orbax.checkpoint as ocp

    if sharding is not None:
        return ocp.ArrayRestoreArgs(sharding=sharding)
    if array or (
        isinstance(meta, ocp.metadata.ArrayMetadata) and not isinstance(meta, ocp.metadata.ScalarMetadata)
    ):
        return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.RestoreArgs()


class OrbaxReader(Reader):
    """Reader of a current orbax T5X step (or its ``state`` item): the ``target`` sub-tree."""

    layout = ORBAX
    reads_sharded = True  # ArrayRestoreArgs: each process restores its devices' shards

    def __init__(self, path: str | os.PathLike):
        import orbax.checkpoint as ocp

        step, _ = resolve_or_raise(Path(path))
        super().__init__(step)
        item = orbax_item(self.path)
        if item is None:
            raise CheckpointError(f"{self.path}: no orbax '{STATE_ITEM}' item with a '{TARGET}' tree.")
        self.item = item.absolute()  # orbax wants absolute paths
        self.step_dir = self.item.parent if self.item.name == STATE_ITEM and item != self.path else None
        self._handler = ocp.PyTreeCheckpointHandler()
        self._tree: dict | None = None
        self._meta: dict[str, jax.ShapeDtypeStruct] | None = None
        self._leaves = None  # pact_jax.io.orbax.ItemLeaves, where the metadata came from the files

    def tree_metadata(self) -> dict:
        """orbax's metadata tree of the whole train state (``target`` and ``state``)."""
        if self._tree is None:
            try:
                tree = self._handler.metadata(self.item).tree
            except Exception as e:  # orbax raises many types for a broken directory
                raise CheckpointError(f"{self.item}: cannot read orbax metadata ({e}).") from e
            if not isinstance(tree, Mapping) or not isinstance(tree.get(TARGET), Mapping):
                raise CheckpointError(f"{self.item}: the orbax tree has no '{TARGET}' parameters.")
            self._tree = dict(tree)
        return self._tree

    def metadata(self) -> dict[str, jax.ShapeDtypeStruct]:
        if self._meta is None:
            self._meta = self._target_metadata_from_files()
            if self._meta is not None:
                from pact_jax.io.orbax import ItemLeaves

                self._leaves = ItemLeaves(self.item)
        if self._meta is None:  # a layout the file reader does not cover: ask orbax
            target = self.tree_metadata()[TARGET]
            check_key_names(target, f"{self.item}/{TARGET}")
            flat, _ = jax.tree_util.tree_flatten_with_path(target)
            meta = {}
            for keypath, m in flat:
                p = jax.tree_util.keystr(keypath, simple=True, separator=SEP)
                dtype = getattr(m, "dtype", None)
                if dtype is None:
                    raise CheckpointError(f"{self.item}: leaf '{p}' of '{TARGET}' is not an array ({m}).")
                meta[p] = jax.ShapeDtypeStruct(tuple(getattr(m, "shape", ())), np.dtype(dtype))
            self._meta = meta
        return self._meta

    def _target_metadata_from_files(self) -> dict[str, jax.ShapeDtypeStruct] | None:
        """``target``'s leaves from orbax's metadata files, opening no array
        (:func:`pact_jax.io.orbax.read_array_metadata`: orbax's own metadata
        path keeps ~27 KiB per leaf); ``None`` if that layout is not covered."""
        from pact_jax.io.orbax import joined_paths, read_array_metadata

        fast = read_array_metadata(self.item)
        target = {k[1:]: v for k, v in (fast or {}).items() if k[0] == TARGET and len(k) > 1}
        return joined_paths(target, f"{self.item}/{TARGET}") if target else None

    def restore(self, item: Any, restore_args: Any) -> Any:
        """Partial restore of ``item`` (a sub-tree of :meth:`tree_metadata`)."""
        import orbax.checkpoint as ocp

        try:
            return self._handler.restore(
                self.item,
                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
            )
        except Exception as e:
            raise CheckpointError(f"{self.item}: cannot restore from the orbax checkpoint ({e}).") from e

    def read(
        self,
        paths: Sequence[str],
        shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    ) -> dict[str, Any]:
        from pact_jax.io.orbax import check_restored_shapes, param_name

        self.check_paths(paths)
        if not paths:
            return {}
        meta = self.metadata()
        shardings = shardings or {}
        if self._leaves is not None:  # through orbax's type handlers, as pact_jax.io.orbax.Reader
            return self._leaves.read({p: param_name((TARGET, *p.split(SEP))) for p in paths}, meta, shardings)
        item = {TARGET: unflatten({p: meta[p] for p in paths})}
        args = {TARGET: unflatten({p: _restore_arg(None, shardings.get(p), array=True) for p in paths})}
        try:
            restored = self.restore(item, args)[TARGET]
        except CheckpointError as e:
            raise CheckpointError(f"{e} (leaves {list(paths)[:3]}...)") from e
        flat = flatten(restored)
        out = {p: flat[p] for p in paths}
        check_restored_shapes(self.item, out, meta)
        return out



class OrbaxWriter(Writer):
    """Writer of a current orbax T5X step in ``source``'s layout (see the module docstring)."""

    layout = ORBAX

    def __init__(self, path, template, *, source=None):
        from orbax.checkpoint import v1 as ocp_v1

        super().__init__(path, template, source=source)
        src: OrbaxReader = self.source  # type: ignore[assignment]
        try:
            info = json.loads((src.item / ORBAX_METADATA).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{src.item / ORBAX_METADATA}: cannot read ({e}).") from e
        use_ocdbt = info.get("use_ocdbt", (src.item / "manifest.ocdbt").exists())
        self._ctx = ocp_v1.Context()
        self._ctx.array.saving.use_ocdbt = bool(use_ocdbt)
        self._ctx.array.saving.use_zarr3 = bool(info.get("use_zarr3", False))

    def _save(self, tree: dict) -> None:
        from orbax.checkpoint import v1 as ocp_v1

        try:
            with self._ctx:
                ocp_v1.partial.save(self._staged, tree)
        except Exception as e:
            raise CheckpointError(f"{self._staged}: orbax partial save failed ({e}).") from e

    def _write(self, arrays: Mapping[str, Any]) -> None:
        tree = {p: a if isinstance(a, jax.Array) else np.asarray(a) for p, a in arrays.items()}
        self._save({TARGET: unflatten(tree)})

    def _copy_state(self) -> None:
        """Restores the source's non-target state in bounded groups and adds it."""
        src: OrbaxReader = self.source  # type: ignore[assignment]
        tree = src.tree_metadata()
        units: list[tuple[tuple, Any]] = []  # (key path, metadata sub-tree)
        empties: list[tuple[tuple, Any]] = []

        def walk(node, keys):
            if isinstance(node, Mapping) and node:
                for k, v in node.items():
                    walk(v, (*keys, k))
            elif not jax.tree_util.tree_leaves(node):  # {} / None / [] : empty nodes
                empties.append((keys, node))
            else:
                units.append((keys, node))

        for k, v in tree.items():
            if k != TARGET:
                walk(v, (k,))

        def nbytes(m) -> int:
            total = 0
            for x in jax.tree_util.tree_leaves(m):
                itemsize = np.dtype(getattr(x, "dtype", None) or np.uint8).itemsize
                total += int(math.prod(getattr(x, "shape", ()) or ())) * itemsize
            return total

        def nest(pairs):
            out: dict = {}
            for keys, v in pairs:
                node = out
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = v
            return out

        group, size = [], 0
        groups = []
        for keys, m in units:
            b = nbytes(m)
            if group and size + b > _COPY_GROUP_BYTES:
                groups.append(group)
                group, size = [], 0
            group.append((keys, m))
            size += b
        if group:
            groups.append(group)
        for g in groups:
            item = nest(g)
            args = nest([(k, jax.tree_util.tree_map(_restore_arg, m)) for k, m in g])
            restored = src.restore(item, args)
            self._save(restored)
            del restored
        if empties:
            self._save(nest(empties))

    def _finish(self) -> None:
        from orbax.checkpoint import v1 as ocp_v1

        src: OrbaxReader = self.source  # type: ignore[assignment]
        if not self.template:
            raise CheckpointError(f"{self.path}: nothing to write (empty template).")
        self._copy_state()
        try:
            with self._ctx:
                ocp_v1.partial.finalize(self._staged)
        except Exception as e:
            raise CheckpointError(f"{self._staged}: orbax finalize failed ({e}).") from e
        staged_item = self._staged / STATE_ITEM
        if src.step_dir is None:  # the source is a bare item directory: so is the output
            if (src.item / COMMIT_MARKER).exists():
                marker(staged_item / COMMIT_MARKER, self.path)
            publish(staged_item, self.path, overwrite=self.overwrite)
            remove(self._staged)
            return
        step = src.step_dir
        if (src.item / COMMIT_MARKER).exists():
            marker(staged_item / COMMIT_MARKER, self.path / STATE_ITEM)
        # Step-level files as in the source.
        for name in (ORBAX_INDICATOR, COMMIT_MARKER, STEP_METADATA):
            if not (step / name).exists():
                remove(self._staged / name)
        if (step / COMMIT_MARKER).exists():
            marker(self._staged / COMMIT_MARKER, self.path)
        if (step / STEP_METADATA).is_file():
            try:
                meta = json.loads((step / STEP_METADATA).read_text())
                now = time.time_ns()
                for k in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
                    if k in meta:
                        meta[k] = now
                (self._staged / STEP_METADATA).write_text(json.dumps(meta))
            except (OSError, ValueError):
                shutil.copy2(step / STEP_METADATA, self._staged / STEP_METADATA)
        # Other items (dataset/ ...) and files: copied.
        markers = (ORBAX_INDICATOR, COMMIT_MARKER, STEP_METADATA)
        skip = {src.item.absolute(), *(step.absolute() / n for n in markers)}
        copy_except(step, self._staged, skip)
        publish(self._staged, self.path, overwrite=self.overwrite)

    def _abort(self) -> None:
        # orbax keeps pending partial saves in siblings named after the staging path.
        for p in self._staged.parent.glob(self._staged.name + "*"):
            remove(p)
