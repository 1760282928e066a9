"""The ``merge`` settings of ``pact-jax``: a YAML config (or a mergekit config, translated by
:mod:`pact_jax.mergekit`), the flags on top of it, and the checks that turn bad values into a usage
error (exit code 2)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

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



def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _load_config(path: str) -> dict[str, Any]:
    from pact_jax import mergekit

    try:
        data = mergekit.read_yaml(path, "config")
    except ValueError as e:
        raise UsageError(str(e)) from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a mapping of keys to values, not {type(data).__name__}")

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
