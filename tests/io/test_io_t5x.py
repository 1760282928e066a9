"""T5X checkpoints (pact_jax.io.t5x): both layouts, read, written, detected, broken.

The fixtures write tiny T5X-like train states the way t5x does:

* legacy (``t5x.checkpoints.Checkpointer.save``): large arrays written as zarr
  TensorStore arrays named by their state-dict path with ``/`` -> ``.``, their
  ``ts.Spec(...).to_json()`` (relative ``kvstore`` path, gzip, chunk shape that
  divides the shape) put in their place, small ones left inline, then
  ``flax.serialization.to_bytes({"version": 3, "optimizer": state})`` written
  to ``checkpoint`` in a temporary directory renamed to ``checkpoint_<step>``.
* orbax (``t5x.checkpoints.OrbaxCheckpointManagerInterface.save``): an
  ``ocp.CheckpointManager`` with ``step_prefix='checkpoint'`` saving the state
  dict of ``jax.Array`` leaves as the item ``state`` with a
  ``PyTreeCheckpointHandler`` (``use_ocdbt=True`` as t5x at cc342d4 configures
  it, and ``False`` as older t5x did), and beside it, in
  ``write_orbax_with_dataset``, the ``dataset`` item of t5x's
  ``DatasetCheckpointHandler``.

The real checkpoints T5X wrote are tested in ``test_t5x_real.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import serialization

from pact_jax import io
from pact_jax.io import CheckpointError, t5x
from pact_jax.io.streaming import merge_checkpoints

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")

STEP = 1000
TS_MIN_SIZE = 64  # leaves with at least this many elements go to TensorStore (legacy layout)


# --------------------------------------------------------------------------
# Tiny T5X train states


def target_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def w(*shape, dtype=np.float32):
        return rng.normal(size=shape).astype(dtype)

    return {
        "token_embedder": {"embedding": w(32, 8)},
        "encoder": {
            "layers_0": {
                "attention": {"query": {"kernel": w(8, 8)}, "key": {"kernel": w(8, 8)}},
                "mlp": {"wi": {"kernel": w(8, 16, dtype=jnp.bfloat16)}},  # bf16, in TensorStore
                "pre_attention_layer_norm": {"scale": w(8)},  # small: inline
            },
            "encoder_norm": {"scale": w(8, dtype=jnp.bfloat16)},  # bf16, inline
        },
        "decoder": {
            "layers_0": {"self_attention": {"query": {"kernel": w(8, 8)}}},
            "logits_dense": {"kernel": w(8, 32)},
        },
    }


def adafactor_states(params: dict) -> dict:
    """Factored second moments, as t5x's Adafactor keeps them (unused slots: shape (1,))."""
    out = {}
    for p, a in io.flatten(params).items():
        one = np.zeros((1,), np.float32)
        if a.ndim >= 2:
            st = {"m": one, "v": one, "v_col": np.full(a.shape[1], 0.5, np.float32), "v_row": np.full(a.shape[0], 0.25, np.float32)}
        else:
            st = {"m": one, "v": np.full(a.shape, 0.125, np.float32), "v_col": one, "v_row": one}
        out[p] = st
    return io.unflatten(out)


def train_state(seed: int = 0) -> dict:
    params = target_params(seed)
    return {"target": params, "state": {"step": np.array(STEP, np.int32), "param_states": adafactor_states(params)}}


def chunk_shape(shape, max_elements: int) -> list[int]:
    """A chunk shape dividing ``shape`` with at most ``max_elements``: shrink the largest dim first."""
    divisors = [[d for d in range(1, n + 1) if n % d == 0] for n in shape]
    while int(np.prod([d[-1] for d in divisors])) > max_elements:
        i = max(range(len(shape)), key=lambda j: divisors[j][-1])
        divisors[i].pop()
    return [d[-1] for d in divisors]


def _register_ts_spec():
    """As t5x.checkpoints does at import: a ts.Spec is stored as its JSON dict."""
    serialization.register_serialization_state(
        ts.Spec,
        ty_to_state_dict=lambda t: t.to_json(),
        ty_from_state_dict=lambda t, s: ts.Spec(s) if isinstance(s, dict) else s,
        override=True,
    )


