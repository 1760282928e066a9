"""T5X checkpoints written by T5X itself (tests/fixtures/t5x, from google-research/t5x).

* ``test_t5_tiny.checkpoint_0``: a legacy msgpack file, every array inline, a
  tiny T5's ``target`` and Adafactor state;
* ``tiny_t5/checkpoint_1/``: a legacy step with TensorStore arrays (its
  ``target`` is empty; ``state.param_states`` are zarr directories);
* ``tiny_orbax/1/``: an older orbax-based T5X step (aggregate ``checkpoint``
  msgpack with ``PLACEHOLDER://`` references, per-array directories, no
  ``_METADATA``; empty ``target``).

Each is read (names, shapes, dtypes and values checked against a decoding
that does not go through pact_jax: raw ``msgpack`` with the flax ndarray
extension, TensorStore opened directly), merged where it has parameters, and
written back in its layout. The fixture files are hashed before and after
every test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization

from pact_jax import io, recipes
from pact_jax.io import CheckpointError, t5x
from pact_jax.io.streaming import merge_checkpoints

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "t5x"
TINY_FILE = FIXTURES / "test_t5_tiny.checkpoint_0"
TINY_T5 = FIXTURES / "tiny_t5" / "checkpoint_1"
TINY_ORBAX = FIXTURES / "tiny_orbax" / "1"


def tree_hashes(root: Path) -> dict[str, str]:
    found = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


@pytest.fixture(autouse=True)
def inputs_untouched():
    before = tree_hashes(FIXTURES)
    assert len(before) == 12  # the 3 checkpoints (10 files), LICENSE, README.md
    yield
    assert tree_hashes(FIXTURES) == before


# --------------------------------------------------------------------------
# Decoding without pact_jax


def _ext(code: int, data: bytes):
    """flax's msgpack extensions: 1 = ndarray, 3 = NumPy scalar, as (shape, dtype name, bytes)."""
    if code in (1, 3):
        shape, name, buf = msgpack.unpackb(data, raw=True)
        dtype = jnp.bfloat16 if name == b"bfloat16" else np.dtype(name.decode())
        a = np.frombuffer(buf, dtype=dtype).reshape(shape)
        return a[()] if code == 3 else a
    raise AssertionError(f"unexpected msgpack extension {code}")


def raw_msgpack(file: Path) -> dict:
    return msgpack.unpackb(file.read_bytes(), ext_hook=_ext, raw=False, strict_map_key=False)


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict) and v and not ({"driver", "kvstore"} <= v.keys()):
            out.update(flat(v, p + "/"))
        else:
            out[p] = v
    return out


def zarr_chunks(array_dir: Path, *, shape, dtype: str, compressor: dict):
    """An array T5X wrote without its .zarray (see the fixtures' README): read with the metadata given."""
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": str(array_dir) + "/"},
        "metadata": {"shape": shape, "chunks": shape, "dtype": dtype, "compressor": compressor,
                     "order": "C", "fill_value": None, "filters": None, "zarr_format": 2},
    }  # fmt: skip
    return ts.open(spec, open=True, read=True, assume_metadata=True).result().read().result()


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def same_bytes(a: Path, b: Path) -> None:
    assert files(a) == files(b)
    for f in files(a):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def task_arithmetic(w0, tasks, *, key=None, alpha=1.0):
    """``W0 + alpha * sum_t (W_t - W0)`` leaf by leaf in NumPy: the streaming merge's I/O is under
    test here, not the merger (pact_jax's own compiles per group shape, seconds on CI)."""
    def one(a, *ts):
        a32 = np.asarray(a, np.float32)
        return (a32 + alpha * sum(np.asarray(t, np.float32) - a32 for t in ts)).astype(a.dtype)

    return jax.tree.map(one, w0, *tasks)


def perturbed(params: dict, seed: int, scale: float = 1e-2) -> dict:
    rng = np.random.default_rng(seed)
    return {p: (a + scale * rng.standard_normal(a.shape)).astype(a.dtype) for p, a in params.items()}


