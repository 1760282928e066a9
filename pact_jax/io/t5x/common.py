"""The T5X reader and writer facades, and what their layouts share.

``Reader(path)`` and ``Writer(path, template, source=...)`` return the class of
the layout found (:mod:`pact_jax.io.t5x.detect`): the msgpack layouts
(:mod:`pact_jax.io.t5x.legacy`: legacy T5X and old orbax-based T5X) or the
current orbax layout (:mod:`pact_jax.io.t5x.orbax_layout`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pact_jax.io.base import (
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    check_key_names,
    staging_path,
    unflatten,
)
from pact_jax.io.t5x.detect import LEGACY, ORBAX, ORBAX_AGGREGATE, TARGET, resolve_or_raise


def _layout_classes(layout: str) -> tuple[type, type]:
    """``(reader class, writer class)`` of a layout (imported late: they subclass these facades)."""
    if layout in (LEGACY, ORBAX_AGGREGATE):
        from pact_jax.io.t5x import legacy

        return legacy.MsgpackReader, legacy.MsgpackWriter
    if layout == ORBAX:
        from pact_jax.io.t5x import orbax_layout

        return orbax_layout.OrbaxReader, orbax_layout.OrbaxWriter
    raise CheckpointError(f"unknown T5X layout {layout!r}")


class Reader(CheckpointReader):
    """Lazy reader of a T5X checkpoint's ``target`` parameters (any layout).

    ``Reader(path)`` returns the reader of the layout found at ``path``: a step
    directory, a legacy msgpack file, the ``state`` item of an orbax step, or a
    model directory (its latest ``checkpoint_<N>``, see
    :mod:`pact_jax.io.t5x.detect`). ``path`` is then the step read. Attribute
    ``layout`` is ``"legacy"``, ``"orbax-aggregate"`` or ``"orbax"``.
    ``read(paths, shardings=None)`` returns host NumPy arrays, or
    ``jax.Array`` placed with ``shardings[path]`` (orbax: restored straight
    into that sharding).
    """

    format = "t5x"
    layout = ""

    def __new__(cls, path: str | os.PathLike):
        if cls is Reader:
            _, layout = resolve_or_raise(Path(path))
            cls = _layout_classes(layout)[0]
        return super().__new__(cls)


class Writer(CheckpointWriter):
    """Writes merged ``target`` params into a copy of ``source``'s T5X checkpoint.

    Args:
      path: the new step directory (conventionally ``.../checkpoint_<step>``);
        a file if ``source`` is a bare msgpack file.
      template: ``{path: ShapeDtypeStruct}`` of the merged params; must have
        exactly the leaves and shapes of ``source``'s ``target`` (dtypes may
        differ).
      source: the :class:`Reader` (or path) of the T5X checkpoint whose layout
        and non-target state to copy.
    """

    format = "t5x"
    layout = ""
    # The orbax layout saves through orbax, whose saves are collective over
    # every process: not from process 0 alone. Merged groups arrive as host
    # values (a sharded merge gathers them).
    runs_on_one_process = False

    def __new__(cls, path, template, *, source=None):
        if cls is Writer:
            if source is None:
                raise CheckpointError(
                    f"{path}: writing a T5X checkpoint needs source= (the Reader of a T5X checkpoint, "
                    "usually the pre-trained one) to copy its layout and optimizer state from."
                )
            if not isinstance(source, Reader):
                if isinstance(source, CheckpointReader):
                    raise CheckpointError(
                        f"{path}: source= must be a T5X checkpoint, got a {source.format!r} one ({source.path})."
                    )
                source = Reader(source)
            cls = _layout_classes(source.layout)[1]
        return super().__new__(cls)

    def __init__(self, path, template, *, source=None):
        super().__init__(path, template)
        if not isinstance(source, Reader):
            source = Reader(source)
        self.source = source
        check_key_names(unflatten(self.template), str(self.path))
        src = source.metadata()
        missing = [p for p in src if p not in self.template]
        extra = [p for p in self.template if p not in src]
        if missing or extra:
            what = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}', which the source has not"
            raise CheckpointError(
                f"{self.path}: the leaves to write must be those of the source's '{TARGET}' "
                f"({source.path}); the template {what}."
            )
        for p, want in self.template.items():
            if tuple(want.shape) != tuple(src[p].shape):
                raise CheckpointError(
                    f"{self.path}: leaf '{p}' is {tuple(want.shape)} in the template, "
                    f"{tuple(src[p].shape)} in the source {source.path}."
                )
        self._staged = staging_path(self.path.absolute())

    def _commit(self) -> None:
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> None:
        raise NotImplementedError


def copy_except(src: Path, dst: Path, exclude: set[Path]) -> None:
    """Copies ``src``'s entries into ``dst``, leaving out ``exclude`` (absolute paths).

    Contents only, not permission bits: a read-only input gives a writable
    output (which ``--overwrite`` can later replace).
    """
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        a = entry.absolute()
        if a in exclude:
            continue
        target = dst / entry.name
        taken = target.exists() or target.is_symlink()  # written by the writer itself
        if entry.is_dir() and not entry.is_symlink():
            if not taken or any(a in e.parents for e in exclude):
                copy_except(entry, target, exclude)
        elif taken:
            continue
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        else:
            shutil.copyfile(entry, target)


def to_host(a: Any) -> np.ndarray:
    return np.asarray(jax.device_get(a)) if isinstance(a, jax.Array) else np.asarray(a)


def marker(file: Path, dest: Path) -> None:
    """orbax's commit marker, naming the final directory."""
    file.write_text(f"Checkpoint commit was successful to {dest}")