def write_legacy(root, state: dict, *, ts_min_size: int = TS_MIN_SIZE):
    """A legacy T5X step directory, written the way t5x's Checkpointer.save does."""
    _register_ts_spec()
    final = root / f"checkpoint_{STEP}"
    tmp = root / f"checkpoint_{STEP}.tmp-{int(time.time())}"
    tmp.mkdir(parents=True)

    def written(name, arr):
        if arr.size < ts_min_size:
            return arr  # not partitioned: inline in the msgpack
        spec = ts.Spec(
            {
                "driver": "zarr",
                "dtype": jnp.dtype(arr.dtype).name,
                "kvstore": {"driver": "file", "path": name.replace("/", ".")},
                "metadata": {"compressor": {"id": "gzip"}, "shape": arr.shape, "chunks": np.array(chunk_shape(arr.shape, 64))},
            }
        )
        absolute = spec.to_json()
        absolute["kvstore"]["path"] = os.path.join(tmp, absolute["kvstore"]["path"])
        ts.open(absolute, create=True, open=True).result().write(arr).result()
        return spec  # serialized as spec.to_json() (see _register_ts_spec)

    def walk(node, keys):  # t5x names each array by its '/'-joined state-dict path
        if isinstance(node, dict):
            return {k: walk(v, (*keys, k)) for k, v in node.items()}
        return written("/".join(keys), node)

    contents = {"version": 3, "optimizer": walk(state, ())}
    (tmp / "checkpoint").write_bytes(serialization.to_bytes(contents))
    (tmp / "train_ds-000-of-001.index").write_bytes(b"dataset iterator state")  # t5x's tf.data checkpoint
    os.rename(tmp, final)
    return final


def write_orbax(root, state: dict, *, use_ocdbt: bool):
    """An orbax T5X step directory, as OrbaxCheckpointManagerInterface.save writes it."""
    manager = ocp.CheckpointManager(
        root,
        item_names=("state",),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)},
        options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True, cleanup_tmp_directories=True),
    )
    manager.save(STEP, args=ocp.args.Composite(state=ocp.args.PyTreeSave(jax.tree.map(jnp.asarray, state))))
    manager.wait_until_finished()
    manager.close()
    return root / f"checkpoint_{STEP}"


