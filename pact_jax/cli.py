"""The ``pact-jax`` command line: ``merge`` and ``inspect``.

    pact-jax merge --pretrained PRE --finetuned FT1 FT2 ... --method tsv --pact --output OUT
    pact-jax merge ... --method tsv --pact-preset light [--pact-layer-ratio 0.5 --pact-exclude head]
    pact-jax merge ... --method task_arithmetic --sift [--sift-arg pretrained_rank=0.5]
    pact-jax merge config.yaml [OUT] [--flags that override it]
    pact-jax merge mergekit.yml OUT_DIR         # a mergekit config, mergekit's numbers (docs/mergekit.md)
    pact-jax merge --pretrained BASE --finetuned ADAPTER1 ADAPTER2 ... [--output-lora RANK]  (PEFT LoRA folders)
    pact-jax merge ... --distributed [--coordinator-address H:P --num-processes N --process-id I]
    pact-jax inspect CKPT [--pretrained PRE] [--finetuned FT ...]

Exit codes: 0 success, 2 usage error (bad flags or config), 1 failure (a
message names the file and leaf). An output is written to a temporary
directory next to it and renamed into place when complete; an existing
output is never replaced without ``--overwrite``, and an input never.

``--distributed`` runs one merge over several processes (hosts): every
process runs the same command, :func:`pact_jax.sharding.initialize` joins
them (``jax.distributed``), the groups are merged over a global device mesh
(``--mesh``, default ``auto``) and written by all processes together (orbax
output) or gathered to process 0 (other formats); process 0 publishes the
output and prints the summary.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

USAGE_ERROR = 2
FAILURE = 1
INTERRUPTED = 130  # 128 + SIGINT, as shells report it
TERMINATED = 143  # 128 + SIGTERM


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

# Config-file keys (also the flags' dest names); values are checked by argparse-like converters below.
_CONFIG_KEYS = {
    "pretrained": str,
    "finetuned": list,
    "method": str,
    "pact": bool,
    "pact_preset": str,
    "sift": bool,
    "alpha": float,
    "svd": str,
    "seed": int,
    "output": str,
    "format": str,
    "output_format": str,
    "step": int,
    "output_step": int,
    "params_path": str,
    "other_leaves": str,
    "overwrite": bool,
    "budget_mib": float,
    "method_args": dict,
    "weights": list,
    "output_dtype": str,
    "output_lora": int,
    "pact_args": dict,
    "sift_args": dict,
    "pact_only_2d": bool,
    "pact_include": list,
    "pact_exclude": list,
    "pact_layer_ratio": float,
    "rules": dict,
    "layout": str,
    "progress": bool,
    "mesh": str,
    "distributed": bool,
    "coordinator_address": str,
    "num_processes": int,
    "process_id": int,
}
_DISTRIBUTED_KEYS = ("coordinator_address", "num_processes", "process_id")
# orbax CheckpointManager steps and train states (docs/orbax.md).
_STATE_KEYS = ("step", "output_step", "params_path", "other_leaves")
_OUTPUT_DTYPES = ("float32", "bfloat16", "float16", "float64")
_RULE_KEYS = ("matrix", "not_matrix", "average", "freeze")
# Keys of a config's ``rules:`` mapping: the regex rules, and row_axes ({REGEX: K}, docs/layouts.md).
_RULES_CONFIG_KEYS = (*_RULE_KEYS, "row_axes")
# Scope of PACT's subspace perspective and of SIFT: config key -> keyword of pact / sift.
_SCOPE_KEYS = {"pact_only_2d": "only_2d", "pact_include": "include", "pact_exclude": "exclude",
               "pact_layer_ratio": "layer_ratio"}  # fmt: skip


class UsageError(Exception):
    """Bad command line or config file: exit code 2."""


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _add_pact_scope(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "PACT / SIFT scope",
        "Which matrices PACT's subspace perspective and SIFT filter (DESIGN §1a); every other leaf passes "
        "through them unchanged. Resolved over the pre-trained checkpoint's leaves before merging, so "
        "--pact-layer-ratio selects the same matrices with or without --budget-mib.",
    )
    g.add_argument("--pact-only-2d", action=argparse.BooleanOptionalAction, default=None,
                   help="only exactly-2-D weights, as the PACT authors (default: every matrix of the leaf rules)")
    g.add_argument("--pact-include", action="append", default=None, metavar="REGEX",
                   help="only matrices whose path matches one of these (repeatable)")
    g.add_argument("--pact-exclude", action="append", default=None, metavar="REGEX",
                   help="leave matrices whose path matches one of these alone (repeatable; default "
                        "text_projection; --pact-exclude '' excludes nothing)")
    g.add_argument("--pact-layer-ratio", type=float, metavar="F",
                   help="only the first fraction F in (0, 1] of those matrices in model order (natural sort "
                        "of paths; default 1)")  # fmt: skip


def _add_state_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "orbax steps and train states",
        "CheckpointManager roots as inputs and outputs; train states (params + optimizer state + step), of which "
        "only the params are merged. See docs/orbax.md.",
    )
    g.add_argument("--step", type=int, metavar="N",
                   help="read step N of inputs that are orbax CheckpointManager roots (default: each root's latest)")
    g.add_argument("--output-step", type=int, metavar="N",
                   help="--output is a CheckpointManager root (new or existing): write the merged model as its step "
                        "N, as CheckpointManager(root).save(N, ...) would; other steps are not touched, an existing "
                        "step N needs --overwrite")
    g.add_argument("--params-path", metavar="PATH",
                   help="the subtree that is the model, e.g. params or state/params (default: a train state's "
                        "top-level params, detected beside an opt_state; '' merges every leaf)")
    g.add_argument("--other-leaves", choices=("copy", "drop"),
                   help="the leaves outside --params-path (optimizer state, step): copy them from the pre-trained "
                        "checkpoint into the output (default), or drop them (the output holds the params alone)")


def _parser() -> argparse.ArgumentParser:
    from pact_jax import io, recipes

    presets = list(recipes.pact_presets())

    ap = argparse.ArgumentParser(prog="pact-jax", description="Merge fine-tuned JAX/Flax checkpoints, with PACT.")
    ap.add_argument("--traceback", action="store_true", help="print the full traceback on failure")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "merge",
        help="merge checkpoints into one",
        description="Merge fine-tuned checkpoints of one pre-trained model. Flags override the YAML config.",
    )
    m.add_argument("config", nargs="?",
                   help="YAML file whose keys mirror the flags (see README), or a mergekit config (models:, "
                        "base_model:, merge_method:; docs/mergekit.md)")  # fmt: skip
    m.add_argument("out", nargs="?", metavar="OUT", help="output, as in mergekit-yaml CONFIG OUT (same as --output)")
    m.add_argument("--pretrained", help="pre-trained checkpoint")
    m.add_argument("--finetuned", nargs="+", help="fine-tuned checkpoints, one per task")
    m.add_argument("--method", choices=recipes.ALL_METHODS, metavar="METHOD",
                   help=f"merging method, one of: {', '.join(recipes.ALL_METHODS)}")
    m.add_argument("--pact", action=argparse.BooleanOptionalAction, default=None, help="PACT pre-processing (default: off)")
    m.add_argument("--pact-preset", choices=presets,
                   help="PACT with a named set of hyperparameters (pact_jax.pact.PRESETS; implies --pact; "
                        "--pact-arg overrides single ones; 'paper' is the default set)")  # fmt: skip
    m.add_argument("--sift", action=argparse.BooleanOptionalAction, default=None,
                   help="SIFT pre-processing instead of PACT: remove each task vector's component in the "
                        "pre-trained top subspace (the PACT authors' ablation baseline; default: off)")  # fmt: skip
    m.add_argument("--alpha", type=float, help="scaling of the merged delta (default per method)")
    m.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="per-model weights, one per --finetuned checkpoint (average, task_arithmetic, ties, "
                        "dare_ties, dare_task_arithmetic; docs/mergekit.md)")  # fmt: skip
    m.add_argument(
        "--svd", choices=("exact", "randomized"),
        help="SVD of PACT's top-k / top-r factors and of TSV-M's per-task truncation (default exact; "
        "randomized uses --seed)",
    )
    m.add_argument("--seed", type=int, help="seed of the PRNG key for DARE / randomized SVD (default 0)")
    m.add_argument("--output", help="where to write the merged checkpoint")
    m.add_argument("--format", choices=io.FORMATS, help="input format (default: detected)")
    m.add_argument("--output-format", choices=io.FORMATS, help="output format (default: the pre-trained one's)")
    m.add_argument("--output-lora", type=int, metavar="RANK",
                   help="with PEFT adapter folders as --finetuned: write a merged PEFT adapter of this rank "
                        "(truncated SVD of each module's merged update) instead of the full model (docs/lora.md)")
    m.add_argument("--output-dtype", choices=_OUTPUT_DTYPES,
                   help="dtype of the output's float leaves (default: the pre-trained one's)")  # fmt: skip
    m.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    _add_state_flags(m)
    m.add_argument("--budget-mib", type=float, help="memory budget of one group of leaves (default: whole model)")
    m.add_argument("--method-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="merger hyperparameter, e.g. density=0.2 (repeatable)")  # fmt: skip
    m.add_argument("--pact-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="PACT hyperparameter, e.g. task_rank=5 (repeatable)")  # fmt: skip
    m.add_argument("--sift-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="SIFT hyperparameter, e.g. pretrained_rank=0.5 (repeatable)")  # fmt: skip
    _add_pact_scope(m)
    for rule in _RULE_KEYS:
        m.add_argument(f"--{rule.replace('_', '-')}", dest=f"rule_{rule}", metavar="REGEX",
                       help=f"leaf rule: paths matching REGEX are '{rule}' (see LeafRules)")  # fmt: skip
    m.add_argument("--layout", choices=("auto", "flax", "torch"),
                   help="how the checkpoints store a linear map: flax kernels (in, out) or torch / Hugging Face "
                        "weights (out, in); auto (default) reads a safetensors header's format, else the leaf "
                        "names (.../weight: torch). See docs/layouts.md")  # fmt: skip
    m.add_argument("--row-axes", action="append", default=None, metavar="REGEX=K",
                   help="matrix view of the leaves whose path matches REGEX: the first K axes are the rows "
                        "(repeatable; before the default entries; YAML rules: {row_axes: {REGEX: K}})")  # fmt: skip
    m.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default on)")
    m.add_argument("--mesh", metavar="auto|TxL",
                   help="run each group's merge sharded over a device mesh: 'auto' (all devices on the layers "
                        "axis) or TASKSxLAYERS, e.g. 2x4 (default: one device)")  # fmt: skip
    m.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                   help="multi-process run: join the other processes with jax.distributed.initialize (run the "
                        "same command on every host); implies --mesh auto unless --mesh is given")  # fmt: skip
    m.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="with --distributed: process 0's address (default: detected on Cloud TPU, Slurm, Open MPI)")
    m.add_argument("--num-processes", type=int, metavar="N", help="with --distributed: number of processes")
    m.add_argument("--process-id", type=int, metavar="I", help="with --distributed: this process's id, 0..N-1")

    i = sub.add_parser(
        "inspect",
        help="show a checkpoint's tree, and task-vector / PACT statistics",
        description="List a checkpoint's leaves (path, shape, dtype, how the merge treats each); with --pretrained "
        "also the task vectors' norms and PACT's per-matrix statistics (core K, task, reliance and protect "
        "dimensions, energy removed).",
    )
    i.add_argument("checkpoint", help="checkpoint to inspect (fine-tuned, if --pretrained is given)")
    i.add_argument("--finetuned", nargs="*", default=[], help="more fine-tuned checkpoints (tasks) for PACT statistics")
    i.add_argument("--pretrained", help="pre-trained checkpoint: adds task-vector norms and PACT's LBW statistics")
    i.add_argument("--format", choices=io.FORMATS, help="input format (default: detected)")
    i.add_argument("--step", type=int, metavar="N",
                   help="CHECKPOINT is an orbax CheckpointManager root: inspect its step N (default: the latest)")
    i.add_argument("--pact-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="PACT hyperparameter for the statistics (repeatable)")  # fmt: skip
    i.add_argument("--pact-preset", choices=presets, help="PACT preset for the subspace statistics")
    i.add_argument("--layout", choices=("auto", "flax", "torch"), default="auto",
                   help="flax kernels (in, out) or torch weights (out, in), for PACT's input space (default: "
                        "detected, docs/layouts.md)")  # fmt: skip
    _add_pact_scope(i)
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return ap


# --------------------------------------------------------------------------
# merge


def _load_config(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise UsageError(f"config {path} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a mapping of keys to values, not {type(data).__name__}")
    from pact_jax import mergekit

    if mergekit.is_mergekit_config(data):  # models: / merge_method: (paths as mergekit reads them)
        try:
            return mergekit.translate(data, where=f"mergekit config {path}").settings()
        except ValueError as e:
            raise UsageError(str(e)) from e
    unknown = sorted(set(data) - set(_CONFIG_KEYS))
    if unknown:
        raise UsageError(f"config {path}: unknown keys {unknown}; allowed: {sorted(_CONFIG_KEYS)}")
    for k, v in data.items():
        want = _CONFIG_KEYS[k]
        ok = isinstance(v, want) or (want is float and isinstance(v, int) and not isinstance(v, bool))
        if want is list and isinstance(v, str):
            data[k], ok = [v], True
        if not ok or (want in (int, float) and isinstance(v, bool)):
            raise UsageError(f"config {path}: '{k}' must be a {want.__name__}, got {v!r}")
    unknown_rules = sorted(set(data.get("rules", {})) - set(_RULES_CONFIG_KEYS))
    if unknown_rules:
        raise UsageError(f"config {path}: unknown rules {unknown_rules}; allowed: {list(_RULES_CONFIG_KEYS)}")
    # Relative checkpoint paths in a config are relative to the config file.
    base = Path(path).parent
    for k in ("pretrained", "output"):
        if k in data:
            data[k] = str(base / data[k])
    if "finetuned" in data:
        data["finetuned"] = [str(base / p) for p in data["finetuned"]]
    return data


def merge_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Config file, then flags on top; checks what is required."""
    cfg = _load_config(args.config) if args.config else {}
    for k in ("pretrained", "finetuned", "method", "pact", "pact_preset", "sift", "alpha", "svd", "seed", "output",
              "format", "output_format", "overwrite", "budget_mib", "progress", "mesh", "distributed",
              "weights", "output_dtype", *_DISTRIBUTED_KEYS, *_SCOPE_KEYS):  # fmt: skip
        v = getattr(args, k)
        if v is not None:
            cfg[k] = v
    if args.out is not None:  # pact-jax merge CONFIG OUT, as mergekit-yaml CONFIG OUT_DIR
        if args.output is not None and args.output != args.out:
            raise UsageError(f"the output is given twice: OUT {args.out} and --output {args.output}")
        cfg["output"] = args.out
    for k in _STATE_KEYS:
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    _check_state_keys(cfg)
    cfg["method_args"] = {**cfg.get("method_args", {}), **dict(args.method_arg)}
    cfg["pact_args"] = {**cfg.get("pact_args", {}), **dict(args.pact_arg)}
    cfg["sift_args"] = {**cfg.get("sift_args", {}), **dict(args.sift_arg)}
    cfg["rules"] = {**cfg.get("rules", {}), **{r: getattr(args, f"rule_{r}") for r in _RULE_KEYS if getattr(args, f"rule_{r}")}}
    _layout_settings(cfg, args)
    if args.output_lora is not None:
        cfg["output_lora"] = args.output_lora
    missing = [k for k in ("pretrained", "finetuned", "method", "output") if not cfg.get(k)]
    if missing:
        raise UsageError(f"merge needs {', '.join('--' + m for m in missing)} (as flags or config keys)")
    from pact_jax import recipes
    from pact_jax.tree import check_alpha

    if cfg["method"] not in recipes.ALL_METHODS:
        raise UsageError(f"unknown method {cfg['method']!r}; choose one of {list(recipes.ALL_METHODS)}")
    _check_weights(cfg, recipes)
    if cfg.get("alpha") is not None:
        try:
            check_alpha(cfg["alpha"], "--alpha (alpha)")
        except ValueError as e:
            raise UsageError(str(e)) from e
    budget = cfg.get("budget_mib")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UsageError(f"--budget-mib (budget_mib) must be a positive number of MiB, got {budget!r}")
    if cfg.get("svd") not in (None, "exact", "randomized"):
        raise UsageError(f"svd must be 'exact' or 'randomized', got {cfg['svd']!r}")
    given = [k for k in _DISTRIBUTED_KEYS if cfg.get(k) is not None]
    if given and not cfg.get("distributed"):
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in given)} need(s) --distributed")
    if cfg.get("distributed") and not cfg.get("mesh"):
        cfg["mesh"] = "auto"
    _check_transform(cfg, recipes)
    return cfg