# --------------------------------------------------------------------------
# test_t5_tiny.checkpoint_0: a legacy msgpack file, all inline


def test_tiny_file_reads_as_t5x_wrote_it():
    raw = raw_msgpack(TINY_FILE)
    assert set(raw) == {"version", "optimizer"} and raw["version"] == 3
    want = flat(raw["optimizer"]["target"])
    assert io.detect_format(TINY_FILE) == "t5x" and t5x.detect(TINY_FILE)
    with io.open_reader(TINY_FILE) as reader:
        assert reader.layout == "legacy" and reader.version == 3 and reader.path == TINY_FILE
        meta = reader.metadata()
        assert list(meta) == sorted(want) and len(meta) == 52
        for p, a in want.items():
            assert (meta[p].shape, meta[p].dtype) == (a.shape, np.float32), p
        assert meta["token_embedder/embedding"].shape == (32128, 8)
        assert meta["decoder/logits_dense/kernel"].shape == (8, 32128)
        assert meta["encoder/layers_1/attention/query/kernel"].shape == (8, 12)
        assert meta["decoder/relpos_bias/rel_embedding"].shape == (4, 32)
        some = ["token_embedder/embedding", "encoder/layers_0/mlp/wi_0/kernel", "decoder/decoder_norm/scale"]
        got = reader.read(some)
        for p in some:
            np.testing.assert_array_equal(got[p], want[p])
        assert all(reader.is_inline(p) for p in meta)


def test_tiny_file_merge_and_write_back(tmp_path):
    reader = t5x.Reader(TINY_FILE)
    w0 = reader.read_all()
    # Fine-tuned stand-ins: perturbed copies written by our writer, as bare msgpack files too.
    fts = []
    for t in (1, 2):
        ft = io.save(tmp_path / f"ft{t}.checkpoint_0", io.unflatten(perturbed(w0, t)), "t5x", source=reader)
        assert ft.is_file() and io.detect_format(ft) == "t5x"
        fts.append(ft)
    out = tmp_path / "merged.checkpoint_0"
    report = merge_checkpoints(TINY_FILE, fts, out, task_arithmetic, alpha=0.5, budget_bytes=1 << 20)
    assert report.num_leaves == 52 and report.num_groups > 1 and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft1.checkpoint_0", "ft2.checkpoint_0", "merged.checkpoint_0"]

    taus = [perturbed(w0, t) for t in (1, 2)]
    got = t5x.Reader(out).read_all()
    for p, a in w0.items():
        ref = a.astype(np.float64) + 0.5 * sum(tau[p].astype(np.float64) - a for tau in taus)
        np.testing.assert_allclose(got[p], ref, rtol=1e-5, atol=1e-6, err_msg=p)
        assert got[p].dtype == np.float32

    # The written file has T5X's structure: same keys in the same order, the optimizer state as it was.
    src, new = raw_msgpack(TINY_FILE), raw_msgpack(out)
    assert list(new) == list(src) and new["version"] == 3
    assert list(flat(new)) == list(flat(src))
    src_state, new_state = flat(src["optimizer"]["state"]), flat(new["optimizer"]["state"])
    assert new_state["step"] == src_state["step"]
    for p, a in src_state.items():
        np.testing.assert_array_equal(new_state[p], a, err_msg=p)
    # Unchanged parameters give the very same bytes.
    same = io.save(tmp_path / "same.checkpoint_0", io.unflatten(w0), "t5x", source=reader)
    assert same.read_bytes() == TINY_FILE.read_bytes()


# --------------------------------------------------------------------------
# tiny_t5/checkpoint_1: a legacy step with TensorStore arrays (empty target)


