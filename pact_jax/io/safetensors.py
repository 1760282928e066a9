"""safetensors: flattened key paths joined with ``.`` (``params.dense_0.kernel``).

A checkpoint is one ``.safetensors`` file or a directory of shards in the
Hugging Face layout (``model-00001-of-00003.safetensors`` ... plus
``model.safetensors.index.json`` mapping each key to its shard; a directory
without an index is read as the union of its ``*.safetensors`` files).
Reading is lazy: headers give shapes and dtypes, ``read`` loads only the keys
asked for.

Writing a directory streams: every :meth:`Writer.write` call becomes one
shard on disk, and ``commit`` names the shards ``-of-N`` and writes the index.
Writing a single ``.safetensors`` file buffers the model until ``commit``
(the format needs every tensor's size in its header). Key paths must not
contain ``.`` inside a key name, or the flattening would be ambiguous.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from pact_jax.io.base import (
    SEP,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    publish,
    remove,
    staging_path,
)

INDEX = "model.safetensors.index.json"
_META = {"format": "flax", "producer": "pact_jax"}


def to_key(path: str) -> str:
    return path.replace(SEP, ".")


def to_path(key: str) -> str:
    return key.replace(".", SEP)


def detect(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".safetensors"
    return path.is_dir() and any(path.glob("*.safetensors"))


def _shard_files(path: Path) -> dict[str, Path] | list[Path]:
    """``{key: file}`` from an index, or the list of files to scan."""
    if path.is_file():
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{indexes[0]}: not a readable safetensors index ({e}).") from e
        return {k: path / f for k, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files in this directory.")
    return files


class Reader(CheckpointReader):
    format = "safetensors"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._meta: dict[str, jax.ShapeDtypeStruct] | None = None
        self._files: dict[str, Path] = {}

    def _open(self, file: Path):
        try:
            return safe_open(str(file), framework="numpy")
        except Exception as e:  # SafetensorError, OSError: truncated header, missing shard
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}).") from e

    def metadata(self) -> dict[str, jax.ShapeDtypeStruct]:
        if self._meta is not None:
            return self._meta
        shards = _shard_files(self.path)
        files = sorted(set(shards.values())) if isinstance(shards, dict) else shards
        meta = {}
        for file in files:
            with self._open(file) as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    path = to_path(key)
                    if path in meta:
                        raise CheckpointError(f"{file}: key '{key}' also appears in {self._files[path]}.")
                    meta[path] = jax.ShapeDtypeStruct(tuple(sl.get_shape()), _dtype(sl.get_dtype(), file, key))
                    self._files[path] = file
        if isinstance(shards, dict):
            missing = sorted(set(map(to_path, shards)) - set(meta))
            if missing:
                raise CheckpointError(f"{self.path}: index lists '{missing[0]}' but no shard holds it.")
        self._meta = meta
        return meta

    def read(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        self.check_paths(paths)
        by_file: dict[Path, list[str]] = {}
        for p in paths:
            by_file.setdefault(self._files[p], []).append(p)
        out = {}
        for file, group in by_file.items():
            with self._open(file) as f:
                for p in group:
                    try:
                        out[p] = f.get_tensor(to_key(p))
                    except Exception as e:
                        raise CheckpointError(f"{file}: cannot read leaf '{p}' ({e}).") from e
        return {p: out[p] for p in paths}


_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _dtype(name: str, file: Path, key: str) -> np.dtype:
    if name not in _DTYPES:
        raise CheckpointError(f"{file}: key '{key}' has dtype {name}, which pact_jax cannot merge.")
    return np.dtype(jax.numpy.dtype(_DTYPES[name]))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it.
_FILE_MODE = 0o666 & ~_umask()


def _save(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """``safetensors.numpy.save_file`` with the permissions of a file ``open()`` would create: it writes
    ``-rw-------`` (a private temporary file, renamed), unlike the other formats."""
    save_file(dict(tensors), str(path), metadata=_META)
    os.chmod(path, _FILE_MODE)


class Writer(CheckpointWriter):
    format = "safetensors"

    def __init__(self, path: str | os.PathLike, template: Mapping[str, jax.ShapeDtypeStruct], *, source=None):
        super().__init__(path, template)
        bad = [p for p in self.template if "." in p]
        if bad:
            raise CheckpointError(
                f"{self.path}: leaf '{bad[0]}' has '.' inside a key name; safetensors keys "
                "join the path with '.', so it could not be read back unambiguously."
            )
        self._single = self.path.suffix == ".safetensors"
        self._staged = staging_path(self.path)
        self._buffer: dict[str, np.ndarray] = {}
        self._shards: list[tuple[Path, list[str]]] = []
        if not self._single:
            self._staged.mkdir()

    def _write(self, arrays: Mapping[str, Any]) -> None:
        # np.require, not np.ascontiguousarray: the latter turns a 0-d leaf into shape (1,).
        tensors = {to_key(p): np.require(np.asarray(a), requirements="C") for p, a in arrays.items()}
        if self._single:
            self._buffer.update(tensors)
            return
        shard = self._staged / f"shard-{len(self._shards):05d}.safetensors"
        _save(tensors, shard)
        self._shards.append((shard, list(tensors)))

    def _commit(self) -> None:
        try:
            if self._single:
                order = [to_key(p) for p in self.template]
                _save({k: self._buffer[k] for k in order}, self._staged)
                self._buffer.clear()
            else:
                self._name_shards()
            publish(self._staged, self.path, overwrite=self.overwrite)
        except BaseException:
            self.abort()
            raise

    def _name_shards(self) -> None:
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self._staged / "model.safetensors")
            return
        weight_map = {}
        for i, (shard, keys) in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            shard.rename(self._staged / name)
            weight_map.update(dict.fromkeys(keys, name))
        total = int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in self.template.values()))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self._staged / INDEX).write_text(json.dumps(index, indent=2))

    def _abort(self) -> None:
        self._buffer.clear()
        remove(self._staged)
