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

Hugging Face-ready output (docs/huggingface.md). Given the pre-trained
checkpoint's reader as ``source=`` (as :func:`pact_jax.io.streaming.merge_checkpoints`
does), the writer keeps what HF loaders read:

* the header metadata (:func:`output_metadata`): a safetensors source's own
  (``{"format": "pt"}`` for a PyTorch / HF save), else ``{"format": "flax"}``;
* the key names and dtypes (leaves are written back under the keys read);
* in a directory: no shard without a floating-point tensor
  (transformers takes the model's dtype from the first shard's first floating
  tensor and refuses a shard of integers only: a write without one is held
  and joined to the next shard), the index, and a copy of the pre-trained
  directory's other files (:func:`copy_model_files`: config, tokenizer ...).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

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
#: The header metadata of an output whose pre-trained checkpoint is not safetensors (orbax, msgpack, T5X).
FLAX_METADATA = {"format": "flax", "producer": "pact_jax"}


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

    def header_metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the checkpoint's (first) file's header, e.g. ``{"format": "pt"}``
        for a PyTorch / Hugging Face save; ``{}`` when it has none."""
        shards = _shard_files(self.path)
        files = sorted(set(shards.values())) if isinstance(shards, dict) else shards
        with self._open(files[0]) as f:
            return dict(f.metadata() or {})

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


def _save(tensors: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None) -> None:
    """``safetensors.numpy.save_file`` with the permissions of a file ``open()`` would create: it writes
    ``-rw-------`` (a private temporary file, renamed), unlike the other formats."""
    save_file(dict(tensors), str(path), metadata=None if metadata is None else dict(metadata))
    os.chmod(path, _FILE_MODE)


def _floating(dtype: Any) -> bool:
    return bool(jax.numpy.issubdtype(np.dtype(dtype), jax.numpy.floating))  # bfloat16 too (np.issubdtype: no)


# --------------------------------------------------------------------------
# What an output keeps of its pre-trained checkpoint


def output_metadata(source: CheckpointReader | None) -> dict[str, str] | None:
    """The header ``__metadata__`` of the files written from a merge of ``source`` (the pre-trained reader).

    A safetensors ``source`` keeps its metadata entry for entry: Hugging Face loaders read its
    ``"format"`` (transformers 4.x loads ``"flax"`` through its Flax path, which needs jax; ``"pt"``
    as PyTorch's). Beside a ``"format"`` entry, ``"producer": "pact_jax"`` is set (loaders read
    ``"format"`` only); without one nothing is added and a source without metadata gives ``None``
    (no metadata written), because transformers 4.x reads a file without metadata as PyTorch's but
    refuses metadata lacking ``"format"``. Any other source: :data:`FLAX_METADATA`.
    """
    if not isinstance(source, Reader):
        return dict(FLAX_METADATA)
    meta = dict(source.header_metadata())
    if "format" in meta:
        meta["producer"] = "pact_jax"
    return meta or None


#: Files that hold weights, never copied into an output beside the merged ones: safetensors,
#: PyTorch, TensorFlow, Flax, rust-bert, ONNX, GGUF, NumPy and pickle files, and shard indexes.
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".ot", ".onnx", ".gguf",
    ".npz", ".npy", ".pkl", ".pickle", ".index.json",
)  # fmt: skip
# Names that mark a directory as a checkpoint of its own (orbax, T5X).
_CHECKPOINT_MARKERS = {"_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint"}


def model_files_dir(source: CheckpointReader | None) -> Path | None:
    """The directory whose non-weight files a directory output copies (:func:`copy_model_files`).

    A safetensors directory: itself. A single ``.safetensors`` file: its directory if it holds a
    ``config.json`` (a Hugging Face model directory), else none: the siblings of a loose file
    are other checkpoints and unrelated files. Any other source: none.
    """
    if not isinstance(source, Reader):
        return None
    if source.path.is_dir():
        return source.path
    parent = source.path.parent
    return parent if (parent / "config.json").is_file() else None


def _skipped(entry: Path) -> bool:
    """Hidden entries (``.git``, ``.cache``), pact_jax's own staging / lock names, weight files."""
    name = entry.name
    return name.startswith(".") or ".pact-" in name or name.endswith(WEIGHT_SUFFIXES)


def _walk(directory: Path):
    """``os.walk`` following links, without hidden or ``*.pact-*`` entries, each real directory once
    (a link back up would loop)."""
    seen = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not (d.startswith(".") or ".pact-" in d)]
        yield Path(root), [f for f in files if not (f.startswith(".") or ".pact-" in f)]


def _holds_checkpoint(directory: Path) -> bool:
    return any(f.endswith(WEIGHT_SUFFIXES) or f in _CHECKPOINT_MARKERS for _, files in _walk(directory) for f in files)


