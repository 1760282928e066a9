"""T5X checkpoints (google-research/t5x), read and written.

A T5X checkpoint is a step directory ``<model_dir>/checkpoint_<step>/`` holding
the whole train state: ``target`` (the model parameters) and the optimizer's
``step`` and ``param_states``. pact_jax merges the ``target`` parameters only;
its leaf paths are the ``/``-joined key paths *below* ``target``
(``encoder/layers_0/attention/query/kernel``). Three on-disk layouts exist, all
read and written back in their own layout (``Reader.layout``):

* ``"legacy"`` (``t5x.checkpoints.Checkpointer``): a ``checkpoint`` flax
  msgpack of ``{"version": 3, "optimizer": {"target", "state"}}`` with small
  arrays inline and the others as TensorStore (zarr) array directories named
  ``target.encoder.layers_0...`` / ``state.param_states...``, referenced by
  their spec; also a bare msgpack file (t5x's ``test_t5_tiny.checkpoint_0``),
  written back as a file. :mod:`pact_jax.io.t5x.legacy`.
* ``"orbax-aggregate"`` (older orbax-based T5X): an orbax aggregate
  ``checkpoint`` msgpack of the train state's fields (``_optimizer`` with
  ``target`` and ``state``, ``flax_mutables``, ``params_axes``) whose array
  leaves are ``PLACEHOLDER://<name>`` references to zarr directories beside
  it, and no ``_METADATA``. Same module.
* ``"orbax"`` (``t5x.checkpoints.OrbaxCheckpointManagerInterface``): the item
  ``state/`` of an orbax ``CheckpointManager`` step (OCDBT or per-array
  directories), maybe with a ``dataset/`` item beside it, which is copied.
  :mod:`pact_jax.io.t5x.orbax_layout`.

Any of them may be given as a model directory: its latest step, the
``checkpoint_<N>`` (or ``<N>``) with the largest ``N`` in numeric order, is
read, as t5x's ``latest_step`` picks it; a directory with no such step is an
error saying so (:mod:`pact_jax.io.t5x.detect`).

Writing needs ``source=``: the :class:`Reader` of the checkpoint whose layout
to copy (the pre-trained one). The merged parameters replace ``target``; the
rest of the source (``step``, ``param_states``, the dataset iterator, other
files) is copied unchanged, and the result is published with one rename
(staged next to the destination until :meth:`Writer.commit`).
"""

from __future__ import annotations

from pact_jax.io.t5x.common import Reader, Writer
from pact_jax.io.t5x.detect import (
    COMMIT_MARKER,
    LEGACY,
    MSGPACK_FILE,
    ORBAX,
    ORBAX_AGGREGATE,
    ORBAX_INDICATOR,
    ORBAX_METADATA,
    STATE_ITEM,
    STEP_METADATA,
    TARGET,
    detect,
    resolve,
    step_dirs,
)
from pact_jax.io.t5x import legacy, orbax_layout  # noqa: E402,F401 (the layouts, imported after the facades)

__all__ = [
    "COMMIT_MARKER",
    "LEGACY",
    "MSGPACK_FILE",
    "ORBAX",
    "ORBAX_AGGREGATE",
    "ORBAX_INDICATOR",
    "ORBAX_METADATA",
    "STATE_ITEM",
    "STEP_METADATA",
    "TARGET",
    "Reader",
    "Writer",
    "detect",
    "resolve",
    "step_dirs",
]
