"""Merging PEFT LoRA adapters into their base checkpoint on disk, group of leaves by group (issue 16).

:func:`merge_adapters` is :func:`pact_jax.io.streaming.merge_checkpoints` for
adapter inputs (which calls it when every ``finetuned`` path is an adapter
folder). Only the leaves some adapter touches are merged; the others are
copied from the base (a leaf no adapter touches has zero task vectors, which
every merger maps to a zero delta). For each group of touched leaves (within
``budget_bytes``) it reads ``W0`` once, builds the group's task vectors
straight from the factors (``s_t B_t A_t``, zero for a task without an
adapter there; ``saved - W0`` for full tensors), never a fine-tuned
checkpoint ``W0 + s B A`` (whose rounding to a bf16 base would lose the
update), and calls ``merge.delta_from_stacked`` (:func:`pact_jax.chain`)
with ``task_spaces``: PACT's LoRA variant (DESIGN §1a step 9), each task's
explicit space the row space of its ``A`` on the side PACT protects
(``rules.input_side``; where the leaf rules' layout makes that side the
output side, the column space of ``B``). A merge that is a lone Task
Arithmetic, averaging or exact TSV-M takes the LoRA leaves from their
factors instead (:func:`pact_jax.lora.task_arithmetic`,
:func:`pact_jax.lora.tsv`: no dense stack, no SVD of a dense update).

Output: the merged full model ``W0 + alpha * delta`` in the base's format
and layout; or, with ``output_lora=RANK``, a PEFT adapter folder holding the
rank-``RANK`` truncated SVD of each module's ``alpha * delta`` (scale 1:
``lora_alpha = r``).
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pact_jax import lora
from pact_jax.buckets import plan_groups, working_set_bytes
from pact_jax.io import SUFFIXES, detect_format, open_reader, open_writer, streaming
from pact_jax.io.base import CheckpointError, flatten, unflatten
from pact_jax.io.peft import BoundAdapter, bind_adapter, is_adapter, read_adapter, save_adapter
from pact_jax import merges
from pact_jax.tree import DEFAULT_RULES, LeafRules, PactInputError, apply_delta, check_finite


def check_inputs(finetuned: Sequence[str | os.PathLike]) -> bool:
    """``True`` when every input is a PEFT adapter folder, ``False`` when none is; mixing is refused."""
    flags = [is_adapter(p) for p in finetuned]
    if any(flags) and not all(flags):
        adapters = [str(p) for p, f in zip(finetuned, flags) if f]
        dense = [str(p) for p, f in zip(finetuned, flags) if not f]
        raise PactInputError(
            f"the fine-tuned inputs mix PEFT adapter folders ({adapters[:3]}) and full checkpoints ({dense[:3]}); "
            "merge either adapters into their base or full fine-tuned checkpoints (merge the adapters into full "
            "checkpoints first to combine both)."
        )
    return bool(flags) and all(flags)


def group_task_vectors(
    bound: Sequence[BoundAdapter],
    w0: Mapping[str, np.ndarray],
    *,
    rules: LeafRules = DEFAULT_RULES,
    spaces: bool = True,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Task vectors ``(T, *leaf.shape)`` (float32) of the leaves ``w0`` from the adapters, and the
    LoRA explicit spaces ``{path: (T, d, r)}`` of their LoRA leaves (empty if not ``spaces``)."""
    t = len(bound)
    stacked, task_spaces = {}, {}
    for path, base in w0.items():
        base32 = np.asarray(base, np.float32)
        tau = np.zeros((t, *base32.shape), np.float32)
        with_factors = [{path: b.factors[path]} if path in b.factors else {} for b in bound]
        if any(with_factors):
            layout = next(b.layouts[path] for b in bound if path in b.factors)
            st = lora.stack_factors(with_factors)[path]
            # On the host (NumPy): eager JAX would compile these small products once per leaf shape.
            delta = np.einsum("t,tor,tri->toi", st.scale, st.b, st.a)
            tau += delta.transpose(0, 2, 1) if layout == "flax" else delta
            if spaces and base32.ndim == 2 and rules.kind(path, base32.shape) == "matrix":
                # Row space of A is the input side of the update; find which side of the stored leaf that is.
                input_on_right = layout == "torch"
                protects_right = rules.input_side(path) == "right"
                task_spaces[path] = lora.row_space(st.a) if input_on_right == protects_right else lora.column_space(st.b)
        for i, b in enumerate(bound):
            if path in b.full:
                tau[i] += np.asarray(b.full[path], np.float32) - base32
            if path in b.bias:
                tau[i] += b.bias[path]
        stacked[path] = tau
    return stacked, task_spaces