LAYOUTS = ["legacy", "orbax-ocdbt", "orbax"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """``{layout: step_dir}`` of the pre-trained train state, written once per module."""
    base = tmp_path_factory.mktemp("t5x_sources")
    state = train_state(0)
    return {
        "legacy": write_legacy(base / "legacy", state),
        "orbax-ocdbt": write_orbax(base / "orbax_ocdbt", state, use_ocdbt=True),
        "orbax": write_orbax(base / "orbax", state, use_ocdbt=False),
    }


@pytest.fixture
def source(request, sources, tmp_path):
    """A private copy of one layout's source (tests may damage it)."""
    src = sources[request.param]
    dst = tmp_path / "src" / src.name
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------
# Helpers


def files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def orbax_skeleton(root) -> set[str]:
    """File names with the parts that differ between saves (OCDBT ids, data hashes) masked."""
    out = set()
    for f in files(root):
        f = re.sub(r"ocdbt\.process_0\w*", "ocdbt.process_0", f)
        f = re.sub(r"/d/[0-9a-f]+$", "/d/*", f)
        out.add(f)
    # orbax writes these for jax.Array leaves only; merged leaves are NumPy arrays.
    return {f for f in out if not f.endswith("/_sharding") and "array_metadatas" not in f}


def assert_leaves_equal(got: dict, want: dict):
    assert set(got) == set(want)
    for p in want:
        g, w = np.asarray(got[p]), np.asarray(want[p])
        assert g.dtype == w.dtype and g.shape == w.shape, p
        np.testing.assert_array_equal(g.astype(np.float32), w.astype(np.float32), err_msg=p)


def full_state(step_dir) -> dict:
    """The whole train state, loaded the way t5x itself would (independent of pact_jax's reader)."""
    if (step_dir / "checkpoint").is_file():
        contents = serialization.msgpack_restore((step_dir / "checkpoint").read_bytes())

        def load(x):
            if isinstance(x, dict) and {"driver", "kvstore", "metadata"} <= x.keys():
                spec = dict(x, kvstore={"driver": "file", "path": os.path.join(step_dir, x["kvstore"]["path"])})
                return ts.open(spec, open=True).result().read().result()
            if isinstance(x, dict):
                return {k: load(v) for k, v in x.items()}
            return np.asarray(x)

        return io.flatten(load(contents["optimizer"]))
    restored = ocp.PyTreeCheckpointer().restore((step_dir / "state").absolute())
    return {p: np.asarray(a) for p, a in io.flatten(restored).items()}


def split(flat: dict) -> tuple[dict, dict]:
    target = {p[len("target/") :]: a for p, a in flat.items() if p.startswith("target/")}
    rest = {p: a for p, a in flat.items() if not p.startswith("target/")}
    return target, rest


def write_in_groups(writer, params: dict, n_groups: int = 3):
    flat = io.flatten(params)
    paths = list(flat)
    for i in range(n_groups):
        writer.write({p: flat[p] for p in paths[i::n_groups]})


def no_strays(dest):
    """Nothing but (maybe) ``dest`` in its directory: no staging or orbax temp dirs."""
    left = sorted(p.name for p in dest.parent.iterdir())
    assert left in ([], [dest.name]), left


# --------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize("source", LAYOUTS, indirect=True)
def test_detect_both_layouts(source):
    assert t5x.detect(source)
    assert io.detect_format(source) == "t5x"
    if (source / "checkpoint").is_file():  # the legacy msgpack file names the checkpoint too
        assert io.detect_format(source / "checkpoint") == "t5x"
        assert io.open_reader(source / "checkpoint").layout == "legacy"
    else:
        assert t5x.detect(source / "state")  # the orbax item itself
        assert io.detect_format(source / "state") == "t5x"
    with io.open_reader(source) as reader:
        assert reader.format == "t5x"
        assert reader.layout == ("legacy" if (source / "checkpoint").is_file() else "orbax")


def test_detect_rejects_other_directories(tmp_path):
    params = {"params": {"dense": {"kernel": np.ones((4, 4), np.float32)}}}
    plain = io.save(tmp_path / "plain", params, "orbax")  # orbax v1: <plain>/state/, no 'target'
    assert not t5x.detect(plain) and not t5x.detect(plain / "state")
    assert io.detect_format(plain) == "orbax"
    std = tmp_path / "std"
    ocp.StandardCheckpointer().save(std.absolute(), params)
    ocp.StandardCheckpointer().wait_until_finished()
    assert not t5x.detect(std) and io.detect_format(std) == "orbax"
    tf = tmp_path / "tf"
    tf.mkdir()
    (tf / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1"\n')  # a TensorFlow T5 checkpoint
    assert not t5x.detect(tf)
    assert not t5x.detect(tmp_path / "missing") and not t5x.detect(tmp_path)
    with pytest.raises(CheckpointError, match="not a T5X checkpoint"):
        t5x.Reader(tf)


# --------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("source", LAYOUTS, indirect=True)
def test_reader_metadata_read_subset_and_all(source):
    want = io.flatten(target_params(0))
    with t5x.Reader(source) as reader:
        meta = reader.metadata()
        assert list(meta) == list(want)  # jax's leaf order, as every reader
        for p, s in meta.items():
            assert (s.shape, s.dtype) == (want[p].shape, want[p].dtype), p
        subset = ["encoder/layers_0/mlp/wi/kernel", "encoder/encoder_norm/scale"]  # bf16: TensorStore, inline
        got = reader.read(subset)
        assert list(got) == subset
        assert got[subset[0]].dtype == jnp.bfloat16
        assert_leaves_equal(got, {p: want[p] for p in subset})
        assert_leaves_equal(reader.read_all(), want)
        assert_leaves_equal(io.flatten(io.load(source)), want)
        with pytest.raises(CheckpointError, match="no leaf 'nope'"):
            reader.read(["nope"])


@pytest.mark.parametrize("source", ["legacy"], indirect=True)
def test_legacy_reads_only_the_arrays_asked_for(source):
    reader = t5x.Reader(source)
    assert reader.is_inline("encoder/encoder_norm/scale") and not reader.is_inline("token_embedder/embedding")
    # Metadata comes from the msgpack alone; reading one leaf opens only its array.
    shutil.rmtree(source / "target.decoder.logits_dense.kernel")
    reader = t5x.Reader(source)
    assert reader.metadata()["decoder/logits_dense/kernel"].shape == (8, 32)
    got = reader.read(["token_embedder/embedding", "encoder/encoder_norm/scale"])
    assert_leaves_equal(got, {p: io.flatten(target_params(0))[p] for p in got})


@pytest.mark.parametrize("source", ["orbax"], indirect=True)
def test_orbax_reads_only_the_arrays_asked_for(source):
    # orbax's metadata opens every array's .zarray, never its chunks: damage one leaf's data.
    for chunk in (source / "state" / "target.decoder.logits_dense.kernel").glob("[0-9]*"):
        chunk.write_bytes(b"garbage")
    reader = t5x.Reader(source)
    assert reader.metadata()["decoder/logits_dense/kernel"].shape == (8, 32)
    got = reader.read(["token_embedder/embedding"])
    np.testing.assert_array_equal(got["token_embedder/embedding"], target_params(0)["token_embedder"]["embedding"])
    with pytest.raises(CheckpointError, match="decoder/logits_dense/kernel"):
        reader.read(["decoder/logits_dense/kernel"])


@pytest.mark.parametrize("source", ["orbax-ocdbt", "orbax"], indirect=True)
def test_orbax_reads_through_type_handlers(source, monkeypatch):
    """Leaves come from orbax's type handlers (no PyTreeRestore, which parses all of
    ``_METADATA`` per call); orbax's restore, the fallback, reads the same."""
    paths = ["token_embedder/embedding", "decoder/logits_dense/kernel"]
    reader = t5x.Reader(source)
    monkeypatch.setattr(reader._handler, "restore", lambda *a, **k: pytest.fail("PyTreeRestore used"))
    got = reader.read(paths)
    monkeypatch.undo()
    monkeypatch.setattr(io.orbax, "read_array_metadata", lambda item: None)
    fallback = t5x.Reader(source).read(paths)
    want = io.flatten(target_params(0))
    for p in paths:
        np.testing.assert_array_equal(got[p], want[p])
        np.testing.assert_array_equal(fallback[p], want[p])


# --------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize("source", LAYOUTS, indirect=True)
def test_writer_replaces_target_and_keeps_the_rest(source, tmp_path):
    reader = t5x.Reader(source)
    new = target_params(1)  # the "merged" params
    dest = tmp_path / "out" / f"checkpoint_{STEP}"
    dest.parent.mkdir()
    writer = io.open_writer(dest, reader.metadata(), "t5x", source=reader)
    assert isinstance(writer, t5x.Writer) and writer.layout == reader.layout
    with writer:
        write_in_groups(writer, new)
        assert not dest.exists()  # nothing published before commit
        staged = [p for p in dest.parent.iterdir() if p.name != dest.name]
        assert staged and sum(f.stat().st_size for s in staged for f in s.rglob("*") if f.is_file()) > 0
        assert writer.commit() == dest
    no_strays(dest)

    assert t5x.detect(dest) and io.detect_format(dest) == "t5x"
    assert_leaves_equal(t5x.Reader(dest).read_all(), io.flatten(new))
    got_target, got_rest = split(full_state(dest))
    src_target, src_rest = split(full_state(source))
    assert_leaves_equal(got_target, io.flatten(new))
    assert_leaves_equal(got_rest, src_rest)  # step and param_states unchanged
    assert got_rest["state/step"] == STEP

    if reader.layout == "legacy":
        assert files(dest) == files(source)  # same arrays, chunks, extra files
        assert (dest / "train_ds-000-of-001.index").read_bytes() == b"dataset iterator state"
        old = serialization.msgpack_restore((source / "checkpoint").read_bytes())
        got = serialization.msgpack_restore((dest / "checkpoint").read_bytes())
        assert got["version"] == 3
        assert json.dumps(io.flatten({"s": got["optimizer"]["state"]}), default=str) == json.dumps(
            io.flatten({"s": old["optimizer"]["state"]}), default=str
        )
        for d in (source / p.name for p in dest.iterdir() if p.name.startswith("state.")):
            assert files(d) == files(dest / d.name)
            for f in files(d):
                assert (d / f).read_bytes() == (dest / d.name / f).read_bytes()
    else:
        assert orbax_skeleton(dest) == orbax_skeleton(source)
        meta = json.loads((dest / "_CHECKPOINT_METADATA").read_text())
        assert meta["item_handlers"] == json.loads((source / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
        # t5x restores through a CheckpointManager over the model directory.
        manager = ocp.CheckpointManager(
            dest.parent,
            item_names=("state",),
            item_handlers={"state": ocp.PyTreeCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=False),
        )
        assert manager.all_steps() == [STEP]
        restored = manager.restore(STEP, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
        manager.close()
        np.testing.assert_array_equal(
            np.asarray(restored["target"]["token_embedder"]["embedding"]), new["token_embedder"]["embedding"]
        )


@pytest.mark.parametrize("source", ["orbax"], indirect=True)
def test_orbax_without_ocdbt_has_the_source_file_names(source, tmp_path, monkeypatch):
    monkeypatch.setattr(t5x.orbax_layout, "_COPY_GROUP_BYTES", 64)  # copy the optimizer state in many small groups
    reader = t5x.Reader(source)
    dest = io.save(tmp_path / "out", target_params(2), "t5x", source=reader)
    assert_leaves_equal(split(full_state(dest))[1], split(full_state(source))[1])
    assert orbax_skeleton(dest) == orbax_skeleton(source)
    assert {f for f in files(dest) if "target." in f} == {f for f in files(source) if "target." in f}
    assert json.loads((dest / "state" / "_METADATA").read_text())["use_ocdbt"] is False


@pytest.mark.parametrize("source", ["legacy"], indirect=True)
def test_legacy_unchanged_params_give_a_byte_identical_msgpack(source, tmp_path):
    reader = t5x.Reader(source)
    dest = tmp_path / "same"
    with t5x.Writer(dest, reader.metadata(), source=reader) as writer:
        for p, a in reader.read_all().items():  # one leaf at a time
            writer.write({p: a})
        writer.commit()
    assert (dest / "checkpoint").read_bytes() == (source / "checkpoint").read_bytes()
    for f in files(source):
        assert (dest / f).read_bytes() == (source / f).read_bytes(), f


@pytest.mark.parametrize("source", ["legacy", "orbax"], indirect=True)
def test_writer_may_change_dtypes(source, tmp_path):
    reader = t5x.Reader(source)
    new = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), target_params(3))  # bf16 -> f32, jax.Arrays
    dest = io.save(tmp_path / "f32", new, "t5x", source=reader)
    meta = t5x.Reader(dest).metadata()
    assert meta["encoder/layers_0/mlp/wi/kernel"].dtype == np.float32
    assert meta["encoder/encoder_norm/scale"].dtype == np.float32
    assert_leaves_equal(t5x.Reader(dest).read_all(), io.flatten(new))


@pytest.mark.parametrize("source", ["orbax-ocdbt"], indirect=True)
def test_orbax_item_directory_in_item_directory_out(source, tmp_path):
    reader = t5x.Reader(source / "state")
    assert reader.layout == "orbax"
    (tmp_path / "out").mkdir()
    dest = io.save(tmp_path / "out" / "item", target_params(4), "t5x", source=reader)
    assert (dest / "_METADATA").is_file() and not (dest / "state").exists()
    assert t5x.detect(dest)
    assert_leaves_equal(io.flatten(io.load(dest)), io.flatten(target_params(4)))
    no_strays(dest)


@pytest.mark.parametrize("source", ["legacy", "orbax-ocdbt"], indirect=True)
def test_streaming_merge_t5x_in_t5x_out(source, tmp_path):
    fts = []
    for i in (1, 2):
        ft = tmp_path / f"ft{i}"
        if (source / "checkpoint").is_file():
            fts.append(write_legacy(ft, train_state(i)))
        else:
            fts.append(write_orbax(ft, train_state(i), use_ocdbt=True))

    def average(w0, tasks, *, key=None, alpha=1.0):
        return jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x, np.float32) for x in xs]), 0).astype(xs[0].dtype), *tasks)

    out = tmp_path / "merged" / f"checkpoint_{STEP}"
    out.parent.mkdir()
    report = merge_checkpoints(source, fts, out, average, budget_bytes=4096)
    assert report.num_groups > 1
    want = jax.tree.map(
        lambda a, b: ((a.astype(np.float32) + b.astype(np.float32)) / 2).astype(a.dtype), target_params(1), target_params(2)
    )
    assert_leaves_equal(t5x.Reader(out).read_all(), io.flatten(want))
    assert split(full_state(out))[1]["state/step"] == STEP


