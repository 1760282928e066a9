"""How ``pact-jax`` meets signals and failures: SIGINT / SIGTERM raised where the program is (and raised
again between groups when Python dropped them), the output's leftovers removed on an interrupt, and a
failure's message kept to one line (orbax's relayed thread traceback, TensorStore's spec)."""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import sys
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds (and cleans up) as on Ctrl-C."""


# Signals received by the console script's handlers (entry_point). A handler raises where the program
# is, but Python drops an exception raised inside a gc callback ("Exception ignored in: <function
# _xla_gc_callback>"), and the merge then ran on to exit 0 (2 of 16 signals, benchmarks/faults.py):
# the loop over groups raises it again (_checked_groups).
_RECEIVED: list[int] = []


def _raise_terminated(signum: int, frame: Any) -> None:
    _RECEIVED.append(signum)
    raise Terminated()


def _raise_interrupted(signum: int, frame: Any) -> None:
    _RECEIVED.append(signum)
    raise KeyboardInterrupt()


def _quiet_unraisable(unraisable: Any) -> None:
    """``sys.unraisablehook``: the exception of a signal dropped in a gc callback is raised again between
    groups; its traceback ("Exception ignored in: <function _xla_gc_callback>") would precede the
    one-line message."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _RECEIVED:
        return
    sys.__unraisablehook__(unraisable)


def _raise_received() -> None:
    if _RECEIVED:
        raise Terminated() if _RECEIVED[-1] == signal.SIGTERM else KeyboardInterrupt()


def _checked_groups(progress: bool):
    """``progress=`` for the merge: its progress bar (if ``progress``), raising between groups a signal
    whose exception was dropped where it was raised."""
    from pact_jax.io import streaming

    def iterate(groups):
        for group in streaming._progress(progress, groups):
            _raise_received()
            yield group
        _raise_received()

    return iterate


class _RelayedThreadError(logging.Filter):
    """Drops orbax's log of an exception in its background save thread (a traceback, e.g. 30 lines
    on a full disk): orbax raises it again in the caller, where it becomes one line naming the file.
    Kept with --traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in str(record.msg)


# TensorStore appends its whole JSON spec (~1 KB) to its errors, after the file and the reason.
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec='.*?'\]", re.DOTALL)


def _message(e: BaseException) -> str:
    """``str(e)`` without TensorStore's spec (``--traceback`` shows the exception as raised)."""
    return _TENSORSTORE_SPEC.sub("", str(e))


def _removing_own_on_interrupt(merge_on_disk):
    """``merge_on_disk``, removing on Ctrl-C / SIGTERM what this process left at the output (its lock and
    staging copies: the writer's with-block removes them, unless the interrupt came between taking the
    lock and handing it to the writer; pact_jax.io.owner.remove_own). An interrupt after the output was
    renamed into place carries its path as ``written``, for the message."""

    def inode(path) -> int | None:
        try:
            return os.stat(path).st_ino
        except OSError:
            return None

    @functools.wraps(merge_on_disk)
    def run(pretrained, finetuned, output, *args, **kwargs):
        before = inode(output)
        try:
            return merge_on_disk(pretrained, finetuned, output, *args, **kwargs)
        except KeyboardInterrupt as e:
            from pact_jax.io import owner

            owner.remove_own(output)
            if inode(output) not in (None, before):  # published (a new inode) before the signal came
                e.written = output
            raise

    return run
