"""orbax as users save it: the output mirrors the pre-trained input's layout (StandardCheckpointer
directory, a CheckpointManager step's named item), CheckpointManager roots are read (latest step,
or the one asked for) and written (a new step beside the others)."""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint import v1 as ocp_v1

from pact_jax import cli, io, recipes
from pact_jax.io import CheckpointError, orbax_manager, streaming


def tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"params": {"dense": {"kernel": rng.normal(size=(6, 4)).astype(np.float32),
                                 "bias": rng.normal(size=(4,)).astype(np.float32)},
                       "head": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)}}}  # fmt: skip


PRE, FTS = tree(0), [tree(1), tree(2)]
MERGE = recipes.make_merge("task_arithmetic")


def expected():
    return MERGE(PRE, FTS)


def assert_close(got, want):
    got, want = io.flatten(got), io.flatten(want)
    assert sorted(got) == sorted(want)
    for p in want:
        np.testing.assert_allclose(np.asarray(got[p]), np.asarray(want[p]), rtol=1e-6, atol=1e-7, err_msg=p)


def standard_save(path, t):
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path.absolute(), t)
    ckptr.wait_until_finished()
    return path


def manager_save(root, steps_trees, item=None, **options):
    """``CheckpointManager(root).save(step, ...)``: StandardSave (item 'default'), or Composite(item=...)."""
    kw = {"item_names": (item,)} if item else {}
    mgr = ocp.CheckpointManager(root.absolute(), options=ocp.CheckpointManagerOptions(**options), **kw)
    for step, t in steps_trees.items():
        args = ocp.args.Composite(**{item: ocp.args.StandardSave(t)}) if item else ocp.args.StandardSave(t)
        mgr.save(step, args=args)
    mgr.wait_until_finished()
    mgr.close()
    return root


def manager_restore(root, step, target, item=None, **options):
    mgr = ocp.CheckpointManager(root.absolute(), options=ocp.CheckpointManagerOptions(**options),
                                **({"item_names": (item,)} if item else {}))  # fmt: skip
    try:
        if item:
            return mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]
        return mgr.restore(step, args=ocp.args.StandardRestore(target))
    finally:
        mgr.close()


