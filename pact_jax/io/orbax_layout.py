"""Where an orbax checkpoint directory keeps its PyTree item: :class:`Layout`.

A checkpoint is the item itself (``StandardCheckpointer().save(path, tree)``:
``_METADATA`` at the top), or holds it under a name: ``state`` (an orbax v1
save), ``default`` or ``params`` (a ``CheckpointManager`` step).
:func:`item_directory` finds the item, :func:`read_layout` says how the
directory holds it (the item's name, the handler ``_CHECKPOINT_METADATA``
records, orbax v1's indicator file). The orbax writer
(:class:`pact_jax.io.orbax.Writer`) mirrors the layout of its source, so the
merged checkpoint restores with the call that restored the input
(docs/orbax.md); :mod:`pact_jax.io.orbax_manager` picks a step's layout.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from pact_jax.io.base import CheckpointError
from pact_jax.io.orbax_metadata import _METADATA

# The PyTree item of an orbax v1 save, and its checkpoint-level files.
ITEM = "state"
_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
_INDICATOR = "orbax.checkpoint"
# What orbax v1 records as the handler of a PyTree item (checked against orbax's own save in the tests;
# an orbax that names it otherwise still loads the checkpoint, with a warning).
_PYTREE_HANDLER = "orbax.checkpoint.experimental.v1._src.handlers.pytree_handler.PyTreeHandler"
# What StandardCheckpointer and CheckpointManager(...).save(step, args=StandardSave(...)) record.
STANDARD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


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
