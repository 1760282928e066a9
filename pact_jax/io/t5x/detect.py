"""Which T5X layout a path holds, and which step a model directory means.

Three step-directory layouts (see :mod:`pact_jax.io.t5x`) and two ways in:

* a step directory (or, legacy, its ``checkpoint`` msgpack file, or a bare
  T5X msgpack file of any name such as t5x's ``test_t5_tiny.checkpoint_0``;
  current orbax: also its ``state`` item directory);
* a model directory holding step directories ``checkpoint_<N>`` (or plain
  ``<N>``, as an orbax ``CheckpointManager`` without a prefix names them): the
  largest ``N`` in numeric order (``checkpoint_1000`` after
  ``checkpoint_999``), as ``t5x.checkpoints_utils.latest_step`` picks it;
  temporary directories (``checkpoint_5.tmp-<time>``, orbax's
  ``*.orbax-checkpoint-tmp-*``) are not steps.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import msgpack

from pact_jax.io.base import CheckpointError

MSGPACK_FILE = "checkpoint"  # legacy layout: the state-dict msgpack; old orbax: the aggregate file
STATE_ITEM = "state"  # orbax layout: t5x's CheckpointManager item name
TARGET = "target"
OLD_ORBAX_OPTIMIZER = "_optimizer"  # old orbax layout: FlaxOptimTrainState's field holding {target, state}
ORBAX_METADATA = "_METADATA"
STEP_METADATA = "_CHECKPOINT_METADATA"
ORBAX_INDICATOR = "orbax.checkpoint"  # written by orbax v1 saves, not by t5x
COMMIT_MARKER = "commit_success.txt"
LEGACY = "legacy"
ORBAX = "orbax"
ORBAX_AGGREGATE = "orbax-aggregate"
_STEP_NAME = re.compile(r"^(checkpoint_)?(\d+)$")


def _msgpack_kind_by_keys(file: Path) -> str | None:
    """The layout its top-level msgpack keys name; values are skipped (not decoded),
    and reading stops at the first telling key."""
    with open(file, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=64 * 1024 * 1024)
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key in ("optimizer", TARGET):  # version >= 1, version 0
                return LEGACY
            if key == OLD_ORBAX_OPTIMIZER:
                return ORBAX_AGGREGATE
            unpacker.skip()
    return None


def _msgpack_map_head(file: Path) -> bytes | None:
    """The file's first bytes if it starts like a msgpack map (not a TensorFlow index)."""
    with open(file, "rb") as f:
        head = f.read(21)
    if not head or head == b"model_checkpoint_path":  # empty, or a TensorFlow (T5 / Mesh TF) index
        return None
    if not (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return None
    return head


def msgpack_kind(file: Path) -> str | None:
    """``legacy`` / ``orbax-aggregate`` for a T5X msgpack file, else ``None``."""
    if not file.is_file() or _msgpack_map_head(file) is None:
        return None
    try:
        return _msgpack_kind_by_keys(file)
    except Exception:  # a damaged msgpack map: let the reader say what is wrong
        return LEGACY if file.name == MSGPACK_FILE else None


def orbax_top_keys(item: Path) -> set[str]:
    """Top-level keys of an orbax PyTree item, from its ``_METADATA`` JSON."""
    meta = json.loads((item / ORBAX_METADATA).read_text())
    keys = set()
    for k, v in meta.get("tree_metadata", {}).items():
        km = v.get("key_metadata") if isinstance(v, dict) else None
        if km:
            keys.add(km[0].get("key"))
        elif k.startswith("("):
            keys.add(ast.literal_eval(k)[0])
    return keys


def orbax_item(path: Path) -> Path | None:
    """The orbax ``state`` item of a T5X step directory (or ``path`` if it is that item)."""
    for item in (path / STATE_ITEM, path):
        if (item / ORBAX_METADATA).is_file():
            try:
                return item if TARGET in orbax_top_keys(item) else None
            except Exception:  # unreadable metadata: not recognisably T5X
                return None
    return None


def step_layout(path: Path) -> str | None:
    """The layout of a step directory or T5X msgpack file; ``None`` if neither."""
    if path.is_file():
        return msgpack_kind(path)
    if not path.is_dir():
        return None
    if not (path / ORBAX_METADATA).exists():  # orbax's aggregate file is also named 'checkpoint'
        kind = msgpack_kind(path / MSGPACK_FILE)
        if kind is not None:
            return kind
    if orbax_item(path) is not None:
        return ORBAX
    return None


def step_dirs(model_dir: Path) -> list[tuple[int, Path]]:
    """``(N, dir)`` of the ``checkpoint_<N>`` / ``<N>`` subdirectories, by ``N``."""
    found = []
    for entry in model_dir.iterdir():
        m = _STEP_NAME.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(2)), m.group(1) is not None, entry))
    return [(n, d) for n, _, d in sorted(found)]  # a tie: checkpoint_<N> after <N>, so it is latest


def resolve(path: Path) -> tuple[Path, str] | None:
    """``(step path, layout)`` of a step / file / model directory; ``None`` if not T5X."""
    if path.is_file() and path.name == MSGPACK_FILE and step_layout(path.parent) is not None:
        path = path.parent  # the step directory's msgpack names the step
    layout = step_layout(path)
    if layout is not None:
        return path, layout
    if path.is_dir():
        steps = step_dirs(path)
        if steps:
            latest = steps[-1][1]
            layout = step_layout(latest)
            if layout is not None:
                return latest, layout
    return None


def resolve_or_raise(path: Path) -> tuple[Path, str]:
    """As :func:`resolve`, with an error saying what was looked for."""
    try:
        found = resolve(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e}).") from e
    if found is not None:
        return found
    what = (
        f"no T5X '{MSGPACK_FILE}' msgpack file, no orbax '{STATE_ITEM}/' item holding a '{TARGET}' tree"
    )
    if path.is_dir():
        steps = step_dirs(path)
        if steps:
            raise CheckpointError(
                f"{path}: a model directory whose latest step {steps[-1][1].name} is not a T5X checkpoint "
                f"({what}); steps found: {[d.name for _, d in steps][-5:]}."
            )
        raise CheckpointError(
            f"{path}: not a T5X checkpoint directory ({what}), and no checkpoint_<N> step directories in it."
        )
    raise CheckpointError(f"{path}: not a T5X checkpoint ({what}).")


def detect(path: str | os.PathLike) -> bool:
    """True for a T5X step directory in any layout, its msgpack file, or a model
    directory whose latest step is one (never raises)."""
    try:
        return resolve(Path(path)) is not None
    except OSError:
        return False
