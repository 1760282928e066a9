"""Checkpoint layouts: how a leaf stores a linear map, and how it is seen as a matrix.

The one place that knows the difference between a Flax and a PyTorch / Hugging
Face checkpoint; :class:`pact_jax.LeafRules`, the CLI and the readers ask it.

* ``"flax"``: a Dense kernel is ``(d_in, d_out)``, a Conv kernel
  ``(*window, c_in, c_out)``; the matrix view keeps the output axis as the
  columns, ``(prod(window) * c_in, c_out)``, and the layer's input space is
  the view's LEFT side (rows). A 3-D leaf is a DenseGeneral
  ``(d, heads, head_dim) -> (d, heads * head_dim)`` unless its module's name
  says it is a convolution (``Conv_0/kernel``, ``conv1/kernel``):
  a 1-D conv ``(k, c_in, c_out) -> (k * c_in, c_out)``.
* ``"torch"``: a Linear weight is ``(d_out, d_in)``, a Conv weight
  ``(c_out, c_in, *window)``; the view is ``(d_out, c_in * prod(window))``
  and the input space is its RIGHT side (columns). Embedding tables
  (``word_embeddings.weight``, ``wte.weight``: ``(vocab, d)`` in both
  frameworks) are the exception: their input (the one-hot token) is the rows.

Flax NNX states name every leaf after its variable (``linear/kernel/value``);
rules are matched against the path without that suffix
(:func:`rule_path`), so ``bias/value`` is a bias and ``out/kernel/value`` an
attention output kernel.

:func:`detect_layout` reads a checkpoint's layout: a safetensors header saying
``{"format": "pt"}`` is PyTorch; otherwise, matrices named ``.../weight`` (the
PyTorch convention) rather than ``.../kernel`` (Flax) mean PyTorch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Layout = Literal["flax", "torch"]
LayoutChoice = Literal["auto", "flax", "torch"]
Side = Literal["left", "right"]
LAYOUTS: tuple[str, ...] = ("flax", "torch")
CHOICES: tuple[str, ...] = ("auto", "flax", "torch")

__all__ = [
    "CHOICES",
    "LAYOUTS",
    "Layout",
    "LayoutChoice",
    "check_layout",
    "default_row_axes",
    "detect_layout",
    "input_side",
    "parse_row_axes",
    "rule_path",
    "to_flax_axes",
]

# Flax NNX stores each parameter as a Variable whose pytree key is ``value``
# (``raw_value`` in flax < 0.11).
NNX_SUFFIX = re.compile(r"/(value|raw_value)$")
# A Flax convolution kernel: the module's own name mentions conv (linen ``Conv_0``, ``ConvTranspose_0``).
FLAX_CONV = re.compile(r"(?i)(^|/)[^/]*conv[^/]*/kernel$")
# Embedding tables, stored ``(vocab, d)`` by both frameworks.
EMBEDDING = re.compile(r"(?i)(^|/)([^/]*(embed|wte|wpe)[^/]*/weight|shared/weight|embedding)$")
_TORCH_NAME = re.compile(r"(^|/)weight$")
_FLAX_NAME = re.compile(r"(^|/)kernel$")


def check_layout(layout: str, *, allow_auto: bool = False, what: str = "layout") -> str:
    """``layout`` if it is one of ``'flax'``, ``'torch'`` (and ``'auto'`` when allowed), else ValueError."""
    choices = CHOICES if allow_auto else LAYOUTS
    if layout not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {layout!r}.")
    return layout


def rule_path(path: str) -> str:
    """``path`` without a Flax NNX variable suffix: ``'attn/out/kernel/value' -> 'attn/out/kernel'``."""
    return NNX_SUFFIX.sub("", path)


def is_conv(path: str, shape: Sequence[int], layout: Layout) -> bool:
    """A convolution kernel: Flax, a leaf of 4+ dims or a conv-named module's kernel of 3+;
    torch, any weight of 3+ dims (``nn.Conv1d/2d/3d``)."""
    if layout == "torch":
        return len(shape) >= 3 and not EMBEDDING.search(rule_path(path))
    return len(shape) >= 4 or (len(shape) == 3 and bool(FLAX_CONV.search(rule_path(path))))


def default_row_axes(path: str, shape: Sequence[int], layout: Layout) -> int:
    """``k``: the matrix view of a leaf of ``shape`` is ``(prod(shape[:k]), prod(shape[k:]))``.

    Flax: all but the output axis for a conv kernel ``(*window, c_in, c_out)``, else 1 (Dense
    ``(in, out)``, DenseGeneral ``(d, heads, head_dim)``). Torch: 1, the output axis, for
    ``(d_out, d_in)`` and ``(c_out, c_in, *window)`` alike.
    """
    if layout == "torch":
        return 1
    return len(shape) - 1 if is_conv(path, shape, layout) else 1


def input_side(path: str, layout: Layout) -> Side:
    """The side of the matrix view of ``path`` that is the layer's input space: ``'left'``
    (rows) for Flax kernels and for embedding tables, ``'right'`` (columns) for torch weights."""
    if layout == "flax" or EMBEDDING.search(rule_path(path)):
        return "left"
    return "right"


def to_flax_axes(path: str, shape: Sequence[int], layout: Layout) -> tuple[int, ...]:
    """The permutation of axes that turns a leaf stored in ``layout`` into its Flax order:
    ``leaf.transpose(axes)``. Identity for Flax leaves, 1-D leaves and embedding tables; torch
    ``(d_out, d_in) -> (d_in, d_out)``, ``(c_out, c_in, *window) -> (*window, c_in, c_out)``.

    Used where a result depends on the order of a leaf's entries (DARE's random mask), so that
    a model gives the same merge in either layout.
    """
    n = len(shape)
    if layout == "flax" or n < 2 or EMBEDDING.search(rule_path(path)):
        return tuple(range(n))
    return (*range(2, n), 1, 0)


def _names_layout(paths_and_shapes: Mapping[str, Sequence[int]]) -> Layout:
    torch = flax = 0
    for path, shape in paths_and_shapes.items():
        if len(shape) < 2:
            continue
        p = rule_path(path)
        torch += bool(_TORCH_NAME.search(p))
        flax += bool(_FLAX_NAME.search(p))
    return "torch" if torch > flax else "flax"


def detect_layout(source: Any) -> Layout:
    """The layout of a checkpoint: a :class:`pact_jax.io.base.CheckpointReader`, a path to one,
    or a parameter pytree / ``{path: array}`` mapping.

    1. A safetensors header's ``__metadata__`` ``"format"``: ``"pt"`` (PyTorch, the
       ``save_file`` of ``transformers`` and ``safetensors.torch``) is torch; ``"flax"``
       is flax, unless pact_jax itself wrote it (its writers stamped every output
       ``"flax"`` whatever the input's layout).
    2. Otherwise the leaf names: more matrices (leaves of 2+ dims) named ``.../weight``
       than ``.../kernel`` is torch, anything else flax.
    """
    import os

    from pact_jax.io.base import CheckpointReader

    if isinstance(source, (str, os.PathLike)):
        from pact_jax import io

        with io.open_reader(source) as reader:
            return detect_layout(reader)
    if isinstance(source, CheckpointReader):
        header = getattr(source, "header_metadata", None)
        info = header() if header is not None else {}
        fmt = str(info.get("format", "")).lower()
        if fmt in ("pt", "torch", "pytorch"):
            return "torch"
        if fmt == "flax" and info.get("producer") != "pact_jax":
            return "flax"
        return _names_layout({p: s.shape for p, s in source.metadata().items()})
    from pact_jax.tree import leaves_with_paths

    # A flat {"a/b/weight": array} mapping flattens to the same paths as the nested tree.
    return _names_layout({p: getattr(leaf, "shape", ()) for p, leaf in leaves_with_paths(source)})


def parse_row_axes(spec: Any, what: str = "row_axes") -> tuple[tuple[str, int], ...]:
    """``row_axes`` entries from a CLI / YAML spec: ``["REGEX=K", ...]``, ``{REGEX: K, ...}``
    or ``[[REGEX, K], ...]`` -> ``((REGEX, K), ...)`` (order kept: the first entry that applies wins).
    Each regex must compile and each ``K`` be an integer >= 1."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, (list, tuple)):
        items = []
        for entry in spec:
            if isinstance(entry, str):
                if "=" not in entry:
                    raise ValueError(f"{what}: expected REGEX=K, got {entry!r}.")
                regex, k = entry.rsplit("=", 1)
                items.append((regex, k.strip()))
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                items.append(tuple(entry))
            else:
                raise ValueError(f"{what}: expected REGEX=K or [REGEX, K], got {entry!r}.")
    else:
        raise ValueError(f"{what}: expected a mapping {{REGEX: K}} or a list of REGEX=K, got {spec!r}.")
    out = []
    for regex, k in items:
        try:
            re.compile(regex)
        except (re.error, TypeError) as e:
            raise ValueError(f"{what}: {regex!r} is not a regular expression ({e}).") from None
        try:
            k_int = int(k)
        except (TypeError, ValueError):
            k_int = 0
        if isinstance(k, bool) or k_int < 1 or str(k).strip() != str(k_int):
            raise ValueError(f"{what}: the number of row axes of {regex!r} must be an integer >= 1, got {k!r}.")
        out.append((str(regex), k_int))
    return tuple(out)