# --------------------------------------------------------------------------
# Atomicity


@pytest.mark.parametrize("source", LAYOUTS, indirect=True)
def test_abort_and_exceptions_leave_nothing(source, tmp_path):
    reader = t5x.Reader(source)
    new = io.flatten(target_params(1))
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "ckpt"
    writer = t5x.Writer(dest, reader.metadata(), source=reader)
    writer.write(dict(list(new.items())[:3]))
    writer.abort()
    no_strays(dest)
    assert not dest.exists()

    with pytest.raises(RuntimeError, match="boom"):
        with t5x.Writer(dest, reader.metadata(), source=reader) as writer:
            writer.write(dict(list(new.items())[:3]))
            raise RuntimeError("boom")
    no_strays(dest)
    assert not dest.exists()

    writer = t5x.Writer(dest, reader.metadata(), source=reader)
    writer.write(dict(list(new.items())[:-1]))
    with pytest.raises(CheckpointError, match="never written"):
        writer.commit()
    no_strays(dest)
    assert not dest.exists()


def test_writer_input_checks(sources, tmp_path):
    reader = t5x.Reader(sources["legacy"])
    meta = reader.metadata()
    with pytest.raises(CheckpointError, match="needs source="):
        io.open_writer(tmp_path / "a", meta, "t5x")
    orbax_reader = io.open_reader(io.save(tmp_path / "plain", {"w": np.ones(2, np.float32)}, "orbax"))
    with pytest.raises(CheckpointError, match="must be a T5X checkpoint"):
        t5x.Writer(tmp_path / "b", meta, source=orbax_reader)
    with pytest.raises(CheckpointError, match="lacks 'decoder/logits_dense/kernel'"):
        t5x.Writer(tmp_path / "c", {p: s for p, s in meta.items() if "logits" not in p}, source=reader)
    bad = dict(meta, **{"token_embedder/embedding": jax.ShapeDtypeStruct((4, 4), np.float32)})
    with pytest.raises(CheckpointError, match="token_embedder/embedding"):
        t5x.Writer(tmp_path / "d", bad, source=reader)
    # A path works as source too.
    writer = t5x.Writer(tmp_path / "e", meta, source=sources["orbax"])
    assert writer.layout == "orbax"
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


