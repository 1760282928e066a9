"""PEFT LoRA adapters: read, bind to a base checkpoint, write (issue 16).

A PEFT adapter folder holds ``adapter_config.json`` and
``adapter_model.safetensors`` (``adapter_model.bin`` is read only where torch
is installed) with keys ``base_model.model.<module>.lora_A.weight (r, d_in)``
and ``.lora_B.weight (d_out, r)``; the update of the module's torch weight
``(d_out, d_in)`` is ``s · B A``, ``s = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), ``r`` and ``lora_alpha`` per module from ``rank_pattern`` /
``alpha_pattern`` by PEFT's rule (the first pattern ``p`` in the file's
order with ``re.match(rf"(.*\\.)?({p})$", module)``). Also read:
``fan_in_fan_out`` (the base stores the weight ``(d_in, d_out)``, GPT-2's
``Conv1D``), embedding LoRA (``lora_embedding_A (r, num)``,
``lora_embedding_B (dim, r)``, update ``s (B A)^T``), ``lora_B.bias`` (update
of the module's bias, ``s · bias``), and full tensors (``modules_to_save``,
``bias: all``): their task vector is ``saved - base``. Refused with a message
naming them: other PEFT types (LoHa, LoKr, IA3, AdaLoRA, ...), DoRA and the
other LoRA variants, LoRA on convolutions, trainable tokens, layer replication.

:func:`read_adapter` reads a folder alone (:class:`PeftAdapter`, keyed by
PEFT module names); :func:`bind_adapter` / :func:`load_adapter` map it onto a
base checkpoint's leaf paths (HF torch names ``<module>/weight``, or Flax
``<module>/kernel`` stored transposed; a leading model prefix on either side
is matched by path suffix), checking every shape. :func:`save_adapter`
writes a folder PEFT loads. Merging adapters into their base on disk,
group of leaves by group, is :mod:`pact_jax.io.lora_merge`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pact_jax.io.base import CheckpointError, CheckpointReader, SEP, publish, remove, staging_path
from pact_jax.layout import Layout, detect_layout
from pact_jax.lora import LoraFactors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."

# LoraConfig fields that change what the saved tensors mean (PEFT's LoRA variants and friends).
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
}
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)")
_EMBED_KEY = re.compile(r"(?P<module>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?")


@dataclasses.dataclass(frozen=True)
class AdapterModule:
    """One adapted module: ``factors`` in the torch frame of its weight (``(d_out, d_in)``; for an
    embedding ``(num_embeddings, dim)``), ``kind`` ``'linear'`` or ``'embedding'``, and
    ``lora_B.bias`` (unscaled) if the adapter trained one."""

    name: str
    factors: LoraFactors
    kind: Literal["linear", "embedding"] = "linear"
    bias: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA adapter folder as read: its config, its modules by PEFT module name
    (``model.layers.0.self_attn.q_proj``), and its full tensors by ``<module>.<param>``."""

    path: Path
    config: Mapping[str, Any]
    modules: Mapping[str, AdapterModule]
    full: Mapping[str, np.ndarray]

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def weights_file(self) -> Path:
        return self.path / (WEIGHTS if (self.path / WEIGHTS).exists() else WEIGHTS_BIN)


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter folder (a directory with ``adapter_config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the value of the first pattern ``p`` (in the
    mapping's order) with ``re.match(rf"(.*\\.)?({p})$", module)``, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG}: not a readable adapter config ({e}).") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / CONFIG}: expected a JSON object.")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CheckpointError(
            f"{folder / CONFIG}: PEFT type {config.get('peft_type')!r} is not supported; pact_jax merges LoRA "
            "adapters (peft_type LORA) only (not LoHa, LoKr, IA3, AdaLoRA, prompt tuning, ...)."
        )
    used = [what for field, what in _UNSUPPORTED_FIELDS.items() if config.get(field) not in (None, False, [], {})]
    if used:
        raise CheckpointError(f"{folder / CONFIG}: {', '.join(used)} is not supported; pact_jax merges plain LoRA "
                              "updates s * B @ A only.")
    for name in ("r", "lora_alpha"):
        if isinstance(config.get(name), bool) or not isinstance(config.get(name), (int, float)) or config[name] <= 0:
            raise CheckpointError(f"{folder / CONFIG}: '{name}' must be a positive number, got {config.get(name)!r}.")
    return config


def _read_tensors(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    file = folder / WEIGHTS
    if file.exists():
        from pact_jax.io import safetensors as st

        reader = st.Reader(file)
        flat = reader.read(list(reader.metadata()))
        return file, {st.to_key(p): v for p, v in flat.items()}
    file = folder / WEIGHTS_BIN
    if not file.exists():
        raise CheckpointError(f"{folder}: an adapter folder needs {WEIGHTS} (or {WEIGHTS_BIN}) beside {CONFIG}.")
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{file}: reading a pickled adapter needs torch, which is not installed; convert it to "
                              f"{WEIGHTS} (PEFT's save_pretrained writes it by default).") from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's unpickling errors vary
        raise CheckpointError(f"{file}: not a readable torch state dict ({e}).") from e
    return file, {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def read_adapter(folder: str | os.PathLike) -> PeftAdapter:
    """Reads a PEFT LoRA adapter folder (no base needed); see the module docstring for what is accepted."""
    folder = Path(folder)
    if not is_adapter(folder):
        raise CheckpointError(f"{folder}: not a PEFT adapter folder (no {CONFIG}).")
    config = _read_config(folder)
    file, tensors = _read_tensors(folder)
    parts: dict[str, dict[str, Any]] = {}
    full: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{file}: key '{key}' does not start with '{PREFIX}'; not a PEFT LoRA state dict.")
        rest = key[len(PREFIX):]
        m, e = _LORA_KEY.fullmatch(rest), _EMBED_KEY.fullmatch(rest)
        if m is not None:
            if value.ndim != (2 if m["param"] == "weight" else 1):
                kind = "convolution" if value.ndim == 4 else f"{value.ndim}-D"
                raise CheckpointError(f"{file}: key '{key}' has shape {value.shape}: LoRA on {kind} layers is not "
                                      "supported (linear and embedding layers only).")
            slot = f"{m['ab']}_bias" if m["param"] == "bias" else m["ab"]
            parts.setdefault(m["module"], {"kind": "linear"})[slot] = (key, value)
        elif e is not None:
            parts.setdefault(e["module"], {"kind": "embedding"})[e["ab"]] = (key, value)
        elif "lora_magnitude_vector" in rest:
            raise CheckpointError(f"{file}: key '{key}' is a DoRA magnitude vector; DoRA is not supported.")
        elif ".lora_" in rest:
            raise CheckpointError(f"{file}: key '{key}' is a LoRA tensor pact_jax does not know.")
        else:  # modules_to_save / bias: a full tensor of the module
            name = re.sub(r"\.modules_to_save(\.[^.]+)?(?=\.[^.]+$)", "", rest)
            full[name] = value
    modules = {}
    for name, p in parts.items():
        if "A" not in p or "B" not in p:
            raise CheckpointError(f"{file}: module '{name}' has lora_{'A' if 'A' not in p else 'B'} missing.")
        (a_key, a), (b_key, b) = p["A"], p["B"]
        if p["kind"] == "embedding":  # delta (num, dim) = s (B A)^T = s A^T B^T
            a, b = b.T, a.T
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{file}: keys '{a_key}' {a.shape} and '{b_key}' {b.shape} disagree on the rank.")
        r = a.shape[0]
        want_r = pattern_value(config.get("rank_pattern"), name, config["r"])
        if r != want_r:
            raise CheckpointError(f"{file}: key '{a_key}' has rank {r}, but {CONFIG} gives module '{name}' "
                                  f"r = {want_r} (r / rank_pattern).")
        alpha = pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
        scale = alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r
        bias = p["B_bias"][1] if "B_bias" in p else None
        modules[name] = AdapterModule(name, LoraFactors(a, b, float(scale)), p["kind"], bias)
    if not modules and not full:
        raise CheckpointError(f"{file}: the adapter holds no tensors.")
    return PeftAdapter(folder, config, modules, full)


# --------------------------------------------------------------------------
# Binding to a base checkpoint


@dataclasses.dataclass(frozen=True)
class BoundAdapter:
    """An adapter mapped onto a base checkpoint's leaf paths (all checked against its shapes).

    Attributes:
      adapter: the adapter as read.
      factors: ``{leaf path: LoraFactors}`` in the torch frame of the module.
      layouts: ``{leaf path: 'torch' | 'flax'}``: the leaf stores the update
        ``(d_out, d_in)`` or transposed (:func:`pact_jax.lora.dense_delta`).
      modules: ``{leaf path: PEFT module name}`` (and kind) for the factors.
      full: ``{leaf path: tensor}`` full replacements, in the leaf's orientation.
      bias: ``{leaf path: s * lora_B.bias}`` task vectors of bias leaves.
    """

    adapter: PeftAdapter
    factors: Mapping[str, LoraFactors]
    layouts: Mapping[str, Layout]
    modules: Mapping[str, AdapterModule]
    full: Mapping[str, np.ndarray]
    bias: Mapping[str, np.ndarray]

    def paths(self) -> set[str]:
        return set(self.factors) | set(self.full) | set(self.bias)


class AdapterFactors(dict):
    """:func:`load_adapter`'s result: ``{leaf path: LoraFactors}`` with the binding's
    ``layouts`` (``'torch'`` / ``'flax'`` per path) and the whole :class:`BoundAdapter` as ``bound``."""

    def __init__(self, bound: BoundAdapter):
        super().__init__(bound.factors)
        self.bound = bound
        self.layouts = dict(bound.layouts)


class _Index:
    """Base leaves by (trailing module path components, leaf name), for suffix matching."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = shapes
        self.by_suffix: dict[tuple[tuple[str, ...], str], list[str]] = {}
        from pact_jax.layout import rule_path  # Flax NNX state: <module>/kernel/value

        for path in shapes:
            comps = rule_path(path).split(SEP)
            owner, leaf = tuple(comps[:-1]), comps[-1]
            for j in range(len(owner)):
                self.by_suffix.setdefault((owner[j:], leaf), []).append(path)

    def find(self, module: str, names: Iterable[str], where: str, base: Path) -> tuple[str, str]:
        """``(leaf path, leaf name)`` of ``module``'s leaf: the longest suffix of its components (a
        leading model prefix may differ) that names exactly one base leaf called one of ``names``."""
        comps = tuple(module.split("."))
        for i in range(len(comps)):
            hits = [(p, n) for n in names for p in self.by_suffix.get((comps[i:], n), [])]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise CheckpointError(
                    f"{where}: module '{module}' matches several leaves of the base checkpoint {base} "
                    f"({sorted(p for p, _ in hits)[:4]}); is this the adapter's base model?"
                )
        raise CheckpointError(
            f"{where}: no leaf of the base checkpoint {base} belongs to module '{module}' (looked for a path ending "
            f"in '{module.replace('.', SEP)}/{'|'.join(names)}'); is this the adapter's base model?"
        )


def _base_reader(base: CheckpointReader | str | os.PathLike) -> CheckpointReader:
    if isinstance(base, CheckpointReader):
        return base
    from pact_jax.io import open_reader

    return open_reader(base)


def bind_adapter(
    adapter: PeftAdapter, base: CheckpointReader | str | os.PathLike, *, layout: Layout | None = None
) -> BoundAdapter:
    """Maps ``adapter`` onto the leaves of ``base`` (a reader or a checkpoint path), checking shapes.

    A Linear module's leaf is ``<module>/weight`` or ``<module>/kernel``, stored
    as the base's layout says (:func:`pact_jax.layout.detect_layout`, or
    ``layout=``): ``(d_out, d_in)`` in a torch base, ``(d_in, d_out)`` in a Flax
    one, and the other way round with ``fan_in_fan_out`` (GPT-2's Conv1D in
    torch, FlaxConv1D in Flax); an embedding's is ``weight`` / ``embedding``
    ``(num, dim)``. Raises :class:`CheckpointError` naming the adapter file,
    the key and the base leaf when a module has no leaf or a wrong shape.
    """
    reader = _base_reader(base)
    meta = reader.metadata()
    flax_base = (layout or detect_layout(reader)) == "flax"
    index = _Index({p: tuple(s.shape) for p, s in meta.items()})
    file = adapter.weights_file
    factors, layouts, modules, full, bias = {}, {}, {}, {}, {}
    taken: dict[str, str] = {}

    def claim(path: str, what: str) -> None:
        if path in taken:
            raise CheckpointError(f"{file}: {what} and {taken[path]} both map to the base leaf '{path}'.")
        taken[path] = what

    for name, mod in adapter.modules.items():
        names = ("weight", "embedding") if mod.kind == "embedding" else ("weight", "kernel")
        path, leaf = index.find(name, names, f"{file}: module '{name}'", reader.path)
        claim(path, f"module '{name}'")
        d_out, d_in = mod.factors.b.shape[0], mod.factors.a.shape[1]
        transposed = mod.kind == "linear" and flax_base != adapter.fan_in_fan_out
        want = (d_in, d_out) if transposed else (d_out, d_in)
        got = index.shapes[path]
        if got != want:
            hint = ""
            if got == want[::-1]:
                hint = (" (its transpose fits: check fan_in_fan_out in the adapter config, or the base's layout)")
            raise CheckpointError(
                f"{file}: module '{name}' (lora_A {mod.factors.a.shape}, lora_B {mod.factors.b.shape}): the base "
                f"leaf '{path}' of {reader.path} has shape {got}, expected {want}"
                f"{' (stored transposed)' if transposed else ''}{hint}."
            )
        factors[path], layouts[path], modules[path] = mod.factors, ("flax" if transposed else "torch"), mod
        if mod.bias is not None:
            bpath, _ = index.find(name, ("bias",), f"{file}: module '{name}' lora_B.bias", reader.path)
            claim(bpath, f"module '{name}' lora_B.bias")
            if index.shapes[bpath] != mod.bias.shape:
                raise CheckpointError(f"{file}: module '{name}' lora_B.bias has shape {mod.bias.shape}, the base "
                                      f"leaf '{bpath}' {index.shapes[bpath]}.")
            bias[bpath] = mod.factors.scale * np.asarray(mod.bias, np.float32)
    for key, value in adapter.full.items():
        module, _, param = key.rpartition(".")
        names = ("weight", "kernel", "embedding", "scale") if param == "weight" else (param,)
        path, leaf = index.find(module, names, f"{file}: tensor '{key}'", reader.path)
        claim(path, f"tensor '{key}'")
        value = value.T if (leaf == "kernel" and value.ndim == 2) else value
        if index.shapes[path] != value.shape:
            raise CheckpointError(f"{file}: tensor '{key}' has shape {value.shape} (as stored in the base), the "
                                  f"base leaf '{path}' of {reader.path} {index.shapes[path]}.")
        full[path] = value
    for path in taken:
        if not np.issubdtype(np.dtype(meta[path].dtype), np.floating):
            raise CheckpointError(f"{file}: {taken[path]} maps to the base leaf '{path}' of dtype {meta[path].dtype}, "
                                  "which is not a float parameter.")
    return BoundAdapter(adapter, factors, layouts, modules, full, bias)


def load_adapter(folder: str | os.PathLike, base: CheckpointReader | str | os.PathLike) -> AdapterFactors:
    """The adapter at ``folder`` as ``{base leaf path: LoraFactors}`` (an :class:`AdapterFactors`, whose
    ``layouts`` say which leaves store the update transposed), checked against ``base``'s shapes."""
    return AdapterFactors(bind_adapter(read_adapter(folder), base))