def test_tiny_t5_step_reads_as_t5x_wrote_it():
    raw = raw_msgpack(TINY_T5 / "checkpoint")
    assert raw["version"] == 3 and raw["optimizer"]["target"] == {}
    for path in (TINY_T5, TINY_T5 / "checkpoint", TINY_T5.parent):  # step, its msgpack, the model dir
        assert io.detect_format(path) == "t5x"
        reader = io.open_reader(path)
        assert reader.layout == "legacy" and reader.path == TINY_T5
        assert reader.metadata() == {}  # T5X wrote no parameters into this one
    # Its state arrays, read by TensorStore from the specs T5X wrote.
    specs = flat(raw["optimizer"]["state"])
    kernel = specs["param_states/kernel"]
    assert kernel["kvstore"] == {"driver": "gfile", "path": "state.param_states.kernel/"}
    assert kernel["dtype"] == "float64" and kernel["metadata"]["shape"] == [10, 5]
    k = zarr_chunks(TINY_T5 / "state.param_states.kernel", shape=[10, 5], dtype="<f8", compressor={"id": "gzip"})
    np.testing.assert_allclose(k[0, :2], [0.15038408, 0.70071733], rtol=1e-7)
    b = zarr_chunks(TINY_T5 / "state.param_states.bias", shape=[5], dtype="<f4", compressor={"id": "gzip"})
    np.testing.assert_array_equal(b, np.ones(5, np.float32))
    assert int(specs["step"]) == 1


def test_tiny_t5_step_written_back_and_not_merged(tmp_path):
    reader = t5x.Reader(TINY_T5)
    dest = io.save(tmp_path / "model" / "checkpoint_1", {}, "t5x", source=reader)
    same_bytes(TINY_T5, dest)  # msgpack, specs (gfile kvstore kept) and TensorStore chunks
    assert t5x.Reader(tmp_path / "model").layout == "legacy"
    # A merge needs parameters: an empty target is refused, naming the checkpoint.
    with pytest.raises(CheckpointError, match="holds no parameters"):
        merge_checkpoints(TINY_T5, [dest], tmp_path / "merged", recipes.make_merge("task_arithmetic"))
    assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------
# tiny_orbax/1: an older orbax-based T5X step (aggregate msgpack + array directories)


def test_tiny_orbax_reads_as_t5x_wrote_it():
    raw = raw_msgpack(TINY_ORBAX / "checkpoint")
    assert set(raw) == {"_optimizer", "flax_mutables", "flax_mutables_axes", "params_axes"}
    assert raw["_optimizer"]["target"] == {}
    assert raw["_optimizer"]["state"]["step"] == "PLACEHOLDER://_optimizer.state.step"
    assert not (TINY_ORBAX / "_METADATA").exists()
    for path in (TINY_ORBAX, TINY_ORBAX.parent):  # the step, the model dir (steps named '<N>')
        assert t5x.detect(path) and io.detect_format(path) == "t5x"
        reader = io.open_reader(path)
        assert reader.layout == "orbax-aggregate" and reader.path == TINY_ORBAX
        assert reader.metadata() == {}
    zstd = {"id": "zstd", "level": 1}
    assert zarr_chunks(TINY_ORBAX / "_optimizer.state.step", shape=[], dtype="<i4", compressor=zstd) == 1
    kernel_dir = TINY_ORBAX / "_optimizer.state.param_states.kernel"
    kernel = zarr_chunks(kernel_dir, shape=[10, 5], dtype="<f8", compressor=zstd)
    legacy = zarr_chunks(TINY_T5 / "state.param_states.kernel", shape=[10, 5], dtype="<f8", compressor={"id": "gzip"})
    np.testing.assert_array_equal(kernel, legacy)  # T5X saved the same state in both layouts


def test_tiny_orbax_written_back_in_its_layout(tmp_path):
    reader = t5x.Reader(TINY_ORBAX)
    dest = io.save(tmp_path / "model" / "2", {}, "t5x", source=reader)
    same_bytes(TINY_ORBAX, dest)  # the aggregate msgpack is re-streamed byte for byte
    assert t5x.Reader(dest).layout == "orbax-aggregate"
    with pytest.raises(CheckpointError, match="holds no parameters"):
        merge_checkpoints(TINY_ORBAX, [dest], tmp_path / "merged", recipes.make_merge("task_arithmetic"))


