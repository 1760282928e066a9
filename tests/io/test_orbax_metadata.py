"""orbax metadata without opening arrays: the fast path equals orbax's own, and falls back to it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore
from test_io_formats import params_tree

from pact_jax import io
from pact_jax.io import CheckpointError, t5x
from pact_jax.io import orbax as orbax_io


def nested_tree():
    """test_io_formats' tree (bfloat16, three levels of nesting) with 0-d leaves and ints."""
    tree = params_tree()
    tree["params"]["temperature"] = np.asarray(0.5, np.float32)  # 0-d
    return {**tree, "step": np.asarray(7, np.int32), "counts": np.arange(4, dtype=np.int64)}


def orbax_metadata(item) -> dict[str, jax.ShapeDtypeStruct]:
    """orbax's own answer (it opens every array), flattened like the reader's."""
    tree = ocp.PyTreeCheckpointHandler().metadata(item.absolute()).tree
    return {p: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for p, m in io.flatten(tree).items()}


def fast_metadata(item) -> dict[str, jax.ShapeDtypeStruct]:
    fast = orbax_io.read_array_metadata(item.absolute())
    assert fast is not None, f"{item}: the fast path did not cover this layout"
    return {"/".join(k): m for k, m in fast.items()}


def no_tensorstore_arrays(monkeypatch):
    """``tensorstore.open`` (how orbax opens an array) fails the test; KvStore reads stay allowed."""
    opened = []

    def refuse(*args, **kwargs):
        opened.append(args)
        raise AssertionError("a TensorStore array was opened to read metadata")

    monkeypatch.setattr(tensorstore, "open", refuse)
    return opened


def save_with_handler(path, tree, **handler_kwargs):
    """A plain orbax PyTree item written by ``PyTreeCheckpointHandler`` (not by pact_jax)."""
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**handler_kwargs))
    ckptr.save(path.absolute(), args=ocp.args.PyTreeSave(tree))
    ckptr.close()
    return path


def write_in_groups(path, tree, group_size=2, as_jax=False):
    """Through pact_jax's orbax writer group by group, as a streamed merge writes
    (``as_jax``: the leaves as ``jax.Array`` s)."""
    flat = io.flatten(tree)
    template = {p: jax.ShapeDtypeStruct(np.shape(a), a.dtype) for p, a in flat.items()}
    paths = list(flat)
    with io.open_writer(path, template, "orbax") as w:
        for i in range(0, len(paths), group_size):
            group = {p: flat[p] for p in paths[i : i + group_size]}
            w.write({p: jnp.asarray(a) for p, a in group.items()} if as_jax else group)
        w.commit()
    return path


