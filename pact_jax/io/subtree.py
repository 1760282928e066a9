"""Which subtree of a checkpoint is the model: the parameters of a train state.

A training checkpoint holds more than the model: a flax ``TrainState`` saved
with orbax or ``flax.serialization`` is ``{params, opt_state, step}``, and
optax's ``opt_state`` holds per-parameter moments (Adam's ``mu`` and ``nu``)
with the shapes of the weights. Merging those as if they were weights is
wrong, so a merge sees only the ``params`` subtree, and the rest goes to the
output untouched:

* :func:`find_params_path` picks the subtree: a top-level ``params`` next to
  an ``opt_state`` (a train state), or the path given
  (``params_path``; ``''``: the whole checkpoint, the default for anything
  else, such as a bare params tree, Flax variables ``{params, batch_stats}``
  or ``{params, step}``, whose non-float ``step`` a merge copies anyway).
* :class:`SubtreeReader` is a reader view over any format's
  :class:`~pact_jax.io.base.CheckpointReader` that exposes only that subtree,
  named relative to it (``dense/kernel``, as in merging ``state.params`` in
  Python: the same leaf rules, the same per-leaf random keys).
* :class:`Selection` says what the output holds: the merged params under
  their prefix, and the other leaves (``opt_state``, ``step``, ...) copied from
  the pre-trained checkpoint (``other_leaves='copy'``, the default) or left
  out (``'drop'``), with the pre-trained tree's structure (tuple keys, empty
  ``EmptyState`` nodes) so that the output restores into a ``TrainState``.

:func:`pact_jax.io.streaming.merge_checkpoints` and the CLI go through here
for every format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from pact_jax.io.base import SEP, CheckpointError, CheckpointReader, CheckpointWriter

#: The subtree a train state keeps its model in, and the key that says a checkpoint is a train state.
PARAMS = "params"
TRAIN_STATE_KEYS = ("opt_state",)
#: What happens to the leaves outside the params subtree.
OTHER_LEAVES = ("copy", "drop")


def _top_keys(meta: Mapping[str, Any], empty: Mapping[str, Any] = {}) -> set[str]:  # noqa: B006 - read only
    return {p.split(SEP, 1)[0] for p in (*meta, *empty)}


def find_params_path(
    meta: Mapping[str, Any], params_path: str | None = None, *, where: str = "", empty: Mapping[str, Any] = {}  # noqa: B006
) -> str:
    """The prefix of the model's leaves in a checkpoint with leaves ``meta`` (``''``: all of them).

    Args:
      meta: ``{path: ShapeDtypeStruct}`` of the checkpoint.
      params_path: ``None``: detect a train state (a top-level ``params`` with ``opt_state``
        beside it: ``'params'``), else the whole checkpoint; a ``/``-joined path such
        as ``'params'`` or ``'state/params'``: that subtree; ``''`` (or ``'/'``): the whole checkpoint.
      where: the checkpoint, for error messages.
      empty: its empty nodes (an ``opt_state`` of ``EmptyState`` s only still marks a train state).
    """
    top = _top_keys(meta, empty)
    if params_path is None:
        if PARAMS in top and top & set(TRAIN_STATE_KEYS) and any(p.startswith(PARAMS + SEP) for p in meta):
            return PARAMS
        return ""
    prefix = params_path.strip(SEP)
    if not prefix:
        return ""
    if prefix in meta:
        raise CheckpointError(f"{where}: params path '{prefix}' is a single leaf, not a subtree of parameters.")
    if not any(p.startswith(prefix + SEP) for p in meta):
        raise CheckpointError(
            f"{where}: no subtree '{prefix}' (params path) in this checkpoint; its top-level keys are {sorted(top)}."
        )
    return prefix


class SubtreeReader(CheckpointReader):
    """The leaves of ``reader`` under ``prefix``.

    ``strip=True``: named relative to ``prefix`` (what a merge sees); ``strip=False``: under
    their full paths (what the output holds when the other leaves are dropped). Everything
    else (the reader's format, ``reads_sharded``, orbax's ``orbax_layout``) is the reader's.
    """

    def __init__(self, reader: CheckpointReader, prefix: str, *, strip: bool = True):
        super().__init__(reader.path)
        self.inner = reader
        self.prefix = prefix.strip(SEP)
        self.strip = strip
        self.format = reader.format
        self.reads_sharded = reader.reads_sharded

    def __getattr__(self, name: str) -> Any:  # orbax_layout and other format-specific attributes
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _full(self, path: str) -> str:
        return f"{self.prefix}{SEP}{path}" if self.strip else path

    def _select(self, mapping: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``mapping`` (keyed by full paths) under the prefix, keyed as this view names them."""
        head = self.prefix + SEP
        n = len(head) if self.strip else 0
        return {p[n:]: v for p, v in mapping.items() if p.startswith(head)}

    def metadata(self) -> dict[str, jax.ShapeDtypeStruct]:
        meta = self._select(self.inner.metadata())
        if not meta:
            raise CheckpointError(
                f"{self.path}: no subtree '{self.prefix}' (params path) in this checkpoint; its top-level keys are "
                f"{sorted(_top_keys(self.inner.metadata()))}."
            )
        return meta

    def read(self, paths: Sequence[str], shardings: Mapping[str, Any] | None = None) -> dict[str, Any]:
        self.check_paths(paths)
        full = [self._full(p) for p in paths]
        if shardings is None:
            got = self.inner.read(full)
        else:
            got = self.inner.read(full, shardings={self._full(p): s for p, s in shardings.items()})  # type: ignore[call-arg]
        return {p: got[f] for p, f in zip(paths, full)}

    def empty_nodes(self) -> dict[str, str]:
        return self._select(self.inner.empty_nodes())

    def key_metadata(self) -> dict[str, list[dict]]:
        """The orbax key entries of the nodes under the prefix (stripped of the prefix's entries)."""
        keys = getattr(self.inner, "key_metadata", None)
        if not callable(keys):
            return {}
        drop = len(self.prefix.split(SEP)) if self.strip else 0
        return {p: list(k)[drop:] for p, k in self._select(keys()).items()}

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"SubtreeReader({self.inner!r}, {self.prefix!r})"