def with_target(tmp_path: Path) -> tuple[Path, dict]:
    """T5X's tiny_orbax step with a ``target`` added the way old orbax stored one: a
    zarr directory (zstd, its own .zarray) behind a placeholder, and a small inline array."""
    step = tmp_path / "old_orbax" / "1"
    shutil.copytree(TINY_ORBAX, step)
    rng = np.random.default_rng(0)
    params = {"dense/kernel": rng.standard_normal((6, 4)).astype(np.float32),
              "dense/bias": rng.standard_normal(4).astype(np.float32)}  # fmt: skip
    name = "_optimizer.target.dense.kernel"
    zstd = {"id": "zstd", "level": 1}
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(step / name)},
            "metadata": {"shape": [6, 4], "chunks": [6, 4], "dtype": "<f4", "compressor": zstd}}  # fmt: skip
    ts.open(spec, create=True, open=False).result().write(params["dense/kernel"]).result()
    contents = serialization.msgpack_restore((step / "checkpoint").read_bytes())
    contents["_optimizer"]["target"] = {"dense": {"bias": params["dense/bias"], "kernel": "PLACEHOLDER://" + name}}
    (step / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
    return step, params


def test_old_orbax_layout_with_a_target_merged_and_written_back(tmp_path):
    src, params = with_target(tmp_path)
    reader = t5x.Reader(src.parent)
    assert reader.layout == "orbax-aggregate" and reader.path == src
    meta = reader.metadata()
    assert list(meta) == ["dense/bias", "dense/kernel"] and meta["dense/kernel"].shape == (6, 4)
    assert reader.is_inline("dense/bias") and not reader.is_inline("dense/kernel")
    for p, a in reader.read_all().items():
        np.testing.assert_array_equal(a, params[p])

    fts = [io.save(tmp_path / f"ft{t}" / "1", io.unflatten(perturbed(params, t)), "t5x", source=reader) for t in (1, 2)]
    out = tmp_path / "merged" / "1"
    merge_checkpoints(src, fts, out, task_arithmetic, budget_bytes=64)
    got = t5x.Reader(out).read_all()
    for p, a in params.items():
        ref = a + sum(perturbed(params, t)[p] - a for t in (1, 2))
        np.testing.assert_allclose(got[p], ref, rtol=1e-6, atol=1e-6)

    # The old layout: same files, placeholder kept, the new array with orbax's zarr metadata,
    # the optimizer state's directories and the rest of the aggregate msgpack unchanged.
    assert files(out) == files(src)
    new, old = raw_msgpack(out / "checkpoint"), raw_msgpack(src / "checkpoint")
    assert new["_optimizer"]["target"]["dense"]["kernel"] == "PLACEHOLDER://_optimizer.target.dense.kernel"
    assert new["_optimizer"]["state"] == old["_optimizer"]["state"] and new["params_axes"] is None
    zarray = json.loads((out / "_optimizer.target.dense.kernel" / ".zarray").read_text())
    assert zarray["compressor"]["id"] == "zstd" and zarray["shape"] == [6, 4]
    for d in (p for p in src.iterdir() if p.name.startswith("_optimizer.state")):
        same_bytes(d, out / d.name)


def test_bare_file_with_references_is_not_written_as_a_file(tmp_path):
    lone = tmp_path / "lone.checkpoint_1"
    shutil.copyfile(TINY_T5 / "checkpoint", lone)  # its specs point at directories left behind
    reader = t5x.Reader(lone)
    assert reader.layout == "legacy" and reader.metadata() == {}
    with pytest.raises(CheckpointError, match="pass the step directory"):
        t5x.Writer(tmp_path / "out.checkpoint_1", {}, source=reader)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone.checkpoint_1"]