def _check_weights(cfg: dict[str, Any], recipes) -> None:
    """--weights (weights): one number per fine-tuned checkpoint, for a method that takes them (then
    passed on as the merger's ``weights``); --output-dtype (output_dtype): a float dtype."""
    weights = cfg.get("weights")
    if weights is not None:
        if cfg["method"] not in recipes.WEIGHTED_METHODS:
            raise UsageError(f"--weights (weights): {cfg['method']} takes no per-model weights; "
                             f"{', '.join(recipes.WEIGHTED_METHODS)} do")  # fmt: skip
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise UsageError(f"--weights (weights) must be finite numbers, got {weights!r}")
        if len(weights) != len(cfg["finetuned"]):
            raise UsageError(f"--weights (weights) has {len(weights)} numbers for {len(cfg['finetuned'])} fine-tuned "
                             "checkpoints: give one per checkpoint, in the same order")  # fmt: skip
        cfg["method_args"] = {**cfg["method_args"], "weights": tuple(float(w) for w in weights)}
    if cfg.get("output_dtype") not in (None, *_OUTPUT_DTYPES):
        raise UsageError(f"--output-dtype (output_dtype) must be one of {list(_OUTPUT_DTYPES)}, "
                         f"got {cfg['output_dtype']!r}")  # fmt: skip


