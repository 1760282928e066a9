"""Synthetic parameter trees shaped like real models, and fine-tuned variants of them.

Shapes and leaf names follow the public checkpoints (values are synthetic):

* ``vit_b32`` / ``vit_l14``: Flax ViT (google-research ``vision_transformer``)
  under ``params/``: ``embedding/kernel`` (patch conv ``(p, p, 3, d)``) and
  ``bias``, ``cls`` ``(1, 1, d)``, ``Transformer/posembed_input/pos_embedding``
  ``(1, N + 1, d)``, per block ``Transformer/encoderblock_i/``
  ``LayerNorm_0``, ``MultiHeadDotProductAttention_1/{query,key,value}/kernel``
  ``(d, heads, head_dim)`` (+ bias ``(heads, head_dim)``), ``.../out/kernel``
  ``(heads, head_dim, d)`` (+ bias ``(d,)``), ``LayerNorm_2``,
  ``MlpBlock_3/Dense_0`` ``(d, 4d)``, ``MlpBlock_3/Dense_1`` ``(4d, d)``; then
  ``Transformer/encoder_norm``. No classification head: heads are
  task-specific and are never merged.
* ``t5_base``: T5X naming (T5 1.0 base: ReLU MLP, logits tied to the
  embedding): ``token_embedder/embedding`` ``(32128, 768)``,
  ``{encoder,decoder}/relpos_bias/rel_embedding`` ``(heads, 32)``,
  ``encoder/layers_i/{pre_attention_layer_norm, attention/{query,key,value,out},
  pre_mlp_layer_norm, mlp/wi, mlp/wo}``, ``decoder/layers_i/`` with
  ``self_attention`` and ``encoder_decoder_attention``, and final norms. T5X
  stores attention kernels flattened to 2-D ``(d, heads*head_dim)`` /
  ``(heads*head_dim, d)``; no biases.

Leaf rules (:func:`rules_for`): class / position / token embeddings and T5's
relative position tables are *averaged* (the common choice); every other
leaf with at least two dimensions, biases excepted, is a matrix.

Values, per matrix leaf seen as ``(m, n)`` (``p = min(m, n)``):

* pre-trained ``W0 = G / sqrt(m) + U0 diag(s0) V0^T``: a Gaussian bulk (spectral
  norm ``edge ~ 1 + sqrt(n/m)``) plus ``k = round(0.1 p)`` spikes
  ``s0 = edge * linspace(8, 4, k)``, so the top-``k`` subspace (PACT's
  ``pretrained_rank=0.1``) is well separated from the bulk;
* task ``t``: ``tau_t = U_t diag(s_t) V_t^T + sigma N`` of rank
  ``r = round(0.05 p)`` (PACT's ``task_rank=0.05``), ``s_t = 0.5 edge *
  linspace(1, 0.5, r)``; ``U_t`` spans ``a = max(1, r // 4)`` randomly chosen
  spike directions of ``U0`` and ``r - a`` random directions orthogonal to
  ``U0``; the noise has spectral norm ``0.05 edge``, a fifth of ``s_t``'s
  smallest value.

So PACT's cosines (DESIGN §1a step 3) sit near 0 (spikes a task uses) or near
1 (the others), far from the default ``align_threshold=0.9``, and its
subspaces have wide spectral gaps: float32 implementations of PACT agree, and
the randomized SVD finds them. (TSV-M / Iso-CTS after PACT can still be
ill-posed: see ``benchmarks/speed.py``.) Other leaves: LayerNorm scales ``1 + 0.02 N``,
others ``0.02 N``; task updates ``0.01 N`` (``0.002 N`` for averaged leaves).

Everything is a pure function of a ``jax.random`` key: leaf ``path`` draws
(pre-trained: stream 0, task ``t``: stream ``t + 1``) from a NumPy generator
seeded with the bits of ``fold_in(fold_in(key, crc32(path)), stream)``; NumPy
draws need no compilation per leaf shape.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterator
from typing import Literal

import jax
import numpy as np

import pact_jax

Flat = dict[str, np.ndarray]
"""A parameter tree flattened to ``{"a/b/kernel": array}`` (insertion order = leaf order)."""

PRETRAINED_RANK = 0.1  # spikes per matrix, as a fraction of min(m, n): PACT's default pretrained_rank
TASK_RANK = 0.05  # rank of each task update: PACT's default task_rank


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Architecture hyperparameters. ``depth``: ViT blocks, or T5 layers per stack."""

    name: str
    family: Literal["vit", "t5"]
    width: int
    depth: int
    mlp: int
    heads: int
    patch: int = 32
    image: int = 224
    vocab: int = 32128
    rel_buckets: int = 32

    def replace(self, *, depth: int | None = None, width: int | None = None) -> ModelSpec:
        """The same family with fewer/more blocks, or another width (MLP ``4 w``, heads ``w / 64``)."""
        spec = self
        if depth is not None:
            spec = dataclasses.replace(spec, depth=depth)
        if width is not None:
            heads = max(1, width // 64)
            spec = dataclasses.replace(spec, width=width, mlp=4 * width, heads=heads)
        return spec

    @property
    def label(self) -> str:
        return f"{self.name}[d={self.depth},w={self.width}]"


SPECS: dict[str, ModelSpec] = {
    "vit_b32": ModelSpec("vit_b32", "vit", width=768, depth=12, mlp=3072, heads=12, patch=32),
    "vit_l14": ModelSpec("vit_l14", "vit", width=1024, depth=24, mlp=4096, heads=16, patch=14),
    "t5_base": ModelSpec("t5_base", "t5", width=768, depth=12, mlp=3072, heads=12),
    # Tiny variants for tests and --quick.
    "vit_tiny": ModelSpec("vit_tiny", "vit", width=32, depth=2, mlp=128, heads=4, patch=4, image=16),
    "t5_tiny": ModelSpec("t5_tiny", "t5", width=32, depth=1, mlp=64, heads=4, vocab=100, rel_buckets=8),
}

AVERAGE: dict[str, str] = {
    "vit": r"(^|/)(cls|pos_embedding)$",
    "t5": r"(token_embedder/embedding|rel_embedding)$",
}
"""Per family, the regular expression of the leaves merged by the plain task mean."""


def rules_for(spec: ModelSpec) -> pact_jax.LeafRules:
    """pact_jax leaf rules for ``spec``: embeddings averaged; T5X's 2-D ``out/kernel``
    keeps its ``(heads*head_dim, d)`` shape (the default ``row_axes`` entry is for
    Flax's 3-D ``(heads, head_dim, d)`` attention output)."""
    if spec.family == "t5":
        return pact_jax.LeafRules(average=AVERAGE["t5"], row_axes=((r"(^|/)out/kernel$", 1),))
    return pact_jax.LeafRules(average=AVERAGE["vit"])


# --------------------------------------------------------------------------
# Shapes


def _vit_shapes(s: ModelSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    d, h = s.width, s.heads
    hd = d // h
    tokens = (s.image // s.patch) ** 2 + 1
    yield "params/embedding/kernel", (s.patch, s.patch, 3, d)
    yield "params/embedding/bias", (d,)
    yield "params/cls", (1, 1, d)
    yield "params/Transformer/posembed_input/pos_embedding", (1, tokens, d)
    for i in range(s.depth):
        b = f"params/Transformer/encoderblock_{i}"
        yield f"{b}/LayerNorm_0/scale", (d,)
        yield f"{b}/LayerNorm_0/bias", (d,)
        for name in ("query", "key", "value"):
            yield f"{b}/MultiHeadDotProductAttention_1/{name}/kernel", (d, h, hd)
            yield f"{b}/MultiHeadDotProductAttention_1/{name}/bias", (h, hd)
        yield f"{b}/MultiHeadDotProductAttention_1/out/kernel", (h, hd, d)
        yield f"{b}/MultiHeadDotProductAttention_1/out/bias", (d,)
        yield f"{b}/LayerNorm_2/scale", (d,)
        yield f"{b}/LayerNorm_2/bias", (d,)
        yield f"{b}/MlpBlock_3/Dense_0/kernel", (d, s.mlp)
        yield f"{b}/MlpBlock_3/Dense_0/bias", (s.mlp,)
        yield f"{b}/MlpBlock_3/Dense_1/kernel", (s.mlp, d)
        yield f"{b}/MlpBlock_3/Dense_1/bias", (d,)
    yield "params/Transformer/encoder_norm/scale", (d,)
    yield "params/Transformer/encoder_norm/bias", (d,)


def _t5_shapes(s: ModelSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    d = s.width

    def attention(prefix: str) -> Iterator[tuple[str, tuple[int, ...]]]:
        for name in ("query", "key", "value", "out"):
            yield f"{prefix}/{name}/kernel", (d, d)

    yield "token_embedder/embedding", (s.vocab, d)
    for stack in ("encoder", "decoder"):
        yield f"{stack}/relpos_bias/rel_embedding", (s.heads, s.rel_buckets)
        for i in range(s.depth):
            b = f"{stack}/layers_{i}"
            if stack == "encoder":
                yield f"{b}/pre_attention_layer_norm/scale", (d,)
                yield from attention(f"{b}/attention")
            else:
                yield f"{b}/pre_self_attention_layer_norm/scale", (d,)
                yield from attention(f"{b}/self_attention")
                yield f"{b}/pre_cross_attention_layer_norm/scale", (d,)
                yield from attention(f"{b}/encoder_decoder_attention")
            yield f"{b}/pre_mlp_layer_norm/scale", (d,)
            yield f"{b}/mlp/wi/kernel", (d, s.mlp)
            yield f"{b}/mlp/wo/kernel", (s.mlp, d)
        yield f"{stack}/{stack}_norm/scale", (d,)


def param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every leaf, in checkpoint order."""
    return dict(_vit_shapes(spec) if spec.family == "vit" else _t5_shapes(spec))


def num_params(spec: ModelSpec) -> int:
    return sum(math.prod(s) for s in param_shapes(spec).values())


def matrix_views(spec: ModelSpec) -> list[tuple[str, int, int]]:
    """``[(path, m, n)]`` of the matrix leaves under :func:`rules_for`."""
    rules = rules_for(spec)
    return [
        (p, *rules.matrix_shape(p, s)) for p, s in param_shapes(spec).items() if rules.kind(p, s) == "matrix"
    ]


def nest(flat: dict[str, object]) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def flatten(tree: dict) -> dict[str, object]:
    """Inverse of :func:`nest` (paths as :func:`pact_jax.tree.leaves_with_paths` writes them)."""
    return dict(pact_jax.tree.leaves_with_paths(tree))


# --------------------------------------------------------------------------
# Values


def _rank(fraction: float, m: int, n: int) -> int:
    return max(1, int(round(fraction * min(m, n))))


def _rng(key: jax.Array, path: str, stream: int) -> np.random.Generator:
    """NumPy generator of stream ``stream`` (0: pre-trained, ``t + 1``: task ``t``) of leaf ``path``.

    Seeded from the bits of ``fold_in(fold_in(key, crc32(path)), stream)``, so the
    values are a pure function of the jax key; drawing in NumPy avoids compiling
    a generator per leaf shape.
    """
    k = jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF), stream)
    return np.random.default_rng(np.asarray(jax.random.key_data(k), np.uint32).tolist())


def _orthonormal(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((m, k), dtype=np.float32))[0]


def _edge(m: int, n: int) -> float:
    return 1.0 + math.sqrt(n / m)


def _pretrained_matrix(rng: np.random.Generator, m: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(W0 (m, n), U0 (m, k))``."""
    u0, v0 = _orthonormal(rng, m, k), _orthonormal(rng, n, k)
    s0 = (_edge(m, n) * np.linspace(8.0, 4.0, k)).astype(np.float32)
    w0 = rng.standard_normal((m, n), dtype=np.float32)
    w0 *= np.float32(1.0 / math.sqrt(m))
    w0 += (u0 * s0) @ v0.T
    return w0, u0


def _task_matrix(rng: np.random.Generator, u0: np.ndarray, m: int, n: int, r: int) -> np.ndarray:
    """``tau (m, n)``: rank ``r`` (``a`` directions from ``U0``, the rest orthogonal to it) plus noise."""
    k = u0.shape[1]
    a = min(k, max(1, r // 4))
    used = rng.choice(k, a, replace=False)
    g = rng.standard_normal((m, r - a), dtype=np.float32)
    g -= u0 @ (u0.T @ g)
    ut = np.linalg.qr(np.concatenate([u0[:, used], g], axis=1))[0]
    vt = _orthonormal(rng, n, r)
    edge = _edge(m, n)
    st = (0.5 * edge * np.linspace(1.0, 0.5, r)).astype(np.float32)
    tau = rng.standard_normal((m, n), dtype=np.float32)
    tau *= np.float32(0.05 * edge / (math.sqrt(m) + math.sqrt(n)))
    tau += (ut * st) @ vt.T
    return tau


def make_models(spec: ModelSpec, tasks: int, key: jax.Array) -> tuple[Flat, list[Flat]]:
    """``(pretrained, [finetuned_1 .. finetuned_T])`` as flat dicts of float32 NumPy arrays.

    ``finetuned_t = pretrained + tau_t`` with the task updates described in the
    module docstring; deterministic in ``key``.
    """
    rules = rules_for(spec)
    pre: Flat = {}
    fts: list[Flat] = [{} for _ in range(tasks)]
    for path, shape in param_shapes(spec).items():
        rng0 = _rng(key, path, 0)
        kind = rules.kind(path, shape)
        if kind == "matrix":
            m, n = rules.matrix_shape(path, shape)
            w0, u0 = _pretrained_matrix(rng0, m, n, _rank(PRETRAINED_RANK, m, n))
            r = _rank(TASK_RANK, m, n)
        else:
            w0 = rng0.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            if path.endswith("/scale"):
                w0 += 1.0
            amp = np.float32(0.002 if kind == "average" else 0.01)
        w0 = w0.reshape(shape)
        pre[path] = w0
        for t, ft in enumerate(fts):
            rng = _rng(key, path, t + 1)
            if kind == "matrix":
                tau = _task_matrix(rng, u0, m, n, r)
            else:
                tau = amp * rng.standard_normal(shape, dtype=np.float32)
            ft[path] = w0 + tau.reshape(shape)
    return pre, fts


def tree_bytes(flat: dict[str, object]) -> int:
    """Total bytes of the leaves of a flat tree."""
    return int(sum(x.nbytes for x in flat.values()))