# --------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("source", ["legacy"], indirect=True)
def test_truncated_or_corrupt_msgpack(source):
    file = source / "checkpoint"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        t5x.Reader(source)
    file.write_bytes(b"\x82\xc1garbage")
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        t5x.Reader(source)
    file.write_bytes(serialization.to_bytes({"version": 3, "optimizer": {"state": {}}}))
    with pytest.raises(CheckpointError, match="no 'target'"):
        t5x.Reader(source)


@pytest.mark.parametrize("source", ["legacy"], indirect=True)
def test_missing_or_damaged_tensorstore_array(source):
    gone = source / "target.encoder.layers_0.mlp.wi.kernel"
    shutil.rmtree(gone)
    reader = t5x.Reader(source)
    with pytest.raises(CheckpointError, match=re.escape(str(gone)) + ".*encoder/layers_0/mlp/wi/kernel"):
        reader.read(["encoder/layers_0/mlp/wi/kernel"])
    damaged = source / "target.token_embedder.embedding"
    chunk = next(p for p in damaged.iterdir() if p.name != ".zarray")
    chunk.write_bytes(b"not gzip")
    with pytest.raises(CheckpointError, match=re.escape(str(damaged)) + ".*token_embedder/embedding"):
        reader.read(["token_embedder/embedding"])
    (damaged / ".zarray").write_text("{")
    with pytest.raises(CheckpointError, match=re.escape(str(damaged))):
        t5x.Reader(source).read(["token_embedder/embedding"])


