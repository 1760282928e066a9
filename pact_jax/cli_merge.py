"""``pact-jax merge``: the settings (:func:`pact_jax.cli_config.merge_settings`) turned into a merge
(:mod:`pact_jax.recipes`) run group by group on disk (:func:`pact_jax.io.streaming.merge_checkpoints`,
or :func:`pact_jax.io.lora_merge.merge_adapters` for PEFT adapters), and its summary."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pact_jax.cli_config import _SCOPE_KEYS, UsageError, _flag, _scope_kwargs
from pact_jax.cli_faults import _checked_groups, _removing_own_on_interrupt


def _pretrained_facts(cfg: dict[str, Any], *, shapes: bool) -> tuple[str, dict[str, tuple[int, ...]]]:
    """One read of the pre-trained checkpoint's metadata (the step ``cfg['step']`` selects) for what the
    settings need: its layout (``cfg['layout']``, or for ``auto`` :func:`pact_jax.layout.detect_layout`)
    and, with ``shapes``, ``{leaf path: shape}`` of the float leaves a merge sees (the params subtree
    ``cfg['params_path']`` selects, io.subtree); ``{}`` without."""
    import jax.numpy as jnp

    from pact_jax import io, layout
    from pact_jax.io import orbax_manager, subtree

    auto = cfg.get("layout", "auto") == "auto"
    if not (auto or shapes):
        return cfg["layout"], {}
    path, fmt = cfg["pretrained"], cfg.get("format")
    if fmt in (None, "orbax"):
        path = str(orbax_manager.resolve(Path(path), cfg.get("step"), strict=False))
    with io.open_reader(path, fmt) as reader:
        found = layout.detect_layout(reader) if auto else cfg["layout"]
        meta = subtree.select(reader, cfg.get("params_path")).view(reader).metadata() if shapes else {}
    return found, {p: tuple(s.shape) for p, s in meta.items() if jnp.issubdtype(s.dtype, jnp.floating)}

def _rules(spec: dict[str, Any], layout: str = "flax"):
    import pact_jax

    spec = dict(spec)
    if "row_axes" in spec:  # the user's entries first, then the defaults (Flax attention output kernels)
        spec["row_axes"] = tuple(spec["row_axes"]) + pact_jax.LeafRules().row_axes
    try:
        return pact_jax.LeafRules(**spec, layout=layout) if spec or layout != "flax" else pact_jax.DEFAULT_RULES
    except Exception as e:
        raise UsageError(f"bad leaf rules {spec}: {e}") from e

def _warn_unmatched_rules(spec: dict[str, str], pretrained: str, paths: Sequence[str]) -> None:
    """A leaf rule (--freeze, --average, ... or YAML ``rules:``) that matches no leaf of the model is
    most likely a typo: say so on stderr (the merge goes on without it)."""
    import re

    from pact_jax.layout import rule_path

    for key, value in spec.items():
        for pattern in [regex for regex, _ in value] if key == "row_axes" else [value]:
            if pattern and not any(re.search(pattern, p) or re.search(pattern, rule_path(p)) for p in paths):
                print(f"pact-jax merge: warning: leaf rule {key}: {pattern!r} (--{key.replace('_', '-')}) matches no "
                      f"leaf of {pretrained}", file=sys.stderr)  # fmt: skip


def _warn_repeated_inputs(pretrained: str, finetuned: Sequence[str]) -> None:
    """A fine-tuned input that is the pre-trained one (a zero task vector) or given twice (counted
    twice) is legal but rarely meant: say so on stderr."""
    pre, fts = Path(pretrained).resolve(), [Path(f).resolve() for f in finetuned]
    if pre in fts:
        print(f"pact-jax merge: warning: the pre-trained checkpoint {pretrained} is also given as --finetuned: "
              "its task vector is zero", file=sys.stderr)  # fmt: skip
    for path in dict.fromkeys(fts):
        if fts.count(path) > 1:
            print(f"pact-jax merge: warning: --finetuned {path} is given {fts.count(path)} times: it counts "
                  f"{fts.count(path)} times in the merge", file=sys.stderr)  # fmt: skip


def run_merge(cfg: dict[str, Any]) -> int:
    _warn_repeated_inputs(cfg["pretrained"], cfg["finetuned"])
    for note in cfg.get("mergekit_notes", ()):
        print(f"pact-jax merge: note: {note}", file=sys.stderr)
    if cfg.get("distributed"):
        _initialize(cfg)  # before anything else touches a JAX backend
    import jax

    from pact_jax import recipes
    from pact_jax.io import streaming

    adapters, lora_kw = _adapter_settings(cfg)  # PEFT LoRA adapter folders among --finetuned (docs/lora.md)
    use_pact, use_sift = bool(cfg.get("pact", False)), bool(cfg.get("sift", False))
    scope = _scope_kwargs(cfg)
    recipe = dict(
        use_pact=use_pact,
        pact_preset=cfg.get("pact_preset"),
        pact_kwargs={**cfg["pact_args"], **scope} if use_pact else cfg["pact_args"] or None,
        use_sift=use_sift,
        sift_kwargs={**cfg["sift_args"], **scope} if use_sift else None,
        svd=cfg.get("svd"),
    )
    try:
        transform, t_kw = recipes.transform_settings(cfg["method"], **recipe)
    except ValueError as e:
        msg = str(e)
        if "PACT is off" in msg:
            msg += " (add --pact)"
        elif "preset" in msg:
            msg = f"--pact-preset {cfg.get('pact_preset')}: {msg}"
        raise UsageError(msg) from e
    scoped = recipes.is_scoped(transform, t_kw)
    if scope and not scoped:
        raise UsageError(
            f"{', '.join(_flag(k) for k in _SCOPE_KEYS if cfg.get(k) is not None)}: PACT before {cfg['method']} "
            "uses the scalar-weight perspective, which treats every leaf entry-wise; the scope flags choose the "
            "matrices of the subspace perspective and of SIFT (--pact-arg perspective=subspace to use it)"
        )
    # The scope, resolved over the whole model: the merge may see one group of leaves at a time.
    # One read of the pre-trained metadata serves the layout, the rule check and the scope.
    layout, float_shapes = _pretrained_facts(cfg, shapes=bool(cfg["rules"] or scoped))
    rules = _rules(cfg["rules"], layout)
    _warn_unmatched_rules(cfg["rules"], cfg["pretrained"], list(float_shapes))
    shapes = float_shapes if scoped else None
    try:
        merge = recipes.make_merge(
            cfg["method"],
            **recipe,
            method_kwargs=cfg["method_args"],
            alpha=cfg.get("alpha"),
            rules=rules,
            shapes=shapes,
        )
        paths = recipes.with_scope_paths(t_kw, shapes, rules)["paths"] if scoped else None
    except ValueError as e:
        flag = {"pact": "--pact-arg", "sift": "--sift-arg"}.get(str(e).split(" ", 1)[0], "--method-arg")
        raise UsageError(f"{flag}: {e}" if "hyperparameters" in str(e) else str(e)) from e
    mesh = _mesh(cfg["mesh"]) if cfg.get("mesh") else None
    key = jax.random.key(cfg.get("seed", 0))
    budget = cfg.get("budget_mib")
    progress = cfg.get("progress", True)
    merge_on_disk = streaming.merge_checkpoints
    if adapters:
        from pact_jax.io import lora_merge

        merge_on_disk = functools.partial(lora_merge.merge_adapters, rules=rules, **lora_kw)
    report = _removing_own_on_interrupt(merge_on_disk)(
        cfg["pretrained"],
        cfg["finetuned"],
        cfg["output"],
        merge,
        key=key,
        budget_bytes=None if budget is None else int(budget * 2**20),
        input_format=cfg.get("format"),
        output_format=cfg.get("output_format"),
        overwrite=bool(cfg.get("overwrite", False)),
        progress=_checked_groups(progress),
        mesh=mesh,
        output_dtype=cfg.get("output_dtype"),
        step=cfg.get("step"),
        output_step=cfg.get("output_step"),
        params_path=cfg.get("params_path"),
        other_leaves=cfg.get("other_leaves", "copy"),
    )
    alpha = cfg.get("alpha", recipes.default_alpha(cfg["method"], transform, cfg.get("pact_preset")))
    notes = [f"preset {cfg['pact_preset']}"] if cfg.get("pact_preset") else []
    if layout != "flax":
        notes.append(f"{layout} layout" + (" (detected)" if cfg.get("layout", "auto") == "auto" else ""))
    if paths is not None:
        notes.append(f"on {len(paths)} matri{'x' if len(paths) == 1 else 'ces'}")
    what = cfg["method"] + (f" + {transform.upper()}" if transform else "")
    if cfg.get("mergekit_method"):
        what = f"mergekit {cfg['mergekit_method']} as {what}"
    what += f" ({', '.join(notes)}), alpha {alpha}" if notes else f", alpha {alpha}"
    if jax.process_index() == 0:
        where = f", {jax.process_count()} processes, mesh {dict(mesh.shape)}" if jax.process_count() > 1 else ""
        print(f"{what}{where}\n{report.summary()}")
    return 0


def _adapter_settings(cfg: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Whether the fine-tuned inputs are PEFT adapter folders (all or none), and the adapter options:
    ``--output-lora RANK`` and ``--pact-arg lora_spaces=false`` (PACT's dense SVD instead of the LoRA
    variant's row spaces of A; taken out of the PACT keywords)."""
    from pact_jax.io import lora_merge
    from pact_jax.tree import PactInputError

    try:
        adapters = lora_merge.check_inputs(cfg["finetuned"])
    except PactInputError as e:
        raise UsageError(str(e)) from e
    spaces = cfg["pact_args"].pop("lora_spaces", None)
    rank = cfg.get("output_lora")
    if not adapters and (spaces is not None or rank is not None):
        given = "--output-lora (output_lora)" if rank is not None else "--pact-arg lora_spaces"
        raise UsageError(f"{given} needs PEFT adapter folders as --finetuned")
    if spaces is not None and not isinstance(spaces, bool):
        raise UsageError(f"--pact-arg lora_spaces must be true or false, got {spaces!r}")
    if spaces is not None and not cfg.get("pact"):
        raise UsageError("--pact-arg lora_spaces chooses PACT's task spaces, but PACT is off (add --pact)")
    if rank is not None and (isinstance(rank, bool) or rank < 1):
        raise UsageError(f"--output-lora (output_lora) must be a positive rank, got {rank!r}")
    return adapters, ({"output_lora": rank, "lora_spaces": spaces is not False} if adapters else {})

def _initialize(cfg: dict[str, Any]) -> None:
    """``jax.distributed.initialize`` with the addresses given, or detected (TPU, Slurm, Open MPI)."""
    from pact_jax import sharding

    try:
        sharding.initialize(cfg.get("coordinator_address"), cfg.get("num_processes"), cfg.get("process_id"))
    except ValueError as e:  # jax: the cluster could not be detected, or bad arguments
        raise UsageError(
            f"--distributed: {e} (outside Cloud TPU, Slurm and Open MPI give --coordinator-address, "
            "--num-processes and --process-id)"
        ) from e


def _mesh(spec: str):
    """The device mesh ``spec`` (``auto`` or ``TxL``) names, over every process's devices."""
    from pact_jax import sharding

    if spec == "auto":
        shape = None
    else:
        try:
            shape = tuple(int(x) for x in spec.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 2 or min(shape) < 1:
            raise UsageError(f"--mesh must be 'auto' or TASKSxLAYERS such as 2x4, got {spec!r}")
    try:
        return sharding.make_mesh(shape=shape)
    except ValueError as e:
        raise UsageError(f"--mesh {spec}: {e}") from e