def merge_adapters(
    pretrained: str | os.PathLike,
    adapters: Sequence[str | os.PathLike],
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
    output_lora: int | None = None,
    lora_spaces: bool = True,
    rules: LeafRules | None = None,
    limit_malloc: bool = True,
    factor_mergers: bool = True,
    **options: Any,
):
    """Merges PEFT LoRA adapters into their base ``pretrained``; writes ``output``.

    Args:
      pretrained: the base checkpoint (any format and layout pact_jax reads).
      adapters: ``T`` PEFT adapter folders (:func:`pact_jax.io.peft.read_adapter`).
      output: destination; must not exist unless ``overwrite``.
      merge: a :func:`pact_jax.chain` merge (needs ``from_stacked`` /
        ``delta_from_stacked``), e.g. from :func:`pact_jax.recipes.make_merge`.
      key, alpha, budget_bytes, input_format, output_format, overwrite,
      progress, limit_malloc: as in :func:`pact_jax.io.streaming.merge_checkpoints`.
      output_lora: write a PEFT adapter of this rank (truncated SVD of each
        module's ``alpha * delta``) instead of the full model.
      lora_spaces: give PACT the adapters' ``A`` row spaces (the LoRA variant);
        ``False``: PACT takes the top-k SVD of each dense ``s B A``.
      factor_mergers: where the merge is a lone Task Arithmetic, averaging or
        TSV-M (exact SVD, no transform), merge LoRA leaves from their factors
        (:func:`pact_jax.lora.task_arithmetic`, :func:`pact_jax.lora.tsv`: no
        dense ``(T, d_out, d_in)`` stack, no SVD of a dense update); ``False``:
        always the dense task vectors (the same result to rounding).
      rules: the leaf rules of the merge (which side PACT protects); default
        ``merge.rules`` or :data:`pact_jax.DEFAULT_RULES`.
      **options: other options of ``merge_checkpoints`` (a device mesh,
        ``output_dtype``, orbax manager steps, ...), which adapter inputs do
        not take yet: each must have its default value there.

    Returns:
      A :class:`pact_jax.io.streaming.MergeReport`.
    """
    defaults = inspect.signature(streaming.merge_checkpoints).parameters
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"merge_adapters got unexpected keywords {unknown}.")
    given = sorted(k for k, v in options.items() if v is not None and v != defaults[k].default)
    if given:
        raise PactInputError(f"merging PEFT adapters does not support {', '.join(given)}; drop it, or merge the "
                             "adapters into full checkpoints first.")
    start = time.perf_counter()
    if limit_malloc:
        streaming.limit_malloc_retention()
    rules = rules or getattr(merge, "rules", None) or DEFAULT_RULES
    for name in ("from_stacked", "delta_from_stacked"):
        if not hasattr(merge, name):
            raise TypeError(f"merging adapters needs a pact_jax.chain merge (with merge.{name}); got {merge!r} "
                            "(recipes.make_merge with budget_bytes: pass shapes= as well, or leave the budget "
                            "to merge_adapters).")
    pre_path, out_path = Path(pretrained), Path(output)
    ad_paths = [Path(p) for p in adapters]
    if not ad_paths:
        raise PactInputError("no adapters given: pass at least one PEFT adapter folder.")
    streaming._check_not_inside(out_path, [pre_path, *ad_paths])
    pre = open_reader(pre_path, input_format)
    try:
        meta = pre.metadata()
        bound = [bind_adapter(read_adapter(p), pre) for p in ad_paths]
        touched_set = set().union(*(b.paths() for b in bound))
        touched = {p: meta[p] for p in meta if p in touched_set}
        t = len(bound)
        groups = plan_groups(touched, t, budget_bytes)
        over = [g[0] for g in groups if len(g) == 1 and budget_bytes and working_set_bytes(meta, g, t) > budget_bytes]
        alpha_value = alpha if alpha is not None else getattr(merge, "alpha", None)
        uses_spaces = getattr(merge, "uses_task_spaces", True)  # a chain knows whether a step (PACT) takes them
        iterate = streaming._progress(progress, groups)

        if alpha_value is None:
            raise ValueError("merge_adapters needs alpha (the merge has no default alpha).")
        by_factors = _factor_merger(merge, rules) if factor_mergers else None

        def merged_groups():
            """``(w0, alpha-free delta)`` per group: factor-aware where the merge allows, else dense."""
            for group in iterate:
                w0 = pre.read(group)
                check_finite(w0, str(pre.path))
                delta: dict[str, Any] = {}
                if by_factors is not None:
                    delta = by_factors(bound, {p: w0[p] for p in group})
                rest = {p: w0[p] for p in group if p not in delta}
                if rest:
                    stacked, spaces = group_task_vectors(bound, rest, rules=rules, spaces=lora_spaces and uses_spaces)
                    out = merge.delta_from_stacked(unflatten(rest), unflatten(stacked), key=key,
                                                   task_spaces=spaces or None)  # fmt: skip
                    delta.update(flatten(out))
                yield w0, delta

        if output_lora is not None:
            _check_lora_only(bound, output_lora)
            modules: dict[str, lora.LoraFactors] = {}
            names = {p: m for b in bound for p, m in b.modules.items()}
            layouts = {p: lay for b in bound for p, lay in b.layouts.items()}
            for _, delta in merged_groups():
                for p, d in delta.items():
                    f = lora.truncate(alpha_value * jnp.asarray(d, jnp.float32), output_lora, layout=layouts[p])
                    modules[names[p].name] = lora.LoraFactors(np.asarray(f.a), np.asarray(f.b), f.scale)
            first = bound[0].adapter
            save_adapter(
                out_path, modules, base_model_name_or_path=first.config.get("base_model_name_or_path"),
                embedding_modules=[m.name for m in names.values() if m.kind == "embedding"],
                fan_in_fan_out=first.fan_in_fan_out, overwrite=overwrite,
            )  # fmt: skip
        else:
            fmt = output_format or (detect_format(out_path) if out_path.suffix in SUFFIXES else pre.format)
            with open_writer(out_path, meta, fmt, source=pre, overwrite=overwrite) as writer:
                for chunk in _chunks([p for p in meta if p not in touched_set], meta, budget_bytes):
                    writer.write(pre.read(chunk))
                for w0, delta in merged_groups():
                    merged = apply_delta(w0, {p: delta[p] for p in w0}, alpha_value)
                    writer.write({p: np.asarray(x) for p, x in merged.items()})
                writer.commit()
    finally:
        pre.close()
    return AdapterMergeReport(
        output=out_path,
        num_tasks=t,
        num_leaves=len(meta),
        num_params=int(sum(np.prod(s.shape) for s in meta.values())),
        num_groups=len(groups),
        largest_group_bytes=max((working_set_bytes(meta, g, t) for g in groups), default=0),
        budget_bytes=budget_bytes,
        over_budget=tuple(over),
        copied=tuple(p for p in meta if p not in touched_set),
        seconds=time.perf_counter() - start,
        peak_rss_bytes=streaming.peak_rss_bytes(),
    )