def _copy_tree(src: Path, dest: Path) -> None:
    """Files copied with fresh permissions (not ``copytree``'s copied modes: a read-only source
    directory would make the staged output undeletable on abort); dangling links skipped."""
    for root, files in _walk(src):
        out = dest / root.relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            if (root / f).is_file():
                shutil.copyfile(root / f, out / f)


def copy_model_files(src: Path, dest: Path) -> list[str]:
    """Copies ``src``'s files that are not weights into the directory ``dest``; returns their names.

    Copied: every file (``config.json``, ``generation_config.json``, tokenizer files such as
    ``tokenizer.json``, ``tokenizer_config.json``, ``vocab.txt``, ``merges.txt``,
    ``special_tokens_map.json``, ``*.model``, a licence, the model card) and every subdirectory
    holding no checkpoint (sentence-transformers' ``1_Pooling/``), byte for byte, following
    symbolic links (a Hugging Face cache snapshot is links into its blob store). Not copied:
    weight files and shard indexes (:data:`WEIGHT_SUFFIXES`; only the merged weights belong in
    the output), subdirectories holding a weight file or an orbax / T5X checkpoint, hidden
    entries, pact_jax's ``*.pact-*`` staging and lock names. Existing names in ``dest`` (the
    merged shards, the index) are never replaced.
    """
    copied = []
    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if _skipped(entry) or target.exists():
            continue
        try:
            if entry.is_dir():
                if _holds_checkpoint(entry):
                    continue
                _copy_tree(entry, target)
            elif entry.is_file():
                shutil.copyfile(entry, target)  # fresh permissions, not the source's (read-only blobs)
            else:
                continue  # a socket, a dangling link
        except OSError as e:
            raise CheckpointError(f"{entry}: cannot copy this file of the pre-trained model into the output "
                                  f"({e}); nothing was published.") from e
        copied.append(entry.name)
    return copied


# --------------------------------------------------------------------------
# Writer


class Writer(CheckpointWriter):
    """A ``.safetensors`` file (buffered until ``commit``) or a directory of shards (one per write).

    ``source``: the pre-trained checkpoint's reader; see :func:`output_metadata` (the header
    metadata written) and :func:`model_files_dir` (the files copied into a directory output).
    """

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
        self._metadata = output_metadata(source)
        self._files_from = None if self._single else model_files_dir(source)
        #: Names of the pre-trained model's files copied into the output at ``commit``.
        self.copied_files: list[str] = []
        self._staged = staging_path(self.path)
        self._buffer: dict[str, np.ndarray] = {}
        self._held: dict[str, np.ndarray] = {}  # written leaves without a float among them, for the next shard
        self._shards: list[tuple[Path, list[str]]] = []
        if not self._single:
            self._staged.mkdir()

    def _write(self, arrays: Mapping[str, Any]) -> None:
        # np.require, not np.ascontiguousarray: the latter turns a 0-d leaf into shape (1,).
        tensors = {to_key(p): np.require(np.asarray(a), requirements="C") for p, a in arrays.items()}
        if self._single:
            self._buffer.update(tensors)
            return
        if not any(_floating(t.dtype) for t in tensors.values()):
            # transformers (without dtype= and without one in config.json) instantiates the model in the
            # dtype of the first floating tensor of the first shard, and fails if that shard has none
            # (merge_checkpoints writes the copied integer buffers, e.g. BERT's position_ids, first).
            self._held.update(tensors)
            return
        tensors = {**self._held, **tensors}
        self._held.clear()
        self._new_shard(tensors)

    def _new_shard(self, tensors: Mapping[str, np.ndarray]) -> None:
        shard = self._staged / f"shard-{len(self._shards):05d}.safetensors"
        _save(tensors, shard, self._metadata)
        self._shards.append((shard, list(tensors)))

    def _place_held(self) -> None:
        """Leaves held back with no floating shard after them join the last shard (rewritten: one
        shard's memory, only when a float-free write comes last); a model without floats is one shard."""
        if not self._held:
            return
        if not self._shards:
            self._new_shard(self._held)
        else:
            shard, keys = self._shards[-1]
            tensors = load_file(str(shard))
            tensors.update(self._held)
            _save(tensors, shard, self._metadata)
            self._shards[-1] = (shard, [*keys, *self._held])
        self._held.clear()

    def _commit(self) -> None:
        try:
            if self._single:
                order = [to_key(p) for p in self.template]
                _save({k: self._buffer[k] for k in order}, self._staged, self._metadata)
                self._buffer.clear()
            else:
                self._place_held()
                self._name_shards()
                if self._files_from is not None:
                    self.copied_files = copy_model_files(self._files_from, self._staged)
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
        self._held.clear()
        remove(self._staged)
