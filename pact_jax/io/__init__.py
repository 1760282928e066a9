"""Checkpoints in and out: orbax (default), Flax msgpack, safetensors, T5X.

Every format gives a lazy :class:`CheckpointReader` (``metadata()`` without
reading arrays, ``read(paths)`` for a subset of leaves) and an incremental,
atomic :class:`CheckpointWriter`. :func:`load` / :func:`save` are the
whole-model shortcuts; :mod:`pact_jax.io.streaming` merges leaf group by leaf
group through the lazy interface.

Format detection (override with ``format=``):

* a file ending in ``.msgpack`` -> ``msgpack``; in ``.safetensors`` -> ``safetensors``;
* a T5X checkpoint (a step directory in any T5X layout, its ``checkpoint``
  msgpack file or a bare T5X msgpack file, or a model directory whose latest
  ``checkpoint_<N>`` is one) -> ``t5x``;
* a directory of ``*.safetensors`` files (optionally with
  ``model.safetensors.index.json``) -> ``safetensors``;
* any other directory -> ``orbax``.

A destination that does not exist yet is typed by its suffix the same way
(no suffix: an orbax directory).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from pact_jax.io.base import (
    CheckpointError,
    check_key_names,
    CheckpointReader,
    CheckpointWriter,
    flatten,
    is_primary_process,
    unflatten,
)
from pact_jax.io import owner
from pact_jax.tree import PyTree

# name -> module implementing ``Reader``, ``Writer`` and ``detect(path) -> bool``.
_MODULES = {
    "orbax": "pact_jax.io.orbax",
    "msgpack": "pact_jax.io.msgpack",
    "safetensors": "pact_jax.io.safetensors",
    "t5x": "pact_jax.io.t5x",
}
FORMATS: tuple[str, ...] = tuple(_MODULES)
SUFFIXES = {".msgpack": "msgpack", ".safetensors": "safetensors"}


def _module(fmt: str):
    if fmt not in _MODULES:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}.")
    return importlib.import_module(_MODULES[fmt])


def detect_format(path: str | os.PathLike) -> str:
    """The format of an existing checkpoint, or of a destination by its suffix."""
    p = Path(path)
    if p.suffix in SUFFIXES:
        return SUFFIXES[p.suffix]
    if not p.exists():
        return "orbax"
    if p.is_file():
        if _module("t5x").detect(p):  # a T5X msgpack: a step's 'checkpoint', or a bare file
            return "t5x"
        raise CheckpointError(
            f"{p}: cannot tell the checkpoint format of this file from its name; "
            f"pass the format explicitly (one of {FORMATS})."
        )
    for fmt in ("t5x", "safetensors"):
        if _module(fmt).detect(p):
            return fmt
    return "orbax"


def open_reader(path: str | os.PathLike, format: str | None = None, *, step: int | None = None) -> CheckpointReader:
    """A lazy reader of the checkpoint at ``path`` (format detected if not given).

    An orbax ``CheckpointManager`` root reads as its latest step, or as step ``step``
    (:mod:`pact_jax.io.orbax_manager`; ``step`` for anything but a root is an error).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint (file or directory not found).")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"{p}: checkpoint is not readable (permission denied).")
    if format in (None, "orbax"):
        from pact_jax.io import orbax_manager

        p = orbax_manager.resolve(p, step)
    elif step is not None:
        raise CheckpointError(f"{p}: a step selects a step of an orbax CheckpointManager root, not of a {format} checkpoint.")
    fmt = format or detect_format(p)
    return _module(fmt).Reader(p)