def _check_state_keys(cfg: dict[str, Any]) -> None:
    """--step / --output-step / --other-leaves: values a usage error can name."""
    for k in ("step", "output_step"):
        if cfg.get(k) is not None and cfg[k] < 0:
            raise UsageError(f"{_flag(k)} ({k}) must be a step number >= 0, got {cfg[k]}")
    if cfg.get("other_leaves") not in (None, "copy", "drop"):
        raise UsageError(f"--other-leaves (other_leaves) must be 'copy' or 'drop', got {cfg['other_leaves']!r}")
    if cfg.get("other_leaves") == "drop" and cfg.get("params_path") in ("", "/"):
        raise UsageError("--other-leaves drop with --params-path '' (the whole checkpoint): there is nothing to drop")


def _check_transform(cfg: dict[str, Any], recipes) -> None:
    """--pact / --pact-preset / --sift and their arguments and scope: consistent, or a usage error."""
    preset = cfg.get("pact_preset")
    if preset is not None:
        presets = list(recipes.pact_presets())
        if preset not in presets:
            raise UsageError(f"--pact-preset (pact_preset) must be one of {presets}, got {preset!r}")
        if cfg.get("pact") is False:
            raise UsageError(f"--pact-preset {preset} needs PACT, but --no-pact (pact: false) turns it off")
        cfg["pact"] = True
    if cfg.get("sift") and cfg.get("pact"):
        which = "--pact-preset" if preset is not None else "--pact"
        raise UsageError(f"--sift and {which} are exclusive: SIFT filters the task vectors instead of PACT; "
                         "choose one (--no-pact turns off a config's pact: true)")  # fmt: skip
    if cfg["sift_args"] and not cfg.get("sift"):
        raise UsageError(f"SIFT hyperparameters {sorted(cfg['sift_args'])} given, but SIFT is off (add --sift).")
    for key in ("pact_args", "sift_args"):
        if "paths" in cfg[key]:
            raise UsageError(f"--{key[:4]}-arg paths=... : the CLI sets paths from the scope flags "
                             "(--pact-include, --pact-exclude, --pact-only-2d, --pact-layer-ratio)")  # fmt: skip
    given = [k for k in _SCOPE_KEYS if cfg.get(k) is not None]
    if given and not (cfg.get("pact") or cfg.get("sift")):
        raise UsageError(f"{', '.join(_flag(k) for k in given)} need(s) --pact, --pact-preset or --sift")
    ratio = cfg.get("pact_layer_ratio")
    if ratio is not None and not 0 < ratio <= 1:
        raise UsageError(f"--pact-layer-ratio must lie in (0, 1], got {ratio}")
    from pact_jax import scope  # the one check of the scope regexes (the API's)

    for key in ("pact_include", "pact_exclude"):
        try:
            scope.patterns(cfg.get(key), _flag(key))
        except ValueError as e:
            raise UsageError(str(e)) from e