class _PrefixedWriter:
    """Writes a merge's leaves (named inside the params subtree) under their full paths."""

    def __init__(self, writer: CheckpointWriter, prefix: str):
        self.writer, self.prefix = writer, prefix

    def write(self, arrays: Mapping[str, Any]) -> None:
        self.writer.write({f"{self.prefix}{SEP}{p}": a for p, a in arrays.items()})


@dataclasses.dataclass(frozen=True)
class Selection:
    """The model's subtree of a checkpoint and what becomes of the rest.

    Attributes:
      prefix: the params subtree's path (``''``: the whole checkpoint is the model).
      other_leaves: ``'copy'``: the leaves outside it are copied from the pre-trained checkpoint
        into the output; ``'drop'``: the output holds the params subtree alone (still under
        ``prefix``: ``{'params': ...}``).
    """

    prefix: str = ""
    other_leaves: str = "copy"

    def __post_init__(self):
        if self.other_leaves not in OTHER_LEAVES:
            raise ValueError(f"other_leaves must be one of {OTHER_LEAVES}, got {self.other_leaves!r}.")

    def view(self, reader: CheckpointReader) -> CheckpointReader:
        """What the merge reads of ``reader``: its params subtree."""
        return SubtreeReader(reader, self.prefix) if self.prefix else reader

    def output_source(self, pretrained: CheckpointReader) -> CheckpointReader:
        """The reader whose leaves and structure the output copies (a writer's ``source``)."""
        if not self.prefix or self.other_leaves == "copy":
            return pretrained
        return SubtreeReader(pretrained, self.prefix, strip=False)

    def output_template(self, pretrained: CheckpointReader) -> dict[str, jax.ShapeDtypeStruct]:
        return self.output_source(pretrained).metadata()

    def other_paths(self, pretrained: CheckpointReader) -> list[str]:
        """The pre-trained leaves the output copies as they are (outside the params subtree)."""
        if not self.prefix or self.other_leaves == "drop":
            return []
        head = self.prefix + SEP
        return [p for p in pretrained.metadata() if not p.startswith(head)]

    def dropped(self, pretrained: CheckpointReader) -> list[str]:
        """The pre-trained leaves left out of the output."""
        if not self.prefix or self.other_leaves == "copy":
            return []
        head = self.prefix + SEP
        return [p for p in pretrained.metadata() if not p.startswith(head)]

    def full_paths(self, mapping: Mapping[str, Any]) -> dict[str, Any]:
        """``mapping`` keyed by paths inside the params subtree, keyed by full paths."""
        return {f"{self.prefix}{SEP}{p}" if self.prefix else p: v for p, v in mapping.items()}

    def writer_view(self, writer: CheckpointWriter) -> CheckpointWriter | _PrefixedWriter:
        """``writer``, taking leaves named inside the params subtree."""
        return _PrefixedWriter(writer, self.prefix) if self.prefix else writer

    def copy_others(self, pretrained: CheckpointReader, writer: CheckpointWriter, budget_bytes: int | None) -> list[str]:
        """Copies :meth:`other_paths` from ``pretrained`` to ``writer``, in groups of at most
        ``budget_bytes`` (Adam's moments are twice the model); returns the paths copied."""
        paths = self.other_paths(pretrained)
        meta = pretrained.metadata()
        group: list[str] = []
        size = 0
        for p in paths:
            n = int(np.prod(meta[p].shape)) * np.dtype(meta[p].dtype).itemsize
            if group and budget_bytes is not None and size + n > budget_bytes:
                writer.write(pretrained.read(group))
                group, size = [], 0
            group.append(p)
            size += n
        if group:
            writer.write(pretrained.read(group))
        return paths

    def describe(self, pretrained: CheckpointReader) -> str:
        """One line for a merge's summary ('' when the whole checkpoint is the model)."""
        if not self.prefix:
            return ""
        others = self.other_paths(pretrained) or self.dropped(pretrained)
        tops = sorted({p.split(SEP, 1)[0] for p in others})
        done = "copied from the pre-trained checkpoint" if self.other_leaves == "copy" else "dropped"
        return f"merged the '{self.prefix}' subtree only; {len(others)} other leaves ({', '.join(tops)}) {done}"


def select(
    pretrained: CheckpointReader, params_path: str | None = None, other_leaves: str = "copy"
) -> Selection:
    """The :class:`Selection` of the pre-trained checkpoint's model (see :func:`find_params_path`)."""
    if other_leaves not in OTHER_LEAVES:
        raise CheckpointError(f"other leaves must be one of {OTHER_LEAVES}, got {other_leaves!r}.")
    meta = pretrained.metadata()
    prefix = find_params_path(meta, params_path, where=str(pretrained.path), empty=pretrained.empty_nodes())
    return Selection(prefix, other_leaves)
