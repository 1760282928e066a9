"""T5X checkpoints held in a ``checkpoint`` msgpack: legacy T5X and old orbax-based T5X.

Both layouts are one msgpack tree of the whole train state in which each leaf
is either inline (a flax msgpack ndarray extension, a scalar) or a reference
to an array directory beside the msgpack:

* **legacy** (``t5x.checkpoints.Checkpointer``): ``flax.serialization.to_bytes``
  of ``{"version": 3, "optimizer": {"target": ..., "state": {"step": ...,
  "param_states": ...}}}``; a reference is a TensorStore spec
  (:mod:`pact_jax.io.t5x.spec`), its zarr array named by the state-dict path
  with ``/`` -> ``.`` (``target.encoder.layers_0.attention.query.kernel``).
  Version 0 is the bare optimizer state dict; version 2 stored bfloat16 as
  ``uint16`` and, like t5x, is refused.
* **orbax-aggregate** (old orbax-based T5X, before orbax wrote ``_METADATA``):
  orbax's aggregate ``checkpoint`` file holding the train state's fields
  ``{"_optimizer": {"target": ..., "state": ...}, "flax_mutables": ...,
  "params_axes": ...}``; a reference is the string
  ``PLACEHOLDER://<name>``, a zarr array directory ``<name>`` (orbax's
  ``.``-joined key path, e.g. ``_optimizer.target.encoder.kernel``) with its own
  ``.zarray``.

The merged leaves are the ``target`` sub-tree. Reading parses the msgpack
once (it holds only the small inline leaves) and opens only the arrays asked
for. Writing (``source=`` this layout) copies the step directory, rewrites
each referenced ``target`` array with the source's chunking and compressor
(only the dtype may change; the reference is kept: same spec / placeholder
and directory name), streams the msgpack with the new inline ``target`` leaves
(byte-identical when nothing changed), and publishes with one rename. A bare
msgpack file (t5x's ``test_t5_tiny.checkpoint_0``) is written as a file; one
that references arrays cannot be (its arrays do not travel with it).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
from flax import serialization

from pact_jax.io.base import SEP, CheckpointError, publish, remove
from pact_jax.io.t5x.common import Reader, Writer, copy_except, to_host
from pact_jax.io.t5x.detect import LEGACY, MSGPACK_FILE, OLD_ORBAX_OPTIMIZER, TARGET, resolve_or_raise
from pact_jax.io.t5x.spec import dtype_of, is_ts_spec, local_spec, relative_ts_path, spec_shape_dtype, ts_context

PLACEHOLDER = "PLACEHOLDER://"  # orbax's aggregate-file reference to an array directory
ZARRAY = ".zarray"
_SPILL_DIR = ".pact-inline"


class _TsLeaf:
    """A target leaf stored as an array directory: its spec, or its orbax placeholder."""

    __slots__ = ("spec", "rel", "placeholder")

    def __init__(self, spec: dict | None, rel: str | None, placeholder: str | None = None):
        self.spec, self.rel, self.placeholder = spec, rel, placeholder


def _is_reference(x: Any) -> bool:
    return is_ts_spec(x) or (isinstance(x, str) and x.startswith(PLACEHOLDER))


def _has_reference(node: Any) -> bool:
    if _is_reference(node):
        return True
    return isinstance(node, dict) and any(_has_reference(v) for v in node.values())


class MsgpackReader(Reader):
    """Reader of the legacy and orbax-aggregate layouts (``layout`` says which)."""

    layout = LEGACY

    def __init__(self, path: str | os.PathLike):
        step, self.layout = resolve_or_raise(Path(path))
        super().__init__(step)
        self.bare_file = step.is_file()  # a msgpack file not inside a step directory
        self.file = step if self.bare_file else step / MSGPACK_FILE
        self.base = step.parent if self.bare_file else step  # where references are resolved
        try:
            raw = self.file.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{self.file}: cannot read the T5X checkpoint file ({e}).") from e
        if raw.startswith(b"model_checkpoint_path"):
            raise CheckpointError(f"{self.file}: a TensorFlow T5 checkpoint, not a native T5X one.")
        try:
            contents = serialization.msgpack_restore(raw)
        except Exception as e:  # msgpack raises ValueError/ExtraData/... on damage
            raise CheckpointError(
                f"{self.file}: not a readable T5X checkpoint msgpack (truncated or corrupt? {e})."
            ) from e
        del raw
        if not isinstance(contents, dict):
            raise CheckpointError(f"{self.file}: holds a {type(contents).__name__}, not a T5X state dict.")
        if self.layout == LEGACY:
            version = contents.get("version", 0)
            if not isinstance(version, (int, np.integer)):
                raise CheckpointError(f"{self.file}: 'version' is {version!r}, not a T5X checkpoint version.")
            self.version: int | None = int(version)
            if "optimizer" in contents:
                prefix: tuple[str, ...] = ("optimizer",)
            else:  # version 0: a plain Flax optimizer state dict
                prefix = ()
        else:
            self.version, prefix = None, (OLD_ORBAX_OPTIMIZER,)
        optimizer = contents[prefix[0]] if prefix else contents
        target = optimizer.get(TARGET) if isinstance(optimizer, dict) else None
        if not isinstance(target, dict):
            raise CheckpointError(f"{self.file}: no '{TARGET}' parameters in the T5X state dict.")
        self._contents = contents
        self._target_key = (*prefix, TARGET)
        self._leaves: dict[str, Any] = {}
        self._collect(target, ())
        self.references = _has_reference(contents)  # any array directory, target or not
        self._meta: dict[str, jax.ShapeDtypeStruct] | None = None

    def _collect(self, node: dict, keys: tuple[str, ...]) -> None:
        for k in sorted(node):  # jax's (sorted) leaf order, as the other readers
            v = node[k]
            if not isinstance(k, str) or SEP in k:
                raise CheckpointError(
                    f"{self.file}: key {k!r} in '{TARGET}/{SEP.join(keys)}' is not a string free of '{SEP}'."
                )
            path = (*keys, k)
            p = SEP.join(path)
            if is_ts_spec(v):
                self._leaves[p] = _TsLeaf(v, relative_ts_path(v))
            elif isinstance(v, str) and v.startswith(PLACEHOLDER):
                self._leaves[p] = _TsLeaf(None, v[len(PLACEHOLDER) :], v)
            elif isinstance(v, dict):
                self._collect(v, path)
            elif isinstance(v, (str, bytes)):
                raise CheckpointError(f"{self.file}: leaf '{p}' of '{TARGET}' is a string, not an array.")
            elif v is not None:
                self._leaves[p] = v if isinstance(v, (np.ndarray, np.generic)) else np.asarray(v)

    # ---- references

    def leaf_spec(self, p: str) -> dict:
        """The zarr spec of a referenced leaf (orbax-aggregate: from its ``.zarray``)."""
        leaf: _TsLeaf = self._leaves[p]
        if leaf.spec is None:
            array_dir = self.base / leaf.rel
            try:
                md = json.loads((array_dir / ZARRAY).read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(
                    f"{array_dir}: cannot read the zarr metadata ({ZARRAY}) of leaf '{p}' "
                    f"(referenced by {self.file}): {e}."
                ) from e
            leaf.spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": leaf.rel}, "metadata": md}
        return leaf.spec

    def array_dir(self, p: str) -> Path | None:
        """The array directory of leaf ``p`` (``None``: inline, or a spec without a path)."""
        leaf = self._leaves[p]
        rel = leaf.rel if isinstance(leaf, _TsLeaf) else None
        return None if rel is None else self.base / rel

    def _ts_shape_dtype(self, p: str, spec: dict) -> tuple[tuple[int, ...], np.dtype]:
        shape, dtype = spec_shape_dtype(spec)
        if dtype is not None and str(dtype) in ("uint16", "<u2") and self.version is not None and self.version < 3:
            raise CheckpointError(
                f"{self.file}: leaf '{p}' is bfloat16 stored as uint16 (T5X checkpoint version "
                f"{self.version}); re-save it with a current t5x (version 3)."
            )
        if shape is None or dtype is None:  # not in the spec: ask the array's own metadata
            t = self._open(p)
            return tuple(t.shape), np.dtype(t.dtype.numpy_dtype)
        try:
            return tuple(int(s) for s in shape), dtype_of(dtype)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.file}: leaf '{p}' has a bad shape/dtype {shape!r} {dtype!r}.") from e

    def metadata(self) -> dict[str, jax.ShapeDtypeStruct]:
        if self._meta is None:
            meta = {}
            for p, leaf in self._leaves.items():
                if isinstance(leaf, _TsLeaf):
                    shape, dtype = self._ts_shape_dtype(p, self.leaf_spec(p))
                else:
                    shape, dtype = leaf.shape, leaf.dtype
                meta[p] = jax.ShapeDtypeStruct(shape, dtype)
            self._meta = meta
        return self._meta

    def is_inline(self, path: str) -> bool:
        """Whether the leaf is stored inline in the msgpack (else in an array directory)."""
        return not isinstance(self._leaves[path], _TsLeaf)

    def _prepare(self, p: str) -> tuple[dict, Path]:
        """The spec to open leaf ``p`` with, and its array directory (which must exist)."""
        leaf: _TsLeaf = self._leaves[p]
        if leaf.placeholder is not None:  # the array's own .zarray says everything
            array_dir = self.base / leaf.rel
            local = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(array_dir) + "/"}}
        else:
            try:
                local, array_dir = local_spec(leaf.spec, self.base, keep_layout=False)
            except ValueError as e:
                raise CheckpointError(f"{self.file}: leaf '{p}': {e}.") from e
        if not array_dir.is_dir():
            raise CheckpointError(
                f"{array_dir}: TensorStore array of leaf '{p}' is missing (referenced by {self.file})."
            )
        return local, array_dir

    def _open(self, p: str):
        import tensorstore as ts

        local, array_dir = self._prepare(p)
        try:
            return ts.open(local, open=True, read=True, context=ts_context()).result()
        except Exception as e:
            raise CheckpointError(f"{array_dir}: cannot open the TensorStore array of leaf '{p}' ({e}).") from e

    def read(
        self,
        paths: Sequence[str],
        shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    ) -> dict[str, Any]:
        import tensorstore as ts

        self.check_paths(paths)
        meta = self.metadata()
        out: dict[str, Any] = {}
        opening = []
        for p in paths:  # open, then read, all leaves of the group concurrently
            leaf = self._leaves[p]
            if isinstance(leaf, _TsLeaf):
                local, array_dir = self._prepare(p)
                opening.append((p, array_dir, ts.open(local, open=True, read=True, context=ts_context())))
            else:
                out[p] = np.asarray(leaf) if isinstance(leaf, np.generic) else leaf
        reading = []
        for p, array_dir, fut in opening:
            try:
                reading.append((p, array_dir, fut.result().read()))
            except Exception as e:
                raise CheckpointError(f"{array_dir}: cannot open the TensorStore array of leaf '{p}' ({e}).") from e
        for p, array_dir, fut in reading:
            try:
                a = np.asarray(fut.result())
            except Exception as e:
                raise CheckpointError(f"{array_dir}: cannot read leaf '{p}' ({e}).") from e
            want = meta[p]
            if a.shape != tuple(want.shape) or a.dtype != want.dtype:
                raise CheckpointError(
                    f"{array_dir}: leaf '{p}' is {a.shape} {a.dtype}, the spec in {self.file} says "
                    f"{tuple(want.shape)} {want.dtype}."
                )
            out[p] = a
        result = {p: out[p] for p in paths}
        if shardings:
            result = {p: jax.device_put(a, shardings[p]) if p in shardings else a for p, a in result.items()}
        return result


class _Spilled:
    """An inline leaf waiting on disk for the msgpack to be written."""

    __slots__ = ("file", "shape", "dtype", "scalar")

    def __init__(self, file: Path, shape, dtype, scalar: bool):
        self.file, self.shape, self.dtype, self.scalar = file, tuple(shape), np.dtype(dtype), scalar

    def load(self):
        a = np.fromfile(self.file, dtype=self.dtype).reshape(self.shape)
        return a[()] if self.scalar else a


class MsgpackWriter(Writer):
    """Writer of the legacy and orbax-aggregate layouts (``source``'s).

    Referenced ``target`` leaves are written as each group arrives, into
    ``staging_path(dest)``; inline ones are spilled to a scratch file there and
    streamed into the new msgpack at commit, one leaf at a time (the msgpack
    can only be written once the tree is complete). The other array
    directories and files are copied byte for byte.
    """

    def __init__(self, path, template, *, source=None):
        super().__init__(path, template, source=source)
        src: MsgpackReader = self.source  # type: ignore[assignment]
        self.layout = src.layout
        if src.bare_file and src.references:
            raise CheckpointError(
                f"{src.file}: a bare T5X msgpack file that references array directories cannot be "
                f"copied as a file; pass the step directory holding it as the source."
            )
        self._new: dict[str, Any] = {}  # path -> new spec dict | placeholder string | _Spilled

    def _ensure_staged(self) -> None:
        (self._staged / _SPILL_DIR).mkdir(parents=True, exist_ok=True)

    def _new_spec(self, p: str, dtype: np.dtype) -> dict:
        src: MsgpackReader = self.source  # type: ignore[assignment]
        spec = copy.deepcopy(src.leaf_spec(p))
        rel = relative_ts_path(spec)
        if rel is None or os.path.isabs(rel) or ".." in Path(rel).parts:
            # Not a path inside the checkpoint: name it the way t5x does.
            spec.pop("path", None)
            spec["kvstore"] = {"driver": "file", "path": f"{TARGET}." + p.replace(SEP, ".")}
        if np.dtype(dtype) != np.dtype(src.metadata()[p].dtype):
            spec["dtype"] = jnp.dtype(dtype).name
            md = spec.get("metadata")
            if isinstance(md, dict):
                md.pop("dtype", None)
                md.pop("fill_value", None)
        return spec

    def _write(self, arrays: Mapping[str, Any]) -> None:
        import tensorstore as ts

        src: MsgpackReader = self.source  # type: ignore[assignment]
        self._ensure_staged()
        pending = []
        for p, a in arrays.items():
            a = to_host(a)
            leaf = src._leaves[p]
            if isinstance(leaf, _TsLeaf):
                spec = self._new_spec(p, a.dtype)
                local, array_dir = local_spec(spec, self._staged, keep_layout=True)
                local.setdefault("metadata", {})["shape"] = list(a.shape)
                try:
                    t = ts.open(local, create=True, open=False, context=ts_context()).result()
                    pending.append((p, array_dir, t.write(a)))
                except Exception as e:
                    raise CheckpointError(f"{array_dir}: cannot write leaf '{p}' ({e}).") from e
                self._new[p] = leaf.placeholder if leaf.placeholder is not None else spec
            else:
                file = self._staged / _SPILL_DIR / f"{len(self._new)}.bin"
                np.ascontiguousarray(a).tofile(file)
                self._new[p] = _Spilled(file, a.shape, a.dtype, isinstance(leaf, np.generic))
        for p, array_dir, fut in pending:
            try:
                fut.result()
            except Exception as e:
                raise CheckpointError(f"{array_dir}: cannot write leaf '{p}' ({e}).") from e

    def _finish(self) -> None:
        src: MsgpackReader = self.source  # type: ignore[assignment]
        self._ensure_staged()
        if not src.bare_file:
            exclude = {src.file.absolute()}
            exclude |= {d.absolute() for d in map(src.array_dir, src._leaves) if d is not None}
            copy_except(src.path, self._staged, exclude)
        tmp = self._staged / (MSGPACK_FILE + ".pact-partial")
        try:
            with open(tmp, "wb") as f:
                self._pack(f, src._contents, ())
            os.replace(tmp, self._staged / MSGPACK_FILE)
        except OSError as e:
            raise CheckpointError(f"{self._staged / MSGPACK_FILE}: cannot write ({e}).") from e
        remove(self._staged / _SPILL_DIR)
        if src.bare_file:
            publish(self._staged / MSGPACK_FILE, self.path, overwrite=self.overwrite)
            remove(self._staged)
        else:
            publish(self._staged, self.path, overwrite=self.overwrite)

    def _pack(self, f, node: Any, keys: tuple[str, ...]) -> None:
        """Streams ``node`` as msgpack, byte-identical to ``flax.serialization.to_bytes``."""
        src: MsgpackReader = self.source  # type: ignore[assignment]
        tk = src._target_key
        if keys[: len(tk)] == tk and len(keys) > len(tk):
            p = SEP.join(keys[len(tk) :])
            if p in self._new:
                new = self._new[p]
                if isinstance(new, _Spilled):
                    value = new.load()
                    f.write(serialization.msgpack_serialize(value, in_place=True))
                    del value
                    remove(new.file)
                else:
                    f.write(serialization.msgpack_serialize(new, in_place=True))
                return
        if isinstance(node, dict) and type(node) is dict:
            packer = msgpack.Packer(use_bin_type=True, strict_types=True)
            f.write(packer.pack_map_header(len(node)))
            for k, v in node.items():
                f.write(packer.pack(k))
                self._pack(f, v, (*keys, k))
        else:
            f.write(serialization.msgpack_serialize(node))

    def _abort(self) -> None:
        remove(self._staged)
