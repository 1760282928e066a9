"""mergekit-style configs: a mergekit YAML becomes a pact_jax merge with mergekit's numbers.

A config with ``merge_method:`` or ``models:`` at its top is a mergekit config
(pact_jax's own configs have neither key). :func:`translate` maps it to the
settings of a pact_jax recipe, with mergekit 0.1.5's conventions
(:data:`pact_jax.merges.CONVENTIONS`); docs/mergekit.md sets both side by side::

    plan = pact_jax.mergekit.load("ties.yml")
    merge = plan.make_merge()                     # recipes.make_merge with the plan's settings
    params = merge(pretrained, finetuned, key=jax.random.key(0))

or ``pact-jax merge ties.yml OUT_DIR`` (as ``mergekit-yaml ties.yml OUT_DIR``).

Supported: ``models:`` (each ``model:`` and ``parameters:`` ``weight``,
``density``), ``base_model:``, ``merge_method:`` ``linear``,
``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, top-level
``parameters:`` (``normalize``, ``lambda``, ``rescale``, ``int8_mask``, and
``weight`` / ``density`` as defaults of the models'), ``dtype:`` and
``out_dtype:`` (the output's dtype). Anything else is refused by name.
Model paths are read as mergekit reads them: as given, relative to the working
directory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MergekitPlan", "SUPPORTED_METHODS", "is_mergekit_config", "load", "translate"]

# mergekit's merge_method -> pact_jax's recipe (pact_jax.recipes.ALL_METHODS).
SUPPORTED_METHODS: Mapping[str, str] = {
    "linear": "task_arithmetic",  # sum_i w_i theta_i / sum_i w_i, as weights w_t / W on the task vectors
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_task_arithmetic",
}
_TOP_KEYS = ("models", "base_model", "merge_method", "parameters", "dtype", "out_dtype")
_REFUSED_KEYS = {
    "slices": "layer slices (a merge of parts of models) are not supported; list whole models under models:",
    "modules": "modules: (per-module merges) are not supported; list whole models under models:",
    "tokenizer_source": "pact_jax merges weights only and builds no tokenizer",
    "tokenizer": "pact_jax merges weights only and builds no tokenizer",
    "chat_template": "pact_jax merges weights only and writes no chat template",
}
# mergekit 0.1.5's parameters per method: shared ones (top-level parameters:) with their defaults,
# and per-model ones (a model's parameters:, falling back to the top-level ones).
_GTA_SHARED = {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}
_SHARED_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": _GTA_SHARED,
    "ties": {**_GTA_SHARED, "normalize": True},
    "dare_ties": {**_GTA_SHARED, "rescale": True},
    "dare_linear": {**_GTA_SHARED, "rescale": True},
}
_PER_MODEL = {"linear": ("weight",)}
_PER_MODEL_GTA = ("weight", "density")
_BOOL_PARAMS = ("int8_mask", "normalize", "rescale")
_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True)
class MergekitPlan:
    """A mergekit config as a pact_jax merge.

    Attributes:
      merge_method: mergekit's method name.
      method: the pact_jax recipe (:data:`pact_jax.recipes.ALL_METHODS`).
      pretrained: the base model's path (``linear`` without ``base_model``: the first model).
      finetuned: the other models' paths, in the config's order.
      weights: one weight per fine-tuned model, as the recipe's merger takes them.
      method_kwargs: the recipe's other hyperparameters (``convention='mergekit'`` among them).
      alpha: scale of the merged update (mergekit's ``lambda``; 1 for ``linear``).
      output_dtype: ``out_dtype`` or ``dtype``, or ``None`` (the inputs' dtype).
      notes: what the translation ignored, one sentence each.
    """

    merge_method: str
    method: str
    pretrained: str
    finetuned: tuple[str, ...]
    weights: tuple[float, ...]
    method_kwargs: Mapping[str, Any]
    alpha: float
    output_dtype: str | None = None
    notes: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        """The keys of a pact_jax config (what ``pact-jax merge`` reads from its own YAML)."""
        out: dict[str, Any] = {
            "pretrained": self.pretrained,
            "finetuned": list(self.finetuned),
            "method": self.method,
            "alpha": self.alpha,
            "weights": list(self.weights),
            "method_args": dict(self.method_kwargs),
            "mergekit_method": self.merge_method,
            "mergekit_notes": list(self.notes),
        }
        if self.output_dtype is not None:
            out["output_dtype"] = self.output_dtype
        return out

    def make_merge(self, **kwargs: Any):
        """:func:`pact_jax.recipes.make_merge` of the plan (``kwargs``: its other arguments, e.g.
        ``rules``, ``budget_bytes``, ``use_pact``)."""
        from pact_jax import recipes

        method_kwargs = {**self.method_kwargs, "weights": self.weights}
        return recipes.make_merge(self.method, method_kwargs=method_kwargs, alpha=self.alpha, **kwargs)


def is_mergekit_config(data: Any) -> bool:
    """Whether a parsed YAML document is a mergekit config (it has ``merge_method`` or ``models``)."""
    return isinstance(data, Mapping) and ("merge_method" in data or "models" in data)


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """The YAML document at ``path``; ``ValueError`` naming ``what`` and ``path`` when it cannot be
    read or parsed (the one reader of both our configs and mergekit's)."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {path} is not valid YAML: {e}") from e


def load(path: str | Path) -> MergekitPlan:
    """Reads a mergekit YAML file and :func:`translate` s it."""
    return translate(read_yaml(path, "mergekit config"), where=f"mergekit config {path}")


def translate(data: Mapping[str, Any], *, where: str = "mergekit config") -> MergekitPlan:
    """A parsed mergekit config -> :class:`MergekitPlan`; ``ValueError`` (starting with ``where``)
    names the first key, model or parameter pact_jax does not take."""

    def fail(msg: str) -> ValueError:
        return ValueError(f"{where}: {msg}")

    if not isinstance(data, Mapping):
        raise fail(f"must be a mapping of keys to values, not {type(data).__name__}")
    for key in data:
        if key in _REFUSED_KEYS:
            raise fail(f"key '{key}' is not supported: {_REFUSED_KEYS[key]}")
        if key not in _TOP_KEYS:
            raise fail(f"unknown key '{key}'; a mergekit config here takes {list(_TOP_KEYS)}")
    name = data.get("merge_method")
    if not isinstance(name, str):
        raise fail("merge_method: is missing (one of " + ", ".join(SUPPORTED_METHODS) + ")")
    if name not in SUPPORTED_METHODS:
        raise fail(f"merge_method '{name}' is not supported; pact_jax runs mergekit's {', '.join(SUPPORTED_METHODS)}")
    shared_defaults = _SHARED_DEFAULTS[name]
    per_model = _PER_MODEL.get(name, _PER_MODEL_GTA)
    top = _mapping(data.get("parameters"), "parameters", fail)
    for key in top:
        if key not in shared_defaults and key not in per_model:
            raise fail(f"parameters: '{key}' is not a parameter of mergekit's {name} "
                       f"(it takes {sorted({*shared_defaults, *per_model})})")  # fmt: skip
    for key, value in top.items():
        _value(value, key, "parameters", fail)
    models = _models(data.get("models"), per_model, shared_defaults, name, fail)
    base = data.get("base_model")
    if base is not None and (not isinstance(base, str) or not base):
        raise fail(f"base_model must be a path, got {base!r}")
    shared = {k: _value(top[k], k, "parameters", fail) if k in top else d for k, d in shared_defaults.items()}
    notes = []
    if "int8_mask" in top:
        notes.append("int8_mask only sets the dtype of mergekit's sign mask (memory); it changes no number: ignored")
    output_dtype = _dtype(data, fail)
    if data.get("dtype") is not None:
        notes.append(f"mergekit computes in dtype {data['dtype']}; pact_jax computes in float32 and writes "
                     f"{output_dtype}")  # fmt: skip

    def param(model: tuple[str, Mapping[str, Any]], key: str, default: Any = None) -> Any:
        path, params = model
        if key in params:
            return _value(params[key], key, f"models: {path}: parameters", fail)
        if key in top:
            return _value(top[key], key, "parameters", fail)
        if default is None:
            raise fail(f"model '{path}' has no {key} (mergekit requires parameters: {key}: per model, or a "
                       f"top-level parameters: {key}: for all)")  # fmt: skip
        return default

    if name == "linear":
        return _linear(name, models, base, param, shared["normalize"], output_dtype, notes, fail)

    if base is None:
        raise fail(f"merge_method {name} needs base_model: (the model whose differences are merged)")
    others = [m for m in models if m[0] != base]
    if not others:
        raise fail(f"merge_method {name} needs at least one model besides base_model {base!r}")
    weights = tuple(param(m, "weight") for m in others)
    densities = tuple(param(m, "density", 1.0) for m in others)
    for (path, _), d in zip(others, densities):
        if d <= 0:
            raise fail(f"model '{path}': density {d} keeps nothing; pact_jax takes densities in (0, 1]")
    densities = tuple(min(d, 1.0) for d in densities)  # mergekit keeps every entry for density >= 1
    if any(m[0] == base for m in models) and any(m[1] for m in models if m[0] == base):
        notes.append(f"the parameters of base_model {base} are unused by mergekit's {name}: ignored")
    kwargs: dict[str, Any] = {"normalize": shared["normalize"]}
    if name == "task_arithmetic":
        if any(d != 1.0 for d in densities):
            notes.append("density has no effect in mergekit's task_arithmetic (it sparsifies nothing): ignored")
    elif name == "ties":
        if shared["rescale"]:
            raise fail("parameters: rescale: true with ties (an L1 rescale of the trimmed task vectors) is not "
                       "supported; pact_jax rescales only DARE's (dare_ties, dare_linear)")  # fmt: skip
        kwargs.update(density=_one_or_each(densities), convention="mergekit")
    else:  # dare_ties, dare_linear: density is DARE's keep probability
        kwargs.update(p=_one_or_each(tuple(1.0 - d for d in densities)), rescale="l1" if shared["rescale"] else "none")
        if name == "dare_ties":
            kwargs.update(density=1.0, convention="mergekit")
    return MergekitPlan(
        merge_method=name,
        method=SUPPORTED_METHODS[name],
        pretrained=base,
        finetuned=tuple(m[0] for m in others),
        weights=weights,
        method_kwargs=kwargs,
        alpha=shared["lambda"],
        output_dtype=output_dtype,
        notes=tuple(notes),
    )


def _linear(name, models, base, param, normalize, output_dtype, notes, fail) -> MergekitPlan:
    """mergekit's linear: ``sum_i w_i theta_i / sum_i w_i`` over its inputs (the models, and
    ``base_model`` if it is not among them). With ``theta_0`` one of them, that is
    ``theta_0 + sum_{t != 0} (w_t / W) tau_t``: task arithmetic with weights ``w_t / W``."""
    inputs = list(models)
    if base is not None and base not in [m[0] for m in models]:
        inputs.append((base, {}))  # mergekit adds it as an input, weighted by the top-level weight
    pretrained = base if base is not None else inputs[0][0]
    weights = [param(m, "weight") for m in inputs]
    total = math.fsum(weights)
    if normalize:
        if abs(total) < 1e-8:
            raise fail(f"linear: the weights {weights} sum to 0, so the weighted mean is undefined")
        divisor = total
    else:
        if abs(total - 1.0) > 1e-6:
            raise fail(f"linear with normalize: false and weights summing to {total:g} scales the model itself "
                       "(sum_i w_i theta_i); pact_jax merges updates of one model: use normalize: true or weights "
                       "summing to 1")  # fmt: skip
        divisor = 1.0
    others = [(m, w) for m, w in zip(inputs, weights) if m[0] != pretrained]
    if not others:
        raise fail("linear needs at least two models")
    return MergekitPlan(
        merge_method=name,
        method=SUPPORTED_METHODS[name],
        pretrained=pretrained,
        finetuned=tuple(m[0] for m, _ in others),
        weights=tuple(w / divisor for _, w in others),
        method_kwargs={"normalize": False},
        alpha=1.0,
        output_dtype=output_dtype,
        notes=tuple(notes),
    )


def _mapping(value: Any, what: str, fail) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise fail(f"{what} must be a mapping, got {value!r}")
    return value


def _models(value: Any, per_model, shared, name, fail) -> list[tuple[str, Mapping[str, Any]]]:
    """``models:`` as ``[(path, parameters)]``: each entry a mapping with ``model:`` and optional ``parameters:``."""
    if not isinstance(value, list) or not value:
        raise fail("models: must be a non-empty list of {model: PATH, parameters: {...}}")
    out, seen = [], set()
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise fail(f"models[{i}] must be a mapping with a model: key, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise fail(f"models[{i}]: key(s) {extra} not supported (a model takes model: and parameters:)")
        path = entry["model"]
        if not isinstance(path, str) or not path:
            raise fail(f"models[{i}]: model must be a path, got {path!r}")
        if path in seen:
            raise fail(f"model '{path}' is listed twice")
        seen.add(path)
        params = _mapping(entry.get("parameters"), f"models: {path}: parameters", fail)
        for key in params:
            if key in shared:
                raise fail(f"models: {path}: '{key}' is a parameter of the whole merge: set it under the top-level "
                           "parameters:")  # fmt: skip
            if key not in per_model:
                raise fail(f"models: {path}: '{key}' is not a per-model parameter of mergekit's {name} "
                           f"(it takes {list(per_model)})")  # fmt: skip
            _value(params[key], key, f"models: {path}: parameters", fail)
        out.append((path, params))
    return out


def _value(value: Any, key: str, where: str, fail) -> Any:
    """A scalar parameter value of mergekit's type for ``key`` (bool or finite number)."""
    if isinstance(value, (list, Mapping)):
        raise fail(f"{where}: {key}: gradients and filtered values (lists, {{filter, value}}) are not supported; "
                   "give one number")  # fmt: skip
    if key in _BOOL_PARAMS:
        if not isinstance(value, bool):
            raise fail(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _dtype(data: Mapping[str, Any], fail) -> str | None:
    chosen = None
    for key in ("dtype", "out_dtype"):  # out_dtype wins, as in mergekit
        value = data.get(key)
        if value is None:
            continue
        name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
        if name not in _DTYPES:
            raise fail(f"{key}: {value!r} is not one of {list(_DTYPES)}")
        chosen = name
    return chosen


def _one_or_each(values: tuple[float, ...]) -> float | tuple[float, ...]:
    return values[0] if len(set(values)) == 1 else values
