"""Merging checkpoints on disk, group of leaves by group of leaves.

:func:`merge_checkpoints` never holds the whole model: it plans groups of
leaves (whole shape buckets, split or packed to fit ``budget_bytes``), and for
each group reads those leaves from the pre-trained and the ``T`` fine-tuned
checkpoints, runs the chained merge on that sub-tree, and hands the merged
leaves to the checkpoint writer. Every merger and transform in pact_jax works
leaf by leaf and draws randomness per leaf path (:func:`pact_jax.tree.leaf_key`),
so the result equals merging the whole model in memory.

Memory: a group of ``n`` float elements per task costs about
``WORKING_SET_FACTOR * T * n * 4`` bytes while it is merged (the fine-tuned
leaves as read, the float32 task vectors, the transform's output, the SVD
workspace). Groups are sized so this estimate stays within ``budget_bytes``;
a single leaf larger than the budget is merged alone and reported. The factor
was measured with ``python -m benchmarks.streaming`` (benchmarks/RESULTS.md),
which also measures the bound: once the runtime is warm (programs compiled
for the group shapes), peak RSS of a merge of orbax checkpoints stays within
the budget + 2 to 12 MiB for models 1x, 4x and 8x the budget (T = 8, 256 to
2048 leaves; three runs), given :func:`limit_malloc_retention` (on by default). What
keeps it flat: opening orbax inputs reads no array
(:func:`pact_jax.io.orbax.read_array_metadata`); leaves are read and written
through orbax's type handlers with no OCDBT cache
(:func:`pact_jax.io.orbax.ts_context`); the output is one orbax item, not one
partial save per group.

Over a device mesh (``mesh=``, the CLI's ``--mesh``; several hosts with
``jax.distributed``, the CLI's ``--distributed``) each group is restored
straight into its target shardings (orbax inputs), merged by
:func:`pact_jax.sharding.shard_merge` and written from the sharded arrays
(orbax output), so no host holds a whole group, let alone the model; see
docs/sharding.md for the formats that need host copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import os
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from pact_jax import sharding
from pact_jax.buckets import WORKING_SET_FACTOR, plan_groups, working_set_bytes  # noqa: F401 (re-exported)
from pact_jax.io import FORMATS, SUFFIXES, detect_format, open_reader, open_writer, orbax_manager, subtree
from pact_jax.io.base import (
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    flatten,
    human_bytes,
    is_primary_process,
    sync_processes,
    unflatten,
)
from pact_jax.tree import PactInputError, check_finite

# glibc's malloc: blocks from this size up are mmap-ed and unmapped when freed.
MMAP_THRESHOLD_BYTES = 128 << 10
_M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>


def limit_malloc_retention(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Makes glibc's malloc give freed large blocks back to the system.

    By default glibc raises its mmap threshold to the size of each large block
    freed (up to 32 MiB), after which blocks of that size come from its heaps
    (one per thread, and XLA and tensorstore run many threads), and freed
    memory stays in them. A streamed merge frees a group's buffers after every
    group, in sizes that vary from group to group, so RSS crept up group after
    group (benchmarks/RESULTS.md: +114 MiB over 43 groups with a 32 MiB
    budget, though no array outlived its group). ``mallopt(M_MMAP_THRESHOLD,
    threshold_bytes)`` fixes the threshold: blocks of ``threshold_bytes`` and
    more are mmap-ed and returned on ``free``. The setting is process-wide;
    the environment variable ``MALLOC_MMAP_THRESHOLD_`` does the same.

    Returns:
      ``True`` if set; ``False`` where the C library is not glibc (macOS,
      musl: nothing done).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """What :func:`merge_checkpoints` did."""

    output: Path
    num_tasks: int
    num_leaves: int
    num_params: int
    num_groups: int
    largest_group_bytes: int
    budget_bytes: int | None
    over_budget: tuple[str, ...]
    copied: tuple[str, ...]
    seconds: float
    peak_rss_bytes: int
    #: What became of a train state's leaves outside its params (io.subtree); '' for a plain model.
    train_state: str = ""
    #: Files of the pre-trained model copied beside the weights (config, tokenizer: io.safetensors).
    model_files: tuple[str, ...] = ()

    def summary(self) -> str:
        lines = [
            f"merged {self.num_tasks} task(s): {self.num_leaves} leaves, {self.num_params:,} parameters "
            f"in {self.num_groups} group(s) -> {self.output}",
            f"time {self.seconds:.1f} s, peak RSS {human_bytes(self.peak_rss_bytes)}, largest group "
            f"working set ~{human_bytes(self.largest_group_bytes)}"
            + (f" (budget {human_bytes(self.budget_bytes)})" if self.budget_bytes else ""),
        ]
        if self.over_budget:
            lines.append(f"leaves larger than the budget, merged alone: {list(self.over_budget)}")
        if self.copied:
            lines.append(f"non-float leaves copied from the pre-trained checkpoint: {list(self.copied)}")
        if self.train_state:
            lines.append(f"train state: {self.train_state}")
        if self.model_files:
            lines.append(f"files of the pre-trained model copied beside the weights: {list(self.model_files)}")
        return "\n".join(lines)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------
# Validation and planning


def check_compatible(pretrained: CheckpointReader, finetuned: Sequence[CheckpointReader]) -> None:
    """Same leaves, shapes and dtypes in every checkpoint, from metadata alone."""
    if not finetuned:
        raise PactInputError("no fine-tuned checkpoints given: pass at least one.")
    ref = pretrained.metadata()
    if not ref:
        raise CheckpointError(f"{pretrained.path}: the checkpoint holds no parameters.")
    for reader in finetuned:
        meta = reader.metadata()
        missing = [p for p in ref if p not in meta]
        extra = [p for p in meta if p not in ref]
        if missing or extra:
            detail = []
            if missing:
                detail.append(f"missing leaves {missing[:5]}")
            if extra:
                detail.append(f"unexpected leaves {extra[:5]}")
            raise CheckpointError(
                f"{reader.path}: not the architecture of the pre-trained checkpoint "
                f"{pretrained.path}: " + "; ".join(detail)
            )
        for p, want in ref.items():
            got = meta[p]
            if tuple(got.shape) != tuple(want.shape):
                raise CheckpointError(f"{reader.path}: leaf '{p}' has shape {got.shape}, pre-trained has {want.shape}.")
            if np.dtype(got.dtype) != np.dtype(want.dtype):
                raise CheckpointError(
                    f"{reader.path}: leaf '{p}' has dtype {got.dtype}, pre-trained has {want.dtype}; "
                    "cast the checkpoints to one dtype before merging."
                )


def _check_not_inside(output: Path, inputs: Sequence[Path], beside_ok: bool = False) -> None:
    """``beside_ok``: ``output`` is a new step of a CheckpointManager root, which may be an input
    (read as another of its steps): checked again against the step directories read."""
    out = output.resolve()
    for src in inputs:
        s = src.resolve()
        if out == s or out in s.parents or (s in out.parents and not (beside_ok and s == out.parent)):
            raise CheckpointError(
                f"refusing to write the output {output} into or over the input checkpoint {src}; "
                "choose an output path outside every input."
            )


# --------------------------------------------------------------------------
# The merge


def merge_checkpoints(
    pretrained: str | os.PathLike,
    finetuned: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    merge: Callable[..., Any],
    *,
    key: jax.Array | None = None,
    alpha: float | None = None,
    budget_bytes: int | None = None,
    input_format: str | None = None,
    output_format: str | None = None,
    overwrite: bool = False,
    progress: bool | Callable[[Sequence[Any]], Any] = False,
    output_dtype: Any = None,
    mesh: Mesh | None = None,
    limit_malloc: bool = True,
    step: int | None = None,
    output_step: int | None = None,
    params_path: str | None = None,
    other_leaves: str = "copy",
) -> MergeReport:
    """Merges checkpoints on disk into a new checkpoint at ``output``.

    Args:
      pretrained: path of the pre-trained checkpoint ``W0``.
      finetuned: paths of the ``T`` fine-tuned checkpoints.
      output: destination; must not exist (unless ``overwrite``) and must not
        be inside, or contain, an input.
      merge: ``merge(pretrained, finetuned, *, key, alpha) -> params`` over
        pytrees, as :func:`pact_jax.chain` returns; called once per group.
      key: PRNG key for randomized steps (DARE, randomized SVD).
      alpha: scaling of the merged delta; default: the chain's ``alpha``.
      budget_bytes: memory budget of one group's working set; ``None`` merges
        all leaves in one group.
      input_format / output_format: override format detection; the output
        format defaults to the one its suffix names (``.msgpack``,
        ``.safetensors``), else the pre-trained checkpoint's.
      overwrite: replace an existing ``output`` (atomically, on success).
      output_dtype: write every floating leaf in this dtype (e.g.
        ``'bfloat16'``; mergekit's ``dtype`` / ``out_dtype``); ``None``: each
        leaf in the pre-trained checkpoint's dtype.
      progress: ``True`` for a tqdm bar over groups, or a wrapper
        ``f(iterable) -> iterable``.
      mesh: merge each group with :func:`pact_jax.sharding.shard_merge` over
        this device mesh. Inputs whose reader has ``reads_sharded`` (orbax,
        T5X orbax layout) are restored straight into the
        :func:`~pact_jax.sharding.param_shardings` layout (each process
        reading only its devices' shards); others are read on the host and
        placed. Merged leaves stay sharded ``jax.Array`` s for a writer with
        ``writes_global_arrays`` (orbax); for other formats each group is
        gathered to the host. Required in a multi-process run
        (``jax.distributed``), where every process calls this function with
        the same arguments; see docs/sharding.md.
      limit_malloc: call :func:`limit_malloc_retention` first (glibc; a
        process-wide setting), without which RSS creeps up with the number
        of groups although nothing outlives its group.
      step: for inputs that are orbax ``CheckpointManager`` roots, the step to read (default:
        each root's latest; docs/orbax.md).
      output_step: write the merged model as step ``output_step`` of the ``CheckpointManager``
        root ``output`` (new or existing; other steps untouched; an existing step needs
        ``overwrite``).
      params_path: the subtree that is the model (:mod:`pact_jax.io.subtree`): ``None`` detects
        a train state's ``params`` (beside an ``opt_state``), ``''`` merges every leaf.
      other_leaves: ``'copy'`` the leaves outside ``params_path`` (optimizer state, step) from
        the pre-trained checkpoint into the output, or ``'drop'`` them.

    Returns:
      A :class:`MergeReport`. Nothing is written at ``output`` unless the
      whole merge succeeds.
    """
    from pact_jax.io import lora_merge

    if lora_merge.check_inputs(finetuned):  # PEFT LoRA adapter folders: merged into their base (docs/lora.md)
        return lora_merge.merge_adapters(
            pretrained, finetuned, output, merge, key=key, alpha=alpha, budget_bytes=budget_bytes,
            input_format=input_format, output_format=output_format, overwrite=overwrite, progress=progress,
            limit_malloc=limit_malloc, mesh=mesh, step=step, output_step=output_step, output_dtype=output_dtype,
            params_path=params_path, other_leaves=other_leaves,
        )  # fmt: skip
    start = time.perf_counter()
    if limit_malloc:
        limit_malloc_retention()
    pre_path = Path(pretrained)
    ft_paths = [Path(p) for p in finetuned]
    out_path = Path(output)
    if output_step is not None:  # the step's directory in the root, which the checks below are about
        out_path = orbax_manager.step_path(out_path, output_step)
    _check_not_inside(out_path, [pre_path, *ft_paths], output_step is not None)
    if step is not None and not any(orbax_manager.is_manager_root(p) for p in (pre_path, *ft_paths)):
        raise CheckpointError(f"step {step} was asked for, but no input is an orbax CheckpointManager root.")
    pre_full = open_reader(pre_path, input_format, step=_step_of(pre_path, step))
    fts_full = [open_reader(p, input_format, step=_step_of(p, step)) for p in ft_paths]
    _check_not_inside(out_path, [r.path for r in (pre_full, *fts_full)])
    # A train state: the merge sees its params subtree only (io.subtree).
    selection = subtree.select(pre_full, params_path, other_leaves)
    pre, fts = selection.view(pre_full), [selection.view(r) for r in fts_full]
    check_compatible(pre, fts)
    meta = pre.metadata()
    groups = plan_groups(meta, len(fts), budget_bytes)
    grouped = {p for g in groups for p in g}
    copied = [p for p in meta if p not in grouped]
    over = [g[0] for g in groups if len(g) == 1 and budget_bytes and working_set_bytes(meta, g, len(fts)) > budget_bytes]
    alpha_kwarg = {} if alpha is None else {"alpha": alpha}

    fmt = output_format or (detect_format(out_path) if out_path.suffix in SUFFIXES else pre.format)
    if output_step is not None and output_format is None:
        fmt = "orbax"  # a CheckpointManager step, whatever the inputs
    writes_global = _writer_class(fmt).writes_global_arrays
    _check_processes(mesh, fmt)
    # A writer without writes_global_arrays runs on process 0 alone in a multi-process run.
    out_meta = _with_float_dtype(meta, output_dtype)
    if writes_global or is_primary_process():
        # The merged leaves under their full paths, plus a train state's other leaves (io.subtree).
        template = {**selection.output_template(pre_full), **selection.full_paths(out_meta)}
        dest = Path(output) if output_step is not None else out_path
        writer = open_writer(dest, template, fmt, source=selection.output_source(pre_full), overwrite=overwrite,
                             output_step=output_step)  # fmt: skip
    else:
        writer = None
    out = None if writer is None else selection.writer_view(writer)  # takes leaves named as the merge names them
    iterate = _progress(progress, groups) if is_primary_process() else groups
    with writer if writer is not None else contextlib.nullcontext():
        if writer is not None:
            selection.copy_others(pre_full, writer, budget_bytes)
        if copied and out is not None:
            out.write(pre.read(copied))
        for group in iterate:
            targets = None if mesh is None else sharding.param_shardings({p: meta[p] for p in group}, mesh)
            w0 = _read(pre, group, targets)
            tasks = [unflatten(_read(reader, group, targets)) for reader in fts]
            merged = flatten(_group_merge(merge, mesh)(unflatten(w0), tasks, key=key, **alpha_kwarg))
            if output_dtype is not None:
                merged = {p: a.astype(out_meta[p].dtype) for p, a in merged.items()}
            del w0, tasks
            if not (writes_global and mesh is not None):
                merged = _to_host(merged)
            if out is not None:
                out.write(merged)
            del merged
        if writer is not None:
            writer.commit()
    sync_processes(f"merged into {out_path}")
    for r in (pre_full, *fts_full):
        r.close()
    return MergeReport(
        output=out_path,
        num_tasks=len(fts),
        num_leaves=len(meta),
        num_params=int(sum(np.prod(s.shape) for s in meta.values())),
        num_groups=len(groups),
        largest_group_bytes=max((working_set_bytes(meta, g, len(fts)) for g in groups), default=0),
        budget_bytes=budget_bytes,
        over_budget=tuple(over),
        copied=tuple(copied),
        seconds=time.perf_counter() - start,
        peak_rss_bytes=peak_rss_bytes(),
        train_state=selection.describe(pre_full),
        model_files=tuple(getattr(writer, "copied_files", ())),
    )


def _with_float_dtype(meta: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """``meta`` with every floating leaf's dtype replaced by ``dtype`` (``None``: ``meta``)."""
    if dtype is None:
        return meta
    dtype = jax.numpy.dtype(dtype)
    return {p: jax.ShapeDtypeStruct(s.shape, dtype) if jax.numpy.issubdtype(s.dtype, jax.numpy.floating) else s
            for p, s in meta.items()}  # fmt: skip


def _step_of(path: Path, step: int | None) -> int | None:
    """``step`` for an input that is a CheckpointManager root; checkpoints are read as they are."""
    return step if step is not None and orbax_manager.is_manager_root(path) else None


def _writer_class(fmt: str) -> type[CheckpointWriter]:
    """The writer class of ``fmt`` (read for its capabilities before any writer is opened)."""
    import pact_jax.io

    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}.")
    return getattr(pact_jax.io, fmt).Writer


def _check_processes(mesh: Mesh | None, fmt: str) -> None:
    """A multi-process run needs a global mesh and an output format it can write."""
    if jax.process_count() == 1:
        return
    if mesh is None:
        raise ValueError(
            f"this is process {jax.process_index()} of {jax.process_count()} (jax.distributed): pass mesh= "
            "(e.g. pact_jax.sharding.make_mesh()), so that the processes share the merge instead of repeating it."
        )
    w = _writer_class(fmt)
    if not w.writes_global_arrays and not w.runs_on_one_process:
        raise CheckpointError(
            f"the {fmt!r} output format cannot be written by a multi-process run (its writer needs every "
            "process but takes host values); write orbax, msgpack or safetensors output instead."
        )


def _group_merge(merge: Callable[..., Any], mesh: Mesh | None) -> Callable[..., Any]:
    """``merge``, or a fresh :func:`~pact_jax.sharding.shard_merge` of it for one group.

    A sharded merge is one ``jax.jit`` program per group (its tree, named by
    leaf paths, differs from every other group's); a fresh wrapper per group
    lets JAX free each group's trace and executable with it instead of
    caching all of them until the merge ends.
    """
    if mesh is None:
        return merge
    return sharding.shard_merge(merge, mesh, check_inputs=False)  # inputs were checked when read, naming the file


def _read(reader: CheckpointReader, paths: Sequence[str], targets: Mapping[str, Any] | None) -> dict[str, Any]:
    """``paths`` from ``reader``, restored into ``targets`` shardings where the reader can; NaN/Inf checked."""
    if targets is not None and reader.reads_sharded:
        leaves = reader.read(paths, shardings=targets)  # type: ignore[call-arg]
    else:
        leaves = reader.read(paths)
    check_finite(leaves, str(reader.path))
    return leaves


def _to_host(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Host NumPy copies of one group; sharded over several processes: gathered to every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        arrays = multihost_utils.process_allgather(dict(arrays), tiled=True)
    return {p: np.asarray(a) for p, a in arrays.items()}


def _progress(progress, groups):
    """``groups``, counted by a progress bar of leaves (a one-group model is not 0 % then 100 %); tqdm
    draws it only when stderr is a terminal (``disable=None``). A callable ``progress`` wraps them instead."""
    if callable(progress):
        return progress(groups)
    if not progress:
        return groups
    from tqdm.auto import tqdm

    def counted():
        with tqdm(total=sum(len(g) for g in groups), desc="merging", unit="leaf", disable=None) as bar:
            for group in groups:
                yield group
                bar.update(len(group))

    return counted()
