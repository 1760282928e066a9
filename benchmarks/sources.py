"""The one error of a benchmark whose model or data is not installed.

Loaders (:mod:`benchmarks.dinov2`, :mod:`benchmarks.minilm`,
:mod:`benchmarks.image_tasks`, :mod:`benchmarks.text_real`) raise
:class:`MissingSource` with one sentence naming what to install; the suites'
``main`` print that sentence and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class MissingSource(RuntimeError):
    """A model or dataset a benchmark reads is not installed; the message says what to install."""


def or_exit(prog: str, fn: Callable[[], T]) -> T:
    """``fn()``; a :class:`MissingSource` ends the program with its one sentence and status 2."""
    try:
        return fn()
    except MissingSource as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
