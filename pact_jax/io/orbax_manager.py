"""``orbax.checkpoint.CheckpointManager`` roots: steps in, a new step out.

orbax keeps two concerns apart, and so does pact_jax: a *handler* writes one
item (a PyTree) into a directory (:mod:`pact_jax.io.orbax` reads and writes
those), a *manager* names directories by step below a root and keeps some of
them. This module is the manager side, on the file system as orbax 0.12 lays it
out (``CheckpointManager(root).save(step, args=...)``)::

    root/
      3/                       a step: '<step>', or '<prefix>_<step>' (step_prefix),
        _CHECKPOINT_METADATA   zero-padded with step_format_fixed_length
        default/               its item (StandardSave), or named items (Composite(params=...))
      5/ ...

* Reading: :func:`resolve` turns a root into one of its step directories (the
  latest, or the one asked for), which the orbax reader then opens like any
  checkpoint directory.
* Writing: :func:`output_step` names step ``N`` of a root (new or existing),
  mirroring the naming of the steps already there, and the :class:`Layout` of
  its item: the pre-trained step's item name (``default``, ``params``, ...),
  ``default`` for any other source, as ``CheckpointManager.save(N,
  args=StandardSave(...))`` writes it. The orbax writer stages the step next
  to the others and renames it into place; no other step is touched, and an
  existing step is replaced only with ``overwrite``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pact_jax.io.base import CheckpointError, CheckpointReader
from pact_jax.io.orbax import _CHECKPOINT_METADATA, _METADATA, STANDARD_HANDLER, Layout

#: The item name ``CheckpointManager.save(step, args=StandardSave(...))`` gives a lone item.
DEFAULT_ITEM = "default"
# orbax's standard step names: '<step>' or '<prefix>_<step>' (temporary directories carry a suffix).
_STEP_NAME = re.compile(r"^(?:(?P<prefix>.+)_)?(?P<step>\d+)$")


def _holds_item(d: Path) -> bool:
    """Whether ``d`` is a finished checkpoint directory: step metadata, or a PyTree item at or below it."""
    if (d / _CHECKPOINT_METADATA).is_file() or (d / _METADATA).is_file():
        return True
    return any((c / _METADATA).is_file() for c in d.iterdir() if c.is_dir())


def steps(root: Path) -> dict[int, Path]:
    """``{step: directory}`` of the finished steps below ``root``, in step order.

    A step is a sub-directory named as orbax names steps that holds a checkpoint (orbax's
    temporary ``*.orbax-checkpoint-tmp-*`` and pact_jax's ``*.pact-tmp-*`` names do not match).
    """
    root = Path(root)
    if not root.is_dir():
        return {}
    found: dict[int, Path] = {}
    for d in root.iterdir():
        m = _STEP_NAME.match(d.name)
        if m and d.is_dir() and _holds_item(d):
            found.setdefault(int(m["step"]), d)
    return dict(sorted(found.items()))


def is_manager_root(path: Path) -> bool:
    """Whether ``path`` is a ``CheckpointManager`` root: no item of its own, step directories below.

    A step directory (``root/5``, holding ``default/``) and a StandardCheckpointer directory
    are checkpoints, not roots; a directory whose items are all named like steps is a root.
    """
    path = Path(path)
    if not path.is_dir() or (path / _METADATA).is_file():
        return False
    found = steps(path)
    if not found:
        return False
    stepdirs = set(found.values())
    # An item whose name is not a step ('state', 'default', 'params') makes this a checkpoint.
    return not any(c not in stepdirs and c.is_dir() and (c / _METADATA).is_file() for c in path.iterdir())


def resolve(path: str | Path, step: int | None = None, *, strict: bool = True) -> Path:
    """The checkpoint directory to read for ``path``: ``path`` itself, or a root's step.

    Args:
      path: a checkpoint directory, or a ``CheckpointManager`` root.
      step: which step of a root (default: the latest).
      strict: a ``step`` for a ``path`` that is not a root is an error; else it is ignored
        (a merge applies ``step`` to those of its inputs that are roots).
    """
    path = Path(path)
    if not is_manager_root(path):
        if step is not None and strict:
            raise CheckpointError(
                f"{path}: step {step} was asked for, but this is a checkpoint directory, not a CheckpointManager "
                "root (a directory of numbered steps); pass the root, or drop the step."
            )
        return path
    found = steps(path)
    if step is None:
        return found[max(found)]
    if step not in found:
        raise CheckpointError(f"{path}: no step {step} in this CheckpointManager root; its steps are {list(found)}.")
    return found[step]


def _step_name(root: Path, step: int) -> str:
    """The directory name of ``step`` in ``root``, as the root's existing steps are named
    (their ``step_prefix`` and zero padding), else orbax's default: the number."""
    names = [d.name for d in steps(root).values()]
    if not names:
        return str(step)
    m = _STEP_NAME.match(names[-1])
    prefix = f"{m['prefix']}_" if m["prefix"] else ""
    digits = [_STEP_NAME.match(n)["step"] for n in names]
    width = len(digits[0]) if len(set(map(len, digits))) == 1 and any(d.startswith("0") for d in digits) else 0
    return f"{prefix}{step:0{width}d}"


def step_path(root: str | Path, step: int) -> Path:
    """Where step ``step`` of the ``CheckpointManager`` root ``root`` lies (or will)."""
    root = Path(root)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{root}: a step must be a non-negative integer, got {step!r}.")
    found = steps(root)
    return found[step] if step in found else root / _step_name(root, step)


def step_layout(source: CheckpointReader | None) -> Layout:
    """The item layout of a new step: the pre-trained step's item name and handler (``params``,
    ``default``, ...), else ``default`` with orbax's StandardCheckpointHandler."""
    src = getattr(source, "orbax_layout", None)
    if isinstance(src, Layout) and src.item is not None and not src.indicator:  # a manager step's named item
        return Layout(item=src.item, handler=src.handler, indicator=False)
    return Layout(item=DEFAULT_ITEM, handler=STANDARD_HANDLER, indicator=False)


def output_step(
    root: str | Path, step: int, *, source: CheckpointReader | None = None, overwrite: bool = False
) -> tuple[Path, Layout]:
    """The directory and item layout of step ``step`` to write into the root ``root``.

    ``root`` may not exist yet (it becomes a root with this one step), or be a root (or an empty
    or unrelated directory); it may not be a checkpoint itself. An existing step is refused
    unless ``overwrite``.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root}: is a file; an output step needs a CheckpointManager root directory.")
    if root.is_dir() and not is_manager_root(root) and _holds_item(root):
        raise CheckpointError(
            f"{root}: is an orbax checkpoint, not a CheckpointManager root; an output step goes into a root "
            "(a directory of numbered steps, or a new directory)."
        )
    dest = step_path(root, step)
    if dest.exists() and not overwrite:
        raise CheckpointError(
            f"{root}: step {step} already exists ({dest}); refusing to replace it (pass --overwrite, or "
            f"overwrite=True in Python). Steps there: {list(steps(root))}."
        )
    return dest, step_layout(source)
