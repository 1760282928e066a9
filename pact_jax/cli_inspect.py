"""``pact-jax inspect``: a checkpoint's leaves, and with ``--pretrained`` its task vectors' norms and
PACT's per-matrix statistics (:func:`pact_jax.lbw_statistics`), as tables or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pact_jax.cli_config import _SCOPE_KEYS, UsageError, _flag, _scope_kwargs


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