LAYOUTS = {
    # pact_jax's own saves: orbax v1, OCDBT + zarr3, NumPy leaves.
    "io.save": lambda d: io.save(d / "c", nested_tree(), "orbax") / "state",
    "pact_jax writer, in groups": lambda d: write_in_groups(d / "c", nested_tree()) / "state",
    # jax.Array leaves (orbax also writes _sharding and array_metadatas/).
    "jax arrays, ocdbt, zarr2": lambda d: save_with_handler(d / "c", jax.tree.map(jnp.asarray, nested_tree())),
    "numpy, no ocdbt, zarr2": lambda d: save_with_handler(d / "c", nested_tree(), use_ocdbt=False),
    "numpy, no ocdbt, zarr3": lambda d: save_with_handler(d / "c", nested_tree(), use_ocdbt=False, use_zarr3=True),
    # Python scalars are orbax 'scalar' leaves.
    "python scalars": lambda d: save_with_handler(d / "c", {"a": {"lr": 0.25, "step": 3}, "w": np.ones((2, 3), np.float32)}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fast_metadata_equals_orbax_and_opens_no_array(tmp_path, layout, monkeypatch):
    item = LAYOUTS[layout](tmp_path)
    want = orbax_metadata(item)  # before tensorstore.open is refused
    assert want
    opened = no_tensorstore_arrays(monkeypatch)
    got = fast_metadata(item)
    assert got == want and list(got) == list(want)  # shapes, dtypes and leaf order
    reader = io.open_reader(item.parent if item.name == "state" else item)
    assert reader.metadata() == want and list(reader.metadata()) == list(want)
    assert opened == []


def test_old_path_would_fail_the_check(tmp_path, monkeypatch):
    """The check above catches orbax's metadata path (it opens every leaf's TensorStore array)."""
    dest = io.save(tmp_path / "c", nested_tree(), "orbax")
    opened = no_tensorstore_arrays(monkeypatch)
    monkeypatch.setattr(orbax_io, "read_array_metadata", lambda item: None)
    with pytest.raises(CheckpointError, match="a TensorStore array was opened"):
        io.open_reader(dest).metadata()
    assert opened


def test_streamed_merge_reads_metadata_without_opening_arrays(tmp_path, monkeypatch):
    """merge_checkpoints opens TensorStore arrays only to restore groups, never for metadata."""
    from pact_jax import recipes
    from pact_jax.io import streaming

    pre = io.save(tmp_path / "pre", nested_tree(), "orbax")
    fts = [write_in_groups(tmp_path / f"ft{i}", jax.tree.map(lambda a, i=i: a + i, nested_tree())) for i in range(1, 3)]
    calls = {"metadata": 0}
    real = ocp.PyTreeCheckpointHandler.metadata

    def counted(self, directory):
        calls["metadata"] += 1
        return real(self, directory)

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "metadata", counted)
    merge = recipes.make_merge("task_arithmetic")
    streaming.merge_checkpoints(pre, fts, tmp_path / "out", merge, budget_bytes=4096)
    assert calls["metadata"] == 0
    assert io.open_reader(tmp_path / "out").metadata() == orbax_metadata(tmp_path / "pre" / "state")


def test_t5x_orbax_state_item(tmp_path, monkeypatch):
    """A T5X orbax step (CheckpointManager item 'state': target + optimizer state, jax.Arrays)."""
    rng = np.random.default_rng(1)
    target = {"encoder": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
              "token_embedder": {"embedding": rng.normal(size=(8, 4)).astype(jnp.bfloat16)}}  # fmt: skip
    state = {"target": target, "state": {"step": np.array(5, np.int32), "param_states": {"encoder": {"v": np.zeros(3, np.float32)}}}}
    for use_ocdbt in (True, False):
        root = tmp_path / f"ocdbt_{use_ocdbt}"
        manager = ocp.CheckpointManager(
            root,
            item_names=("state",),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)},
            options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True),
        )
        manager.save(5, args=ocp.args.Composite(state=ocp.args.PyTreeSave(jax.tree.map(jnp.asarray, state))))
        manager.wait_until_finished()
        manager.close()
        step = root / "checkpoint_5"
        want = orbax_metadata(step / "state")
        with monkeypatch.context() as m:
            no_tensorstore_arrays(m)
            assert fast_metadata(step / "state") == want
        # The T5X reader reads the target's metadata the same way (no array opened) and agrees,
        # as does its fallback to orbax's metadata path.
        target_want = {p[len("target/") :]: s for p, s in want.items() if p.startswith("target/")}
        with monkeypatch.context() as m:
            no_tensorstore_arrays(m)
            assert t5x.Reader(step).metadata() == target_want
        with monkeypatch.context() as m:
            m.setattr(orbax_io, "read_array_metadata", lambda item: None)
            assert t5x.Reader(step).metadata() == target_want


def test_fallback_to_orbax_for_layouts_not_covered(tmp_path):
    # Sequence keys (a list in the tree): orbax's path.
    listy = save_with_handler(tmp_path / "listy", {"layers": [np.ones(2, np.float32), np.zeros((3, 1), np.float32)]})
    assert orbax_io.read_array_metadata(listy.absolute()) is None
    meta = io.open_reader(listy).metadata()
    assert meta == orbax_metadata(listy) and set(meta) == {"layers/0", "layers/1"}
    # An older _METADATA without 'use_ocdbt': orbax's path (it looks at the directory).
    dest = io.save(tmp_path / "old", nested_tree(), "orbax")
    item = dest / "state"
    md = json.loads((item / "_METADATA").read_text())
    del md["use_ocdbt"]
    (item / "_METADATA").write_text(json.dumps(md))
    assert orbax_io.read_array_metadata(item.absolute()) is None
    assert io.open_reader(dest).metadata() == orbax_metadata(item)
    # A leaf listed in _METADATA whose zarr metadata is missing: not covered, and orbax names the problem.
    md["use_ocdbt"] = True
    md["tree_metadata"]["('ghost',)"] = {
        "key_metadata": [{"key": "ghost", "key_type": 2}],
        "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
    }
    (item / "_METADATA").write_text(json.dumps(md))
    assert orbax_io.read_array_metadata(item.absolute()) is None
    with pytest.raises(CheckpointError, match="cannot read orbax metadata"):
        io.open_reader(dest).metadata()


def test_t5x_fast_path_rejects_target_keys_with_slashes(tmp_path):
    manager = ocp.CheckpointManager(
        tmp_path / "t5x",
        item_names=("state",),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True),
    )
    state = {"target": {"a/b": np.ones(2, np.float32)}, "state": {"step": np.array(1, np.int32)}}
    manager.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    manager.wait_until_finished()
    manager.close()
    step = tmp_path / "t5x" / "checkpoint_1"
    assert orbax_io.read_array_metadata((step / "state").absolute()) is not None  # the fast path is taken
    with pytest.raises(CheckpointError, match="free of '/'"):
        t5x.Reader(step).metadata()


def test_fast_path_rejects_keys_with_slashes(tmp_path):
    item = save_with_handler(tmp_path / "c", {"a/b": np.ones(2, np.float32)})
    assert orbax_io.read_array_metadata(item.absolute()) is not None
    with pytest.raises(CheckpointError, match="free of '/'"):
        io.open_reader(item).metadata()
