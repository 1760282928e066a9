"""Round trips, lazy reads, detection, atomic writes and bad input for orbax, msgpack, safetensors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pact_jax import io
from pact_jax.io import CheckpointError

# (format, destination name): single files and directories.
TARGETS = [("orbax", "ckpt"), ("msgpack", "ckpt.msgpack"), ("safetensors", "ckpt.safetensors"), ("safetensors", "ckpt_dir")]


def params_tree():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "dense": {"kernel": rng.normal(size=(6, 5)).astype(np.float32), "bias": np.zeros(5, np.float32)},
            "attn": {"query": {"kernel": rng.normal(size=(5, 2, 3)).astype(jnp.bfloat16)}},
            "norm": {"scale": np.ones(5, jnp.bfloat16)},
            "temperature": np.array(0.07, np.float32),  # a 0-d leaf keeps its shape () in every format
        }
    }


def listing(path):
    return sorted(p.name for p in path.iterdir())


def assert_same(got, want):
    """The same leaf paths, dtypes, shapes and values (exactly)."""
    got, want = io.flatten(got), io.flatten(want)
    assert sorted(got) == sorted(want)
    for p in want:
        x, y = np.asarray(got[p]), np.asarray(want[p])
        assert x.dtype == y.dtype and x.shape == y.shape, p
        np.testing.assert_array_equal(x, y, err_msg=p)


@pytest.mark.parametrize("fmt,name", TARGETS)
def test_round_trip_keeps_values_and_dtypes(tmp_path, fmt, name):
    params = params_tree()
    dest = io.save(tmp_path / name, params, fmt)
    assert listing(tmp_path) == [name]  # nothing else left behind
    assert io.detect_format(dest) == fmt
    assert_same(io.load(dest), params)


@pytest.mark.parametrize("fmt,name", TARGETS)
def test_metadata_and_partial_read(tmp_path, fmt, name):
    params = params_tree()
    dest = io.save(tmp_path / name, params, fmt)
    with io.open_reader(dest) as reader:
        meta = reader.metadata()
        flat = io.flatten(params)
        assert set(meta) == set(flat)
        for p, s in meta.items():
            assert s.shape == flat[p].shape and s.dtype == flat[p].dtype, p
        got = reader.read(["params/attn/query/kernel"])
        assert list(got) == ["params/attn/query/kernel"]
        np.testing.assert_array_equal(np.asarray(got["params/attn/query/kernel"], np.float32),
                                      np.asarray(flat["params/attn/query/kernel"], np.float32))  # fmt: skip
        with pytest.raises(CheckpointError, match="no leaf 'params/missing'"):
            reader.read(["params/missing"])


def test_safetensors_directory_streams_one_shard_per_write(tmp_path):
    flat = io.flatten(params_tree())
    template = {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in flat.items()}
    paths = list(flat)
    with io.open_writer(tmp_path / "out", template, "safetensors") as w:
        w.write({p: flat[p] for p in paths[:2]})
        w.write({p: flat[p] for p in paths[2:]})
        w.commit()
    files = listing(tmp_path / "out")
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {p.replace("/", ".") for p in paths}
    assert_same(io.load(tmp_path / "out"), params_tree())


def test_orbax_reader_finds_item_below_and_restores_with_sharding(tmp_path):
    import orbax.checkpoint as ocp

    params = params_tree()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((tmp_path / "step_1" / "default").absolute(), params)
    ckptr.wait_until_finished()
    reader = io.open_reader(tmp_path / "step_1")
    assert reader.format == "orbax"
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got = reader.read(["params/dense/kernel"], shardings={"params/dense/kernel": sharding})
    arr = got["params/dense/kernel"]
    assert isinstance(arr, jax.Array) and arr.sharding == sharding
    np.testing.assert_array_equal(np.asarray(arr), params["params"]["dense"]["kernel"])
    # The checkpoint we write reads back with orbax's own v1 API too.
    dest = io.save(tmp_path / "ours", params)
    from orbax.checkpoint import v1 as ocp_v1

    assert_same(jax.tree_util.tree_map(np.asarray, ocp_v1.load(dest.absolute())), params)


@pytest.mark.parametrize("fmt,name", TARGETS)
def test_writer_abort_and_exception_leave_nothing(tmp_path, fmt, name):
    flat = io.flatten(params_tree())
    template = {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in flat.items()}
    with pytest.raises(RuntimeError, match="interrupted"):
        with io.open_writer(tmp_path / name, template, fmt) as w:
            w.write({p: flat[p] for p in list(flat)[:2]})
            raise RuntimeError("interrupted")
    assert listing(tmp_path) == []
    w = io.open_writer(tmp_path / name, template, fmt)
    w.write({p: flat[p] for p in list(flat)[:1]})
    with pytest.raises(CheckpointError, match="never written"):
        w.commit()
    assert listing(tmp_path) == []


def test_writer_rejects_wrong_leaves(tmp_path):
    flat = io.flatten(params_tree())
    template = {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in flat.items()}
    with io.open_writer(tmp_path / "o", template, "orbax") as w:
        with pytest.raises(CheckpointError, match="'params/dense/kernel' is"):
            w.write({"params/dense/kernel": np.zeros((6, 5), np.float64)})
        with pytest.raises(CheckpointError, match="not in the checkpoint's template"):
            w.write({"params/other": np.zeros(3, np.float32)})
        w.write({"params/dense/bias": flat["params/dense/bias"]})
        with pytest.raises(CheckpointError, match="written twice"):
            w.write({"params/dense/bias": flat["params/dense/bias"]})
        w.abort()


@pytest.mark.parametrize("fmt,name", TARGETS)
def test_existing_output_needs_overwrite_and_is_replaced_atomically(tmp_path, fmt, name):
    old = params_tree()
    dest = io.save(tmp_path / name, old, fmt)
    new = jax.tree_util.tree_map(lambda a: (np.asarray(a, np.float32) + 1).astype(a.dtype), old)
    with pytest.raises(CheckpointError, match="already exists"):
        io.save(dest, new, fmt)
    assert_same(io.load(dest), old)
    io.save(dest, new, fmt, overwrite=True)
    assert_same(io.load(dest), new)
    assert listing(tmp_path) == [name]


def test_missing_and_unreadable_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        io.open_reader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an orbax checkpoint"):
        io.open_reader(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="cannot tell the checkpoint format"):
        io.open_reader(tmp_path / "weights.bin")


@pytest.mark.parametrize("fmt,name", [("msgpack", "c.msgpack"), ("safetensors", "c.safetensors")])
def test_truncated_file_names_the_file(tmp_path, fmt, name):
    dest = io.save(tmp_path / name, params_tree(), fmt)
    data = dest.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(dest.name)):
        io.load(dest)


def test_truncated_orbax_data_names_the_checkpoint(tmp_path):
    dest = io.save(tmp_path / "c", params_tree(), "orbax")
    for f in (dest / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:7])
    with pytest.raises(CheckpointError, match="c/state"):
        io.load(dest)


def test_keys_that_cannot_be_paths_are_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="'.' inside a key name"):
        io.save(tmp_path / "x.safetensors", {"layer.0": {"kernel": np.zeros((2, 2), np.float32)}})
    with pytest.raises(CheckpointError, match="free of '/'"):
        io.save(tmp_path / "x.msgpack", {"a/b": np.zeros(2, np.float32)})


@pytest.mark.parametrize("name,fmt", [("m.msgpack", "safetensors"), ("m.safetensors", "msgpack"), ("m.msgpack", "orbax")])
def test_a_suffix_that_contradicts_the_format_is_refused(tmp_path, name, fmt):
    with pytest.raises(CheckpointError, match=f"suffix .* names the .* format, but {fmt} was asked for"):
        io.save(tmp_path / name, params_tree(), fmt)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("fmt,name", TARGETS)
def test_outputs_get_the_usual_file_permissions(tmp_path, fmt, name):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        dest = io.save(tmp_path / name, params_tree(), fmt)
    finally:
        os.umask(mask)
    files = [dest] if dest.is_file() else [p for p in dest.rglob("*") if p.is_file()]
    from pact_jax.io import safetensors as st

    want = st._FILE_MODE  # 0o666 & ~umask, read when the module was imported
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == want & 0o044, f  # group/other can read as usual


def test_an_output_whose_parent_is_a_file_is_named(tmp_path):
    (tmp_path / "pre.msgpack").write_text("a file")
    with pytest.raises(CheckpointError, match=r"merged: its parent .*pre.msgpack is a file, not a directory"):
        io.save(tmp_path / "pre.msgpack" / "merged", params_tree())


@pytest.mark.parametrize("fmt,name", TARGETS)
def test_a_full_disk_is_one_sentence_naming_the_output(tmp_path, monkeypatch, fmt, name):
    import errno

    from pact_jax.io import base

    writer_cls = io._module(fmt).Writer
    orig = writer_cls._commit

    def full(self):
        if fmt == "orbax":  # TensorStore's way: the errno text inside a long message of its own
            raise ValueError('{"error": "...", "message": "Error writing file: No space left on device [OS error: 28]"}')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_cls, "_commit", full)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / name}: no space left on device while finishing the "
                                              r"checkpoint \(.* free on its file system\); nothing was published"):
        io.save(tmp_path / name, params_tree(), fmt)
    monkeypatch.setattr(writer_cls, "_commit", orig)
    assert base.no_space(OSError(errno.ENOSPC, "x")) and not base.no_space(ValueError("other"))


def test_a_corrupt_orbax_leaf_is_named_itself(tmp_path, monkeypatch):
    """OCDBT stores every leaf in shared files, so one leaf's data cannot be broken alone on disk: the
    failure is injected where orbax opens that leaf. The group fails; the reader then names the leaf."""
    from pact_jax.io import orbax as orbax_io

    dest = io.save(tmp_path / "c", params_tree(), "orbax")
    real = orbax_io._param_info

    def broken(item, name, *args):
        if "norm" in name and "scale" in name:
            raise ValueError("DATA_LOSS: Error reading chunk: corrupted")
        return real(item, name, *args)

    monkeypatch.setattr(orbax_io, "_param_info", broken)
    with pytest.raises(CheckpointError, match=r"c/state: cannot read leaf 'params/norm/scale' \(DATA_LOSS"):
        io.load(dest)