def _scope_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The scope keywords of pact / sift that the config's scope keys set ('' in an exclude list: none)."""
    kw = {_SCOPE_KEYS[k]: cfg[k] for k in _SCOPE_KEYS if cfg.get(k) is not None}
    for k in ("include", "exclude"):
        if k in kw:
            kw[k] = tuple(p for p in kw[k] if p)
    if kw.get("include") == ():
        del kw["include"]
    return kw


def _float_shapes(path: str, fmt: str | None, cfg: dict[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """``{leaf path: shape}`` of a checkpoint's float leaves (those a merge sees), from its metadata:
    the step and params subtree that ``cfg`` (``step``, ``params_path``) selects (io.subtree)."""
    import jax.numpy as jnp

    from pact_jax import io
    from pact_jax.io import orbax_manager, subtree

    cfg = cfg or {}
    if fmt in (None, "orbax"):
        path = str(orbax_manager.resolve(Path(path), cfg.get("step"), strict=False))
    with io.open_reader(path, fmt) as reader:
        meta = subtree.select(reader, cfg.get("params_path")).view(reader).metadata()
    return {p: tuple(s.shape) for p, s in meta.items() if jnp.issubdtype(s.dtype, jnp.floating)}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pact_jax")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "(not installed)"


def _rules(spec: dict[str, Any], layout: str = "flax"):
    import pact_jax

    spec = dict(spec)
    if "row_axes" in spec:  # the user's entries first, then the defaults (Flax attention output kernels)
        spec["row_axes"] = tuple(spec["row_axes"]) + pact_jax.LeafRules().row_axes
    try:
        return pact_jax.LeafRules(**spec, layout=layout) if spec or layout != "flax" else pact_jax.DEFAULT_RULES
    except Exception as e:
        raise UsageError(f"bad leaf rules {spec}: {e}") from e


def _layout_settings(cfg: dict[str, Any], args: argparse.Namespace) -> None:
    """``--layout`` / ``layout:`` (checked; default auto) and ``--row-axes`` / ``rules: {row_axes:}``
    (parsed into ``((REGEX, K), ...)``, the flags' entries first)."""
    from pact_jax import layout

    if args.layout is not None:
        cfg["layout"] = args.layout
    cfg.setdefault("layout", "auto")
    try:
        layout.check_layout(cfg["layout"], allow_auto=True, what="--layout (layout)")
        entries = layout.parse_row_axes(args.row_axes or [], "--row-axes")
        if "row_axes" in cfg["rules"]:
            entries += layout.parse_row_axes(cfg["rules"]["row_axes"], "rules: row_axes")
    except ValueError as e:
        raise UsageError(str(e)) from e
    if entries:
        cfg["rules"]["row_axes"] = entries
    else:
        cfg["rules"].pop("row_axes", None)


def _resolve_layout(cfg: dict[str, Any]) -> str:
    """The checkpoints' layout: ``cfg['layout']``, or for ``auto`` the pre-trained checkpoint's
    (:func:`pact_jax.layout.detect_layout`)."""
    from pact_jax import io, layout

    if cfg.get("layout", "auto") != "auto":
        return cfg["layout"]
    with io.open_reader(cfg["pretrained"], cfg.get("format")) as reader:
        return layout.detect_layout(reader)


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
    layout = _resolve_layout(cfg)
    rules = _rules(cfg["rules"], layout)
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
    # One read of the pre-trained metadata serves the rule check and the scope.
    float_shapes = _float_shapes(cfg["pretrained"], cfg.get("format"), cfg) if (cfg["rules"] or scoped) else {}
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


# --------------------------------------------------------------------------
# inspect


def _tree_rows(meta) -> list[dict[str, Any]]:
    import numpy as np

    return [{"path": p, "shape": list(s.shape), "dtype": str(s.dtype), "size": int(np.prod(s.shape))} for p, s in meta.items()]


def run_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from pact_jax import io
    from pact_jax.io.base import human_bytes

    reader = io.open_reader(args.checkpoint, args.format, step=args.step)
    meta = reader.metadata()
    rows = _tree_rows(meta)
    result: dict[str, Any] = {
        "checkpoint": str(reader.path),
        "format": reader.format,
        "num_leaves": len(rows),
        "num_params": sum(r["size"] for r in rows),
        "bytes": int(sum(r["size"] * np.dtype(meta[r["path"]].dtype).itemsize for r in rows)),
        "layout": _inspect_layout(args, reader),
        "leaves": rows,
    }
    if args.finetuned and not args.pretrained:
        raise UsageError("--finetuned needs --pretrained (task vectors are differences to it)")
    for key in ("pact_arg", "pact_preset", *_SCOPE_KEYS):
        if getattr(args, key) and not args.pretrained:
            raise UsageError(f"{_flag(key)} needs --pretrained")
    if args.pretrained:
        result["tasks"] = _task_statistics(args, reader)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['checkpoint']} ({result['format']}): {result['num_leaves']} leaves, "
          f"{result['num_params']:,} parameters, {human_bytes(result['bytes'])}")  # fmt: skip
    width = max(len(r["path"]) for r in rows) if rows else 4
    for r in rows:
        print(f"  {r['path']:<{width}}  {str(tuple(r['shape'])):<18} {r['dtype']:<9} {r['size']:>12,}")
    if "tasks" in result:
        _print_task_statistics(result["tasks"])
    return 0