class AdapterMergeReport(streaming.MergeReport):
    """:class:`pact_jax.io.streaming.MergeReport` of :func:`merge_adapters`: ``copied`` are the leaves no
    adapter touches."""

    def summary(self) -> str:
        lines = [x for x in super().summary().splitlines() if not x.startswith("non-float leaves copied")]
        if self.copied:
            lines.append(f"{len(self.copied)} leaves no adapter touches, copied from the base")
        return "\n".join(lines)


def _factor_merger(merge: Any, rules: LeafRules) -> Callable[..., dict[str, Any]] | None:
    """For a chain whose only step is Task Arithmetic, averaging or exact TSV-M (with no other
    hyperparameter bound), a function ``(bound, w0) -> {path: delta}`` over the group's LoRA leaves
    that the rules treat as the merger would a dense matrix; ``None`` otherwise (the dense path)."""
    steps = getattr(merge, "steps", ())
    if len(steps) != 1:
        return None
    fn = steps[0]
    base, kw = getattr(fn, "func", fn), dict(getattr(fn, "keywords", None) or {})
    kw.pop("rules", None)
    if base in (merges.task_arithmetic, merges.average) and not kw:
        method, mkw, kinds = base.__name__, {}, ("matrix", "other")
    elif base is merges.tsv and set(kw) <= {"svd", "spread_remainder"} and kw.get("svd", "exact") == "exact":
        method, mkw, kinds = "tsv", {"spread_remainder": kw.get("spread_remainder", False)}, ("matrix",)
    else:
        return None

    def run(bound: Sequence[BoundAdapter], w0: Mapping[str, np.ndarray]) -> dict[str, Any]:
        out = {}
        for path, base_leaf in w0.items():
            shape = np.shape(base_leaf)
            if any(path in b.full or path in b.bias for b in bound) or rules.kind(path, shape) not in kinds:
                continue
            present = [{path: b.factors[path]} if path in b.factors else {} for b in bound]
            if not any(present) or len(shape) != 2:
                continue
            layout = next(b.layouts[path] for b in bound if path in b.factors)
            out[path] = getattr(lora, method)(lora.stack_factors(present), layout=layout, **mkw)[path]
        return out

    return run


def _check_lora_only(bound: Sequence[BoundAdapter], rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"output_lora must be a positive rank, got {rank!r}.")
    if len({b.adapter.fan_in_fan_out for b in bound}) > 1:
        raise CheckpointError("the adapters disagree on fan_in_fan_out; a merged adapter has one config: write the "
                              "merged full model instead.")
    for b in bound:
        extra = sorted(set(b.full) | set(b.bias))
        if extra:
            raise CheckpointError(
                f"{b.adapter.weights_file}: the adapter also trains full tensors or LoRA biases ({extra[:3]}); a merged "
                "adapter (--output-lora) holds LoRA factors only: write the merged full model instead."
            )


def _chunks(paths: Sequence[str], meta: Mapping[str, Any], budget_bytes: int | None) -> list[list[str]]:
    """``paths`` in consecutive chunks of at most ``budget_bytes`` as stored (one chunk without a budget)."""
    if budget_bytes is None:
        return [list(paths)] if paths else []
    chunks, size = [[]], 0
    for p in paths:
        n = int(np.prod(meta[p].shape)) * np.dtype(meta[p].dtype).itemsize
        if chunks[-1] and size + n > budget_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += n
    return chunks