def test_standard_checkpointer_input_gives_a_standard_checkpointer_output(tmp_path):
    pre = standard_save(tmp_path / "pre", PRE)
    fts = [standard_save(tmp_path / f"ft{i}", t) for i, t in enumerate(FTS)]
    streaming.merge_checkpoints(pre, fts, tmp_path / "out", MERGE)
    out = tmp_path / "out"
    assert (out / "_METADATA").is_file() and not (out / "state").exists()
    assert_close(ocp.StandardCheckpointer().restore(out.absolute(), PRE), expected())  # the user's own call
    assert_close(ocp.StandardCheckpointer().restore(out.absolute()), expected())  # without a target too
    handlers = json.loads((out / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert handlers == json.loads((pre / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert_close(io.load(out), expected())


def test_v1_input_keeps_the_v1_layout(tmp_path):
    pre = io.save(tmp_path / "pre", PRE)
    fts = [io.save(tmp_path / f"ft{i}", t) for i, t in enumerate(FTS)]
    streaming.merge_checkpoints(pre, fts, tmp_path / "out", MERGE)
    assert (tmp_path / "out" / "state" / "_METADATA").is_file()
    assert_close(ocp_v1.load((tmp_path / "out").absolute()), expected())


def test_named_item_of_a_manager_step_keeps_its_name(tmp_path):
    pre = manager_save(tmp_path / "pre", {3: PRE}, item="params") / "3"
    fts = [manager_save(tmp_path / f"ft{i}", {9: t}, item="params") / "9" for i, t in enumerate(FTS)]
    streaming.merge_checkpoints(pre, fts, tmp_path / "out", MERGE)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["params"]
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
        out.absolute(), args=ocp.args.Composite(params=ocp.args.StandardRestore(PRE))
    )
    assert_close(restored["params"], expected())
    # Written back as a step of a manager root: restored by the manager under the same item name.
    streaming.merge_checkpoints(pre, fts, tmp_path / "root", MERGE, output_step=4)
    assert_close(manager_restore(tmp_path / "root", 4, PRE, item="params"), expected())


def test_manager_root_input_latest_or_asked_step(tmp_path):
    junk = jax.tree.map(lambda a: a + 100, PRE)
    root = manager_save(tmp_path / "pre", {1: junk, 3: junk, 5: PRE})
    assert list(orbax_manager.steps(root)) == [1, 3, 5] and orbax_manager.is_manager_root(root)
    assert not orbax_manager.is_manager_root(root / "5")  # a step is a checkpoint
    assert_close(io.load(root), PRE)  # the latest step
    assert_close(io.load(root, step=1), junk)
    with pytest.raises(CheckpointError, match=r"no step 4 in this CheckpointManager root; its steps are \[1, 3, 5\]"):
        io.open_reader(root, step=4)
    with pytest.raises(CheckpointError, match="not a CheckpointManager root"):
        io.open_reader(root / "5", step=5)
    fts = [manager_save(tmp_path / f"ft{i}", {2: junk, 7: t}) for i, t in enumerate(FTS)]
    streaming.merge_checkpoints(root, fts, tmp_path / "out", MERGE)  # each root's latest step
    assert_close(io.load(tmp_path / "out"), expected())
    # A step that is not in every root: named with the root that lacks it.
    with pytest.raises(CheckpointError, match="no step 5 .* steps are \\[2, 7\\]"):
        streaming.merge_checkpoints(root, fts, tmp_path / "x", MERGE, step=5)
    with pytest.raises(CheckpointError, match="no input is an orbax CheckpointManager root"):
        streaming.merge_checkpoints(root / "5", [f / "7" for f in fts], tmp_path / "x", MERGE, step=5)
    assert not (tmp_path / "x").exists()


def test_output_step_into_new_and_existing_roots(tmp_path):
    pre = standard_save(tmp_path / "pre", PRE)
    fts = [standard_save(tmp_path / f"ft{i}", t) for i, t in enumerate(FTS)]
    # A new root: restorable by CheckpointManager(root).restore(N, ...).
    streaming.merge_checkpoints(pre, fts, tmp_path / "new", MERGE, output_step=10)
    assert_close(manager_restore(tmp_path / "new", 10, PRE), expected())
    # An existing root: the new step beside the others, which are not touched.
    root = manager_save(tmp_path / "root", {1: FTS[0], 2: FTS[1]})
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    report = streaming.merge_checkpoints(pre, fts, root, MERGE, output_step=3)
    assert report.output == root / "3"
    mgr = ocp.CheckpointManager(root.absolute())
    assert mgr.all_steps() == [1, 2, 3] and mgr.latest_step() == 3
    mgr.close()
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in root.iterdir()) == ["1", "2", "3"]  # no lock or staging leftovers
    assert_close(manager_restore(root, 3, PRE), expected())
    assert_close(manager_restore(root, 1, PRE), FTS[0])
    # An existing step: refused, then replaced with overwrite.
    with pytest.raises(CheckpointError, match=r"step 2 already exists .*Steps there: \[1, 2, 3\]"):
        streaming.merge_checkpoints(pre, fts, root, MERGE, output_step=2)
    assert_close(manager_restore(root, 2, PRE), FTS[1])
    streaming.merge_checkpoints(pre, fts, root, MERGE, output_step=2, overwrite=True)
    assert_close(manager_restore(root, 2, PRE), expected())
    # The pre-trained checkpoint may be a step of the output root (read as that step).
    streaming.merge_checkpoints(root, fts, root, MERGE, step=1, output_step=4)
    assert_close(manager_restore(root, 4, PRE), MERGE(FTS[0], FTS))
    # A checkpoint is not a root.
    with pytest.raises(CheckpointError, match="is an orbax checkpoint, not a CheckpointManager root"):
        streaming.merge_checkpoints(pre, fts, standard_save(tmp_path / "other", PRE), MERGE, output_step=1)


def test_output_step_follows_the_roots_step_names(tmp_path):
    root = manager_save(tmp_path / "root", {5: FTS[0]}, step_prefix="ckpt", step_format_fixed_length=4)
    assert [p.name for p in root.iterdir()] == ["ckpt_0005"]
    pre = standard_save(tmp_path / "pre", PRE)
    fts = [standard_save(tmp_path / f"ft{i}", t) for i, t in enumerate(FTS)]
    streaming.merge_checkpoints(pre, fts, root, MERGE, output_step=12)
    assert sorted(p.name for p in root.iterdir()) == ["ckpt_0005", "ckpt_0012"]
    opts = {"step_prefix": "ckpt", "step_format_fixed_length": 4}
    assert_close(manager_restore(root, 12, PRE, **opts), expected())


def test_cli_step_and_output_step(tmp_path, capsys):
    root = manager_save(tmp_path / "pre", {1: PRE, 2: jax.tree.map(lambda a: a * 0, PRE)})
    fts = [str(standard_save(tmp_path / f"ft{i}", t)) for i, t in enumerate(FTS)]
    args = ["merge", "--pretrained", str(root), "--finetuned", *fts, "--method", "task_arithmetic", "--no-progress"]
    assert cli.main([*args, "--step", "1", "--output", str(tmp_path / "out"), "--output-step", "3"]) == 0
    assert_close(manager_restore(tmp_path / "out", 3, PRE), expected())
    assert cli.main([*args, "--step", "9", "--output", str(tmp_path / "x")]) == 1
    assert "no step 9" in capsys.readouterr().err
    assert cli.main([*args, "--step", "1", "--output", str(tmp_path / "out"), "--output-step", "3"]) == 1
    assert "step 3 already exists" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text(f"pretrained: pre\nfinetuned: {fts}\nmethod: task_arithmetic\noutput: out\nstep: 1\n"
                      "output_step: 5\nprogress: false\n")  # fmt: skip
    assert cli.main(["merge", str(config)]) == 0
    assert_close(manager_restore(tmp_path / "out", 5, PRE), expected())
    assert cli.main([*args, "--output", str(tmp_path / "x"), "--output-step", "-1"]) == 2
    capsys.readouterr()
    assert cli.main(["inspect", str(root), "--step", "1"]) == 0
    assert f"{root / '1'} (orbax)" in capsys.readouterr().out
    assert cli.main(["inspect", str(tmp_path / "out")]) == 0  # the latest step
    assert f"{tmp_path / 'out' / '5'} (orbax)" in capsys.readouterr().out