def _inspect_layout(args: argparse.Namespace, reader) -> str:
    from pact_jax import layout

    return layout.detect_layout(reader) if args.layout == "auto" else args.layout


def _task_statistics(args: argparse.Namespace, reader) -> dict[str, Any]:
    """Per-leaf ||tau_t||, ||tau_t|| / ||W0|| and PACT's LBW statistics (subspace and scalar)."""
    import numpy as np

    import pact_jax
    from pact_jax import io
    from pact_jax.io.streaming import check_compatible

    pre_reader = io.open_reader(args.pretrained, args.format)
    readers = [reader] + [io.open_reader(p, args.format) for p in args.finetuned]
    check_compatible(pre_reader, readers)
    pre = pre_reader.load()
    fts = [r.load() for r in readers]
    for name, tree in zip([args.pretrained, args.checkpoint, *args.finetuned], [pre, *fts]):
        pact_jax.check_finite(tree, str(name))  # name the file, not "finetuned[0]"
    stacked = pact_jax.task_vectors(pre, fts)
    from pact_jax import recipes

    pact_kwargs = dict(args.pact_arg)
    pact_kwargs.pop("perspective", None)
    scope = _scope_kwargs(vars(args))
    ratio = scope.get("layer_ratio")
    if ratio is not None and not 0 < ratio <= 1:
        raise UsageError(f"--pact-layer-ratio must lie in (0, 1], got {ratio}")
    preset = {} if args.pact_preset is None else dict(recipes.pact_presets()[args.pact_preset])
    # The preset and the scope are the subspace perspective's; the scalar one treats every leaf.
    scalar_kwargs = {k: v for k, v in pact_kwargs.items() if k not in (*recipes.SCOPE_KEYS, "paths")}
    pact_kwargs["rules"] = scalar_kwargs["rules"] = pact_jax.LeafRules(layout=_inspect_layout(args, reader))
    try:
        subspace_kwargs = {**preset, **pact_kwargs, **scope, "perspective": "subspace"}
        subspace = pact_jax.lbw_statistics(pre, stacked, **subspace_kwargs)
        scalar = pact_jax.lbw_statistics(pre, stacked, **{**scalar_kwargs, "perspective": "scalar"})
    except (TypeError, ValueError) as e:
        raise UsageError(f"--pact-arg / --pact-preset: {e}") from e
    layers = {}
    flat_pre, flat_tau = io.flatten(pre), io.flatten(stacked)
    for p, tau in flat_tau.items():
        tau = np.asarray(tau, np.float64).reshape(tau.shape[0], -1)
        norm0 = float(np.linalg.norm(np.asarray(flat_pre[p], np.float64)))
        norms = np.linalg.norm(tau, axis=1)
        entry: dict[str, Any] = {
            "tau_norm": norms.tolist(),
            "tau_rel": (norms / norm0).tolist() if norm0 > 0 else None,
        }
        if p in subspace:
            s = subspace[p]
            # Per side: pretrained_dims (), task_dims / reliance_dims / protect_dims (T,).
            sides = {side: {k: np.asarray(x).tolist() for k, x in v.items()}
                     for side, v in s.items() if isinstance(v, dict)}  # fmt: skip
            entry["subspace"] = {**sides, "energy_removed": np.asarray(s["energy_removed"]).tolist()}
        if p in scalar:
            s = scalar[p]
            entry["scalar"] = {"lbw_entries": np.asarray(s["lbw_entries"]).tolist(),
                               "energy_removed": np.asarray(s["energy_removed"]).tolist()}  # fmt: skip
        layers[p] = entry
    return {"checkpoints": [str(r.path) for r in readers], "pretrained": str(pre_reader.path), "layers": layers}


