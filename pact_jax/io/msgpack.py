"""Flax msgpack (``flax.serialization.msgpack_serialize``): one file, one blob.

msgpack is not random-access: reading any leaf parses the whole file, and the
file can only be written once the whole tree is known. So a streaming merge
that reads msgpack holds one input checkpoint at a time while it picks its
leaves, and a msgpack *output* buffers the merged model until ``commit``.
Prefer orbax, safetensors or T5X for models that do not fit in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from pact_jax.io.base import (
    SEP,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    check_key_names,
    flatten,
    publish,
    remove,
    staging_path,
    unflatten,
)


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix == ".msgpack"


class Reader(CheckpointReader):
    format = "msgpack"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: a Flax msgpack checkpoint must be a file.")
        self._meta: dict[str, jax.ShapeDtypeStruct] | None = None
        self._empty: dict[str, str] = {}

    def _parse(self) -> dict[str, Any]:
        try:
            tree = serialization.msgpack_restore(self.path.read_bytes())
        except Exception as e:  # msgpack raises ValueError/ExtraData/... on a damaged file
            raise CheckpointError(f"{self.path}: not a readable Flax msgpack checkpoint ({e}).") from e
        if not isinstance(tree, dict):
            raise CheckpointError(f"{self.path}: holds a {type(tree).__name__}, not a dict of parameters.")
        check_key_names(tree, str(self.path))
        self._empty = empty_subtrees(tree)
        flat = flatten(tree)
        for p, leaf in flat.items():
            if not isinstance(leaf, np.ndarray):
                flat[p] = np.asarray(leaf)
        return flat

    def metadata(self) -> dict[str, jax.ShapeDtypeStruct]:
        if self._meta is None:
            self._meta = {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in self._parse().items()}
        return self._meta

    def read(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        self.check_paths(paths)
        flat = self._parse()
        return {p: flat[p] for p in paths}

    def empty_nodes(self) -> dict[str, str]:
        self.metadata()
        return dict(self._empty)


def empty_subtrees(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{path: 'Dict' | 'None'}`` of the empty dicts and ``None`` s in ``tree`` (optax's
    ``EmptyState`` saved by ``flax.serialization.to_bytes`` is ``{}``), which flattening drops."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if v is None or (isinstance(v, dict) and not v):
            out[path] = "None" if v is None else "Dict"
        elif isinstance(v, dict):
            out.update(empty_subtrees(v, path + SEP))
    return out


class Writer(CheckpointWriter):
    format = "msgpack"

    def __init__(self, path: str | os.PathLike, template: Mapping[str, jax.ShapeDtypeStruct], *, source=None):
        super().__init__(path, template)
        check_key_names(unflatten(self.template), str(self.path))
        self._buffer: dict[str, np.ndarray] = {}
        # The source's empty subtrees (optax's EmptyState), without which flax's from_bytes(state, ...) fails.
        self._empty = dict(source.empty_nodes()) if source is not None and hasattr(source, "empty_nodes") else {}
        self._staged = staging_path(self.path)

    def _write(self, arrays: Mapping[str, Any]) -> None:
        self._buffer.update({p: np.asarray(a) for p, a in arrays.items()})

    def _commit(self) -> None:
        # Leaf order of the template, so the file reads back in the input's order.
        tree = unflatten({p: self._buffer[p] for p in self.template})
        for path, kind in self._empty.items():
            *parents, name = path.split(SEP)
            node = tree
            for k in parents:
                node = node.setdefault(k, {})
            if isinstance(node, dict) and name not in node:
                node[name] = None if kind == "None" else {}
        try:
            self._staged.write_bytes(serialization.msgpack_serialize(tree))
            publish(self._staged, self.path, overwrite=self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._buffer.clear()

    def _abort(self) -> None:
        self._buffer.clear()
        remove(self._staged)