def open_writer(
    path: str | os.PathLike,
    template: Mapping[str, jax.ShapeDtypeStruct],
    format: str | None = None,
    *,
    source: CheckpointReader | None = None,
    overwrite: bool = False,
    output_step: int | None = None,
) -> CheckpointWriter:
    """An atomic writer of a checkpoint with the leaves of ``template``.

    Args:
      path: destination file or directory; must not exist unless ``overwrite``.
      template: ``{path: ShapeDtypeStruct}`` of every leaf to be written.
      format: output format; default: detected from ``path``'s suffix.
      source: the reader of a checkpoint whose layout to copy; required by
        ``t5x`` (the merged params replace the ``target`` of a copy of it).
      overwrite: replace an existing checkpoint at ``path`` (only on commit).
      output_step: ``path`` is an orbax ``CheckpointManager`` root (new or existing) and the
        checkpoint becomes its step ``output_step``, as ``CheckpointManager(path).save(step, ...)``
        writes it; no other step is touched, an existing step is replaced only with ``overwrite``
        (:mod:`pact_jax.io.orbax_manager`).
    """
    p = Path(path)
    writer_options: dict[str, Any] = {}
    if output_step is not None:
        from pact_jax.io import orbax_manager

        if (format or detect_format(p)) != "orbax":
            raise CheckpointError(f"{p}: an output step is a step of an orbax CheckpointManager root; the output "
                                  f"format here is {format or detect_format(p)}.")  # fmt: skip
        p, writer_options["layout"] = orbax_manager.output_step(p, output_step, source=source, overwrite=overwrite)
        format = "orbax"
    if format is not None and SUFFIXES.get(p.suffix, format) != format:
        raise CheckpointError(
            f"{p}: its suffix {p.suffix!r} names the {SUFFIXES[p.suffix]} format, but {format} was asked for; "
            f"rename the output or drop the format (--output-format)."
        )
    if p.parent.exists() and not p.parent.is_dir():
        raise CheckpointError(f"{p}: its parent {p.parent} is a file, not a directory.")
    p.parent.mkdir(parents=True, exist_ok=True)
    # One writer per output path (pact_jax.io.owner): the lock first, then the checks it guards.
    lock = owner.lock_output(p) if is_primary_process() else None
    try:
        if (p.exists() or p.is_symlink()) and not overwrite:
            raise CheckpointError(f"{p} already exists; refusing to overwrite it (pass --overwrite, or overwrite=True in Python).")
        if lock is not None:
            owner.remove_leftovers(p)
        fmt = format or detect_format(p)
        writer = _module(fmt).Writer(p, template, source=source, **writer_options)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    writer.overwrite, writer._lock = overwrite, lock
    return writer


def load(path: str | os.PathLike, format: str | None = None, *, step: int | None = None) -> dict:
    """The whole checkpoint at ``path`` as nested dicts of NumPy arrays (``step``: of a CheckpointManager root)."""
    with open_reader(path, format, step=step) as reader:
        return reader.load()


def save(
    path: str | os.PathLike,
    params: PyTree,
    format: str | None = None,
    *,
    source: CheckpointReader | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``params`` (nested dicts of arrays) to ``path`` atomically; returns ``path``."""
    check_key_names(params, str(path))
    flat = flatten(params)
    template = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
    with open_writer(path, template, format, source=source, overwrite=overwrite) as writer:
        writer.write(flat)
        return writer.commit()


__all__ = [
    "FORMATS",
    "CheckpointError",
    "CheckpointReader",
    "CheckpointWriter",
    "detect_format",
    "flatten",
    "is_adapter",
    "load",
    "load_adapter",
    "merge_adapters",
    "open_reader",
    "open_writer",
    "read_adapter",
    "save",
    "save_adapter",
    "unflatten",
]


# PEFT LoRA adapters (docs/lora.md): name -> module, imported on first use.
_ADAPTER_API = {"read_adapter": "peft", "load_adapter": "peft", "save_adapter": "peft", "is_adapter": "peft",
                "merge_adapters": "lora_merge"}  # fmt: skip


def __getattr__(name: str) -> Any:  # lazy submodule access: pact_jax.io.orbax etc.
    if name in _MODULES:
        return _module(name)
    if name in _ADAPTER_API:
        return getattr(importlib.import_module(f"pact_jax.io.{_ADAPTER_API[name]}"), name)
    raise AttributeError(name)