def _print_task_statistics(stats: dict[str, Any]) -> None:
    n = len(stats["checkpoints"])
    print(f"\nTask vectors against {stats['pretrained']} ({n} task(s)); per task: ||tau|| / ||W0||; "
          "PACT subspace, per side: pre-trained core dims K, and per task the dims of its explicit space "
          "(task), implicit reliance space (reliance) and protect space (protect), energy removed; "
          "scalar: energy removed")  # fmt: skip
    for p, e in stats["layers"].items():
        rel = "—" if e["tau_rel"] is None else " ".join(f"{x:.3f}" for x in e["tau_rel"])
        line = f"  {p}: rel {rel}"
        if "subspace" in e:
            s = e["subspace"]
            for side in (k for k in ("left", "right") if k in s):
                d = s[side]
                line += f" | {side} K {d['pretrained_dims']}" + "".join(
                    f" {name} " + "/".join(str(x) for x in d[f"{name}_dims"])
                    for name in ("task", "reliance", "protect") if f"{name}_dims" in d
                )  # fmt: skip
            line += ", removed " + " ".join(f"{x:.0%}" for x in s["energy_removed"])
        if "scalar" in e:
            line += " | scalar removed " + " ".join(f"{x:.0%}" for x in e["scalar"]["energy_removed"])
        print(line)


# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on usage errors, 0 for --help
        return int(e.code or 0)
    start = time.perf_counter()
    relayed = None if args.traceback else _RelayedThreadError()
    if relayed is not None:
        logging.getLogger("absl").addFilter(relayed)
    try:
        if args.command == "merge":
            return run_merge(merge_settings(args))
        return run_inspect(args)
    except UsageError as e:
        print(f"pact-jax {args.command}: usage error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # `pact-jax inspect ... | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except KeyboardInterrupt as e:  # the writers' with-blocks removed what this run had staged
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        written = getattr(e, "written", None)
        done = f"{written} was written (complete) before that" if written else "nothing was written"
        print(f"pact-jax {args.command}: {what} after {time.perf_counter() - start:.0f} s; {done}.",
              file=sys.stderr)  # fmt: skip
        return TERMINATED if isinstance(e, Terminated) else INTERRUPTED
    except Exception as e:  # noqa: BLE001 - every failure becomes a message and exit code 1
        if args.traceback:
            traceback.print_exc()
        print(f"pact-jax {args.command}: error: {_message(e)}", file=sys.stderr)
        return FAILURE
    finally:
        if relayed is not None:
            logging.getLogger("absl").removeFilter(relayed)


def entry_point() -> None:  # console script
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored in a background job: kept so
        signal.signal(signal.SIGINT, _raise_interrupted)
    sys.unraisablehook = _quiet_unraisable
    code = main()
    # Done, or cleaned up: a signal now would only turn the exit status into -2 / -15.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code in (INTERRUPTED, TERMINATED):
        # Interpreter teardown with JAX / TensorStore threads stopped mid-work segfaulted in about half
        # of the Ctrl-C runs (rc -11 after the message): the run has cleaned up, so skip the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
