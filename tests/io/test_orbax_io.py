"""orbax leaves through orbax's type handlers: the checkpoint pact_jax writes group by group is the
one orbax writes in one save, and reads go through the handlers without orbax's PyTree restore."""

from __future__ import annotations

import asyncio
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint import v1 as ocp_v1

from pact_jax import io
from pact_jax.io import CheckpointError
from pact_jax.io import orbax as orbax_io
from test_io_formats import assert_same
from test_orbax_metadata import LAYOUTS, nested_tree, write_in_groups


def json_file(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax.Array"])
def test_written_checkpoint_is_what_orbax_writes(tmp_path, as_jax):
    tree = nested_tree()
    if as_jax:  # what jax.Arrays of these leaves hold (int64 -> int32 without jax_enable_x64)
        tree = jax.tree.map(lambda a: np.asarray(jnp.asarray(a)), tree)
    ours = write_in_groups(tmp_path / "ours", tree, group_size=2, as_jax=as_jax)
    theirs = tmp_path / "theirs"
    ocp_v1.save(theirs.absolute(), jax.tree.map(jnp.asarray, tree) if as_jax else tree)
    # The same files at the top and in the item (data file names aside), one merged OCDBT database.
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    item = ours / orbax_io.ITEM
    assert {p.name for p in item.iterdir() if not p.name.startswith("ocdbt.process_")} >= {"_METADATA", "manifest.ocdbt"}
    assert [p.name for p in item.glob("ocdbt.process_*")] == ["ocdbt.process_0"]
    orbax_tree = json_file(theirs / orbax_io.ITEM / "_METADATA")
    if as_jax:  # orbax also records each shard's shape (and array_metadatas/): optional for reading, not written
        for entry in orbax_tree["tree_metadata"].values():
            entry["value_metadata"].pop("write_shape")
    assert json_file(item / "_METADATA") == orbax_tree
    mine, orbax_meta = json_file(ours / "_CHECKPOINT_METADATA"), json_file(theirs / "_CHECKPOINT_METADATA")
    for m in (mine, orbax_meta):
        m.pop("init_timestamp_nsecs"), m.pop("commit_timestamp_nsecs")
    assert mine == orbax_meta
    # orbax reads it back with each of its APIs; so do we.
    assert_same(jax.tree.map(np.asarray, ocp_v1.load(ours.absolute())), tree)
    assert_same(ocp.StandardCheckpointer().restore((item).absolute()), tree)
    assert_same(io.load(ours), tree)
    if as_jax:
        assert (item / "_sharding").exists()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reads_what_orbax_restores(tmp_path, layout):
    """Every layout whose metadata the files give is read through the type handlers: the same
    values and dtypes as orbax's own restore."""
    item = LAYOUTS[layout](tmp_path)
    want = ocp.PyTreeCheckpointHandler().restore(item.absolute())
    with io.open_reader(item.parent if item.name == orbax_io.ITEM else item) as reader:
        got = reader.load()
        assert reader._leaves is not None  # not orbax's restore
    assert_same(got, jax.tree.map(np.asarray, want))


def test_many_groups_one_database(tmp_path):
    rng = np.random.default_rng(1)
    tree = {"layers": {f"l{i}": {"w": rng.normal(size=(3, 4)).astype(np.float32)} for i in range(40)}}
    dest = write_in_groups(tmp_path / "c", tree, group_size=1)
    assert len(list((dest / orbax_io.ITEM).glob("ocdbt.process_*"))) == 1
    assert_same(io.load(dest), tree)
    assert not list(tmp_path.glob("*pact-tmp*"))  # staging renamed away


def test_reads_go_through_type_handlers(tmp_path, monkeypatch):
    tree = nested_tree()
    dest = io.save(tmp_path / "c", tree)
    paths = ["params/dense/kernel", "params/attn/query/kernel", "step"]

    def no_pytree_restore(*args, **kwargs):
        raise AssertionError("PyTreeRestore used although the metadata came from the files")

    with io.open_reader(dest) as reader:
        monkeypatch.setattr(reader._handler, "restore", no_pytree_restore)
        got = reader.read(paths)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placed = reader.read(["params/dense/kernel"], shardings={"params/dense/kernel": sharding})
    flat = io.flatten(tree)
    for p in paths:
        assert isinstance(got[p], np.ndarray) and got[p].dtype == np.asarray(flat[p]).dtype
        np.testing.assert_array_equal(got[p], flat[p])
    arr = placed["params/dense/kernel"]
    assert isinstance(arr, jax.Array) and arr.sharding == sharding
    np.testing.assert_array_equal(np.asarray(arr), flat["params/dense/kernel"])


def test_fallback_restore_reads_the_same(tmp_path, monkeypatch):
    tree = nested_tree()
    dest = io.save(tmp_path / "c", tree)
    fast = io.load(dest)
    monkeypatch.setattr(orbax_io, "read_array_metadata", lambda item: None)
    with io.open_reader(dest) as reader:
        reader.metadata()
        assert reader._leaves is None  # the restore path
        slow = reader.load()
    assert_same(slow, fast)
    assert_same(fast, tree)


def test_sharded_leaves_over_virtual_devices(tmp_path):
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs the 8 virtual CPU devices of tests/conftest.py")
    mesh = jax.sharding.Mesh(np.array(devices[:4]).reshape(2, 2), ("a", "b"))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
    w = jax.device_put(jnp.arange(48, dtype=jnp.float32).reshape(8, 6), spec)
    dest = tmp_path / "c"
    with io.open_writer(dest, {"w": jax.ShapeDtypeStruct(w.shape, w.dtype)}, "orbax") as writer:
        writer.write({"w": w})
        writer.commit()
    with io.open_reader(dest) as reader:
        back = reader.read(["w"], shardings={"w": spec})["w"]
    assert back.sharding == spec
    np.testing.assert_array_equal(np.asarray(back), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(ocp_v1.load(dest.absolute())["w"]), np.asarray(w))


def test_works_inside_a_running_event_loop(tmp_path):
    """Jupyter / Colab run cells inside an event loop: reads and writes must not call asyncio.run there."""
    tree = nested_tree()

    async def in_loop():
        dest = write_in_groups(tmp_path / "c", tree, group_size=3)
        return io.load(dest)

    assert_same(asyncio.run(in_loop()), tree)


def test_truncated_array_data_names_the_leaves(tmp_path):
    rng = np.random.default_rng(2)
    tree = {"a": rng.normal(size=(128, 128)).astype(np.float32), "b": np.zeros(4, np.float32)}
    dest = io.save(tmp_path / "c", tree)
    # The largest data file holds a's chunk (metadata and small arrays are a few hundred bytes).
    data = max((f for f in (dest / orbax_io.ITEM).rglob("*") if f.is_file() and f.parent.name == "d"),
               key=lambda f: f.stat().st_size)  # fmt: skip
    data.write_bytes(data.read_bytes()[:100])
    with io.open_reader(dest) as reader:
        assert reader.metadata()["a"].shape == (128, 128)  # metadata intact
        np.testing.assert_array_equal(reader.read(["b"])["b"], tree["b"])
        with pytest.raises(CheckpointError, match=r"state: cannot read leaf 'a' \("):
            reader.read(["a"])


def test_failed_commit_publishes_nothing(tmp_path, monkeypatch):
    tree = {"a": np.ones((2, 3), np.float32)}

    async def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.type_handlers, "merge_ocdbt_per_process_files", broken)
    with pytest.raises(CheckpointError, match="cannot complete the orbax checkpoint.*disk full"):
        write_in_groups(tmp_path / "c", tree)
    assert list(tmp_path.iterdir()) == []
    # Outside a with block too: the staging directory goes with the failure.
    w = io.open_writer(tmp_path / "d", {"a": jax.ShapeDtypeStruct((2, 3), np.float32)}, "orbax")
    w.write(tree)
    with pytest.raises(CheckpointError, match="disk full"):
        w.commit()
    assert list(tmp_path.iterdir()) == []