# --------------------------------------------------------------------------
# Writing


def save_adapter(
    folder: str | os.PathLike,
    factors: Mapping[str, LoraFactors],
    *,
    base_model_name_or_path: str | None = None,
    target_modules: Iterable[str] | None = None,
    embedding_modules: Iterable[str] = (),
    fan_in_fan_out: bool = False,
    dtype: Any = np.float32,
    overwrite: bool = False,
) -> Path:
    """Writes a PEFT LoRA adapter folder, atomically.

    Args:
      folder: destination directory (must not exist unless ``overwrite``).
      factors: ``{PEFT module name: LoraFactors}`` (torch frame, unstacked).
        Each module's scale becomes its ``lora_alpha = scale * r``
        (``alpha_pattern`` / ``rank_pattern`` where modules differ).
      base_model_name_or_path: recorded in the config.
      target_modules: default: the module names (PEFT matches a full name exactly).
      embedding_modules: modules written as embedding LoRA (``lora_embedding_A/B``).
      fan_in_fan_out: the config flag (the base stores those weights transposed).
      dtype: tensor dtype on disk.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    if not factors:
        raise ValueError("save_adapter needs at least one module.")
    if (folder.exists() or folder.is_symlink()) and not overwrite:
        raise CheckpointError(f"{folder} already exists; refusing to overwrite it (pass overwrite=True).")
    embedding = set(embedding_modules)
    tensors, ranks, alphas = {}, {}, {}
    for name, f in factors.items():
        a, b = np.asarray(f.a, np.float32), np.asarray(f.b, np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"module '{name}': expected a (r, d_in) and b (d_out, r), got {a.shape}, {b.shape}.")
        ranks[name], alphas[name] = a.shape[0], float(f.scale) * a.shape[0]
        if name in embedding:
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = b.T.astype(dtype)
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = a.T.astype(dtype)
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.astype(dtype)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b.astype(dtype)
    r = max(ranks.values(), key=list(ranks.values()).count)  # the most common rank
    alpha = max(alphas.values(), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": None,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": _number(alpha),
        "lora_dropout": 0.0,
        "use_rslora": False,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "bias": "none",
        "target_modules": sorted(target_modules if target_modules is not None else factors),
        "rank_pattern": {re.escape(n): int(v) for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): _number(v) for n, v in alphas.items() if v != alpha},
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    staged = staging_path(folder)
    try:
        staged.mkdir()
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(staged / WEIGHTS),
                  metadata={"format": "pt"})
        (staged / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        publish(staged, folder, overwrite=overwrite)
    except BaseException:
        remove(staged)
        raise
    return folder


def _number(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else float(x)