@pytest.mark.parametrize("source", ["orbax"], indirect=True)
def test_orbax_damaged_item(source):
    shutil.rmtree(source / "state" / "target.token_embedder.embedding")
    with pytest.raises(CheckpointError, match=re.escape(str((source / "state").absolute()))):
        t5x.Reader(source).read(["token_embedder/embedding"])


@pytest.mark.parametrize("source", ["legacy"], indirect=True)
def test_legacy_specs_written_on_gcs_are_read_locally(source, tmp_path):
    """t5x writes gs:// checkpoints with a 'gcs' kvstore and the dummy bucket; copied locally, they still load."""
    file = source / "checkpoint"
    contents = serialization.msgpack_restore(file.read_bytes())
    kernel = contents["optimizer"]["target"]["token_embedder"]["embedding"]
    kernel["kvstore"] = {"bucket": "t5x-dummy-bucket", "driver": "gcs", "path": kernel["kvstore"]["path"]}
    file.write_bytes(serialization.msgpack_serialize(contents))
    reader = t5x.Reader(source)
    np.testing.assert_array_equal(
        reader.read(["token_embedder/embedding"])["token_embedder/embedding"], target_params(0)["token_embedder"]["embedding"]
    )
    (tmp_path / "out").mkdir()
    dest = io.save(tmp_path / "out" / "ckpt", io.unflatten(reader.read_all()), "t5x", source=reader)
    assert (dest / "checkpoint").read_bytes() == file.read_bytes()  # the spec is kept as t5x wrote it
    assert_leaves_equal(t5x.Reader(dest).read_all(), io.flatten(target_params(0)))


# --------------------------------------------------------------------------
# Current T5X orbax steps with a dataset item; model directories


class DatasetHandler(ocp.CheckpointHandler):
    """A stand-in for t5x's DatasetCheckpointHandler (a tf.train.Checkpoint of the
    iterator in ``dataset/``): writes and reads the same kind of files."""

    def save(self, directory, args):
        (directory / "train_ds.index").write_bytes(args.item)
        (directory / "train_ds.data-00000-of-00001").write_bytes(args.item[::-1])

    def restore(self, directory, args=None):
        return (directory / "train_ds.index").read_bytes()


@ocp.args.register_with_handler(DatasetHandler, for_save=True, for_restore=True)
class DatasetArgs(ocp.args.CheckpointArgs):
    def __init__(self, item: bytes | None = None):
        self.item = item


def write_orbax_with_dataset(root, state: dict, step: int = STEP):
    """As t5x's OrbaxCheckpointManagerInterface: items 'state' (OCDBT, t5x's setting) and 'dataset'."""
    manager = ocp.CheckpointManager(
        root,
        item_names=("state", "dataset"),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True), "dataset": DatasetHandler()},
        options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True),
    )
    state_args = ocp.args.PyTreeSave(jax.tree.map(jnp.asarray, state))
    manager.save(step, args=ocp.args.Composite(state=state_args, dataset=DatasetArgs(b"iterator at %d" % step)))
    manager.wait_until_finished()
    manager.close()
    return root / f"checkpoint_{step}"


def test_orbax_ocdbt_step_with_dataset_item_merged_and_written_back(tmp_path):
    pre = write_orbax_with_dataset(tmp_path / "pre", train_state(0))
    fts = [write_orbax_with_dataset(tmp_path / f"ft{i}", train_state(i)) for i in (1, 2)]
    assert (pre / "dataset" / "train_ds.index").is_file() and (pre / "state" / "manifest.ocdbt").is_file()
    for path in (pre, pre.parent, pre / "state"):  # step, model dir, item
        assert io.detect_format(path) == "t5x" and t5x.Reader(path).layout == "orbax"
    assert_leaves_equal(t5x.Reader(pre.parent).read_all(), io.flatten(target_params(0)))

    def task_arithmetic(w0, tasks, *, key=None, alpha=1.0):  # NumPy: the I/O is under test, not the merger
        f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
        one = lambda a, *ts: (f32(a) + alpha * sum(f32(t) - f32(a) for t in ts)).astype(a.dtype)  # noqa: E731
        return jax.tree.map(one, w0, *tasks)

    out = tmp_path / "merged" / f"checkpoint_{STEP}"
    merge_checkpoints(pre.parent, [f.parent for f in fts], out, task_arithmetic, alpha=0.5, budget_bytes=4096)
    w0, w1, w2 = (io.flatten(target_params(i)) for i in (0, 1, 2))
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    want = {p: (f32(a) + 0.5 * ((f32(w1[p]) - f32(a)) + (f32(w2[p]) - f32(a)))).astype(a.dtype) for p, a in w0.items()}
    got = t5x.Reader(out).read_all()
    assert_leaves_equal(got, want)

    assert json.loads((out / "state" / "_METADATA").read_text())["use_ocdbt"] is True
    for f in files(pre / "dataset"):  # the dataset item is copied
        assert (out / "dataset" / f).read_bytes() == (pre / "dataset" / f).read_bytes()
    handlers = json.loads((out / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert set(handlers) == {"state", "dataset"}
    # t5x restores both items through a CheckpointManager over the model directory.
    manager = ocp.CheckpointManager(
        out.parent,
        item_names=("state", "dataset"),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "dataset": DatasetHandler()},
        options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=False),
    )
    restored = manager.restore(STEP, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(), dataset=DatasetArgs()))
    manager.close()
    assert restored["dataset"] == b"iterator at %d" % STEP
    np.testing.assert_array_equal(np.asarray(restored["state"]["state"]["step"]), STEP)
    embedding = restored["state"]["target"]["token_embedder"]["embedding"]
    np.testing.assert_array_equal(np.asarray(embedding), got["token_embedder/embedding"])
    assert_leaves_equal(split(full_state(out))[1], split(full_state(pre))[1])  # optimizer state copied


def test_model_dir_reads_its_latest_step_in_numeric_order(tmp_path, sources):
    model = tmp_path / "model"
    model.mkdir()
    for step, seed in ((2, 2), (9, 9), (10, 10)):  # '10' sorts before '9' as text
        shutil.copytree(write_legacy(tmp_path / f"w{step}", train_state(seed)), model / f"checkpoint_{step}")
    (model / "checkpoint_11.tmp-1700000000").mkdir()  # t5x's unfinished save: not a step
    (model / "checkpoint_12.orbax-checkpoint-tmp-3").mkdir()  # orbax's
    (model / "checkpoints.txt").write_text("not a step")
    assert t5x.detect(model) and io.detect_format(model) == "t5x"
    assert [d.name for _, d in t5x.step_dirs(model)] == ["checkpoint_2", "checkpoint_9", "checkpoint_10"]
    reader = io.open_reader(model)
    assert reader.path == model / "checkpoint_10" and reader.layout == "legacy"
    assert_leaves_equal(io.flatten(io.load(model)), io.flatten(target_params(10)))
    # An orbax model directory too (t5x's CheckpointManager root).
    assert t5x.Reader(sources["orbax"].parent).path.name == f"checkpoint_{STEP}"


def test_model_dir_without_steps_or_with_a_foreign_latest_step(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "checkpoint_x").mkdir()
    assert not t5x.detect(empty)
    with pytest.raises(CheckpointError, match=r"no checkpoint_<N> step directories"):
        t5x.Reader(empty)
    model = tmp_path / "model"
    (model / "checkpoint_3").mkdir(parents=True)
    (model / "checkpoint_3" / "notes.txt").write_text("")
    write_legacy(tmp_path / "w", train_state(0)).rename(model / "checkpoint_1")
    assert not t5x.detect(model)  # the latest step decides, as in t5x
    with pytest.raises(CheckpointError, match=r"latest step checkpoint_3 is not a T5X checkpoint"):
        t5x.Reader(model)
