"""Train states (params + optax state + step): only the params are merged, the rest is copied or
dropped, and the output restores into the TrainState it came from (orbax and flax msgpack)."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from flax.training import train_state

from pact_jax import cli, io, recipes
from pact_jax.io import CheckpointError, streaming, subtree


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))


def trained_state(params, seed: int, steps: int = 2) -> train_state.TrainState:
    """A TrainState with optax.adam after ``steps`` updates (mu, nu and count non-zero, per seed)."""
    model = MLP()
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), state.params)
        state = state.apply_gradients(grads=grads)
    return state


@pytest.fixture(scope="module")
def states():
    """A pre-trained TrainState and two fine-tuned ones (their own params, moments and steps)."""
    params = MLP().init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    pre = trained_state(params, seed=0, steps=1)
    fts = [trained_state(params, seed=s, steps=2 + s) for s in (1, 2)]
    return pre, fts


def save_orbax(path, state):
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path.absolute(), state)
    ckptr.wait_until_finished()
    return path


def save_msgpack(path, state):
    path.write_bytes(serialization.to_bytes(state))
    return path


def params_merge(method, pre, fts, key):
    """The API merge of the params trees alone: what the train state's params must become
    (TSV with PACT, as in the issue; TIES alone)."""
    merge = recipes.make_merge(method, use_pact=method == "tsv", method_kwargs={"density": 0.5} if method == "ties" else {})
    return merge, io.flatten(merge(pre.params, [f.params for f in fts], key=key))


def leaves(tree):
    return {p: np.asarray(v) for p, v in io.flatten(tree).items()}


def assert_tree_equal(got, want, **tol):
    got, want = leaves(got), leaves(want)
    assert sorted(got) == sorted(want)
    for p in want:
        if tol:
            np.testing.assert_allclose(got[p], want[p], err_msg=p, **tol)
        else:
            np.testing.assert_array_equal(got[p], want[p], err_msg=p)


def test_optax_state_reads_from_orbax(tmp_path, states):
    """Tuples and namedtuples (ScaleByAdamState, EmptyState) read: was 'Type mismatch at key path ('opt_state',)'."""
    pre, _ = states
    path = save_orbax(tmp_path / "pre", pre)
    with io.open_reader(path) as reader:
        meta = reader.metadata()
        assert "opt_state/0/mu/Dense_0/kernel" in meta and "step" in meta
        assert reader.empty_nodes() == {"opt_state/1": "None"}  # optax's EmptyState
        got = reader.load()
    np.testing.assert_array_equal(got["opt_state"]["0"]["nu"]["Dense_1"]["bias"], pre.opt_state[0].nu["Dense_1"]["bias"])
    np.testing.assert_array_equal(got["params"]["Dense_0"]["kernel"], pre.params["Dense_0"]["kernel"])


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
@pytest.mark.parametrize("method", ["ties", "tsv"])
def test_train_state_merges_params_only_and_keeps_the_rest(tmp_path, states, fmt, method):
    pre, fts = states
    save = save_orbax if fmt == "orbax" else save_msgpack
    suffix = "" if fmt == "orbax" else ".msgpack"
    pre_path = save(tmp_path / f"pre{suffix}", pre)
    ft_paths = [save(tmp_path / f"ft{i}{suffix}", f) for i, f in enumerate(fts)]
    # A merge of everything would change the moments: they differ between the checkpoints.
    assert not np.allclose(pre.opt_state[0].mu["Dense_0"]["kernel"], fts[0].opt_state[0].mu["Dense_0"]["kernel"])
    key = jax.random.key(7)
    merge, want = params_merge(method, pre, fts, key)
    out = tmp_path / f"out{suffix}"
    report = streaming.merge_checkpoints(pre_path, ft_paths, out, merge, key=key)
    assert "merged the 'params' subtree only" in report.summary() and "(opt_state, step) copied" in report.summary()
    # Restores into the pre-trained TrainState with the user's own call.
    if fmt == "orbax":
        back = ocp.StandardCheckpointer().restore(out.absolute(), pre)
    else:
        back = serialization.from_bytes(pre, out.read_bytes())
    assert isinstance(back.opt_state[0], optax.ScaleByAdamState) and isinstance(back.opt_state[1], optax.EmptyState)
    assert_tree_equal(back.params, io.unflatten(want), rtol=1e-6, atol=1e-7)
    assert_tree_equal(back.opt_state, pre.opt_state)  # mu, nu, count: the pre-trained checkpoint's, exactly
    assert int(back.step) == int(pre.step)


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_drop_writes_the_params_alone(tmp_path, states, fmt):
    pre, fts = states
    save = save_orbax if fmt == "orbax" else save_msgpack
    suffix = "" if fmt == "orbax" else ".msgpack"
    pre_path = save(tmp_path / f"pre{suffix}", pre)
    ft_paths = [save(tmp_path / f"ft{i}{suffix}", f) for i, f in enumerate(fts)]
    merge = recipes.make_merge("task_arithmetic")
    out = tmp_path / f"out{suffix}"
    report = streaming.merge_checkpoints(pre_path, ft_paths, out, merge, other_leaves="drop")
    assert "dropped" in report.summary()
    got = io.load(out)
    assert list(got) == ["params"]
    want = merge(pre.params, [f.params for f in fts])
    assert_tree_equal(got["params"], want, rtol=1e-6, atol=1e-7)
    if fmt == "orbax":  # nothing of the optimizer state in orbax's metadata either (no EmptyState entry)
        entries = json.loads((out / "_METADATA").read_text())["tree_metadata"]
        assert all(e["key_metadata"][0]["key"] == "params" for e in entries.values())
        back = ocp.StandardCheckpointer().restore(out.absolute(), {"params": pre.params})
        assert_tree_equal(back["params"], want, rtol=1e-6, atol=1e-7)


def test_explicit_params_path_and_errors(tmp_path, states):
    pre, fts = states
    nest = lambda s: {"state": serialization.to_state_dict(s)}  # noqa: E731 - a train state one level down
    pre_path = save_msgpack(tmp_path / "pre.msgpack", nest(pre))
    ft_paths = [save_msgpack(tmp_path / f"ft{i}.msgpack", nest(f)) for i, f in enumerate(fts)]
    merge = recipes.make_merge("task_arithmetic")
    # Not detected one level down: every float leaf merged, moments included.
    streaming.merge_checkpoints(pre_path, ft_paths, tmp_path / "all.msgpack", merge)
    everything = io.load(tmp_path / "all.msgpack")["state"]
    assert not np.allclose(everything["opt_state"]["0"]["mu"]["Dense_0"]["kernel"], pre.opt_state[0].mu["Dense_0"]["kernel"])
    # In groups of at most 256 bytes: the optimizer state is copied in several reads.
    streaming.merge_checkpoints(pre_path, ft_paths, tmp_path / "p.msgpack", merge, params_path="state/params",
                                budget_bytes=256)  # fmt: skip
    got = io.load(tmp_path / "p.msgpack")["state"]
    assert_tree_equal(got["params"], merge(pre.params, [f.params for f in fts]), rtol=1e-6, atol=1e-7)
    assert_tree_equal(got["opt_state"], serialization.to_state_dict(pre.opt_state))
    assert int(got["step"]) == int(pre.step)
    with pytest.raises(CheckpointError, match=r"no subtree 'model' .*top-level keys are \['state'\]"):
        streaming.merge_checkpoints(pre_path, ft_paths, tmp_path / "x.msgpack", merge, params_path="model")
    with pytest.raises(CheckpointError, match="single leaf"):
        streaming.merge_checkpoints(pre_path, ft_paths, tmp_path / "x.msgpack", merge, params_path="state/step")
    with pytest.raises(CheckpointError, match="other leaves must be one of"):
        streaming.merge_checkpoints(pre_path, ft_paths, tmp_path / "x.msgpack", merge, other_leaves="keep")
    assert not (tmp_path / "x.msgpack").exists()


def test_detection_rule():
    meta = {"params/w": 0, "opt_state/0/mu/w": 0, "step": 0}
    assert subtree.find_params_path(meta) == "params"
    assert subtree.find_params_path({"params/w": 0, "batch_stats/m": 0}) == ""  # Flax variables: all merged
    assert subtree.find_params_path({"params/w": 0, "step": 0}) == ""  # no optimizer state: the step is copied anyway
    assert subtree.find_params_path(meta, "") == "" and subtree.find_params_path(meta, "/params/") == "params"
    # An optimizer state of EmptyStates only (optax.sgd) still marks a train state.
    assert subtree.find_params_path({"params/w": 0, "step": 0}, empty={"opt_state/0": "None"}) == "params"


def test_cli_flags_and_yaml_keys(tmp_path, states, capsys):
    pre, fts = states
    pre_path = save_orbax(tmp_path / "pre", pre)
    ft_paths = [str(save_orbax(tmp_path / f"ft{i}", f)) for i, f in enumerate(fts)]
    base = ["merge", "--pretrained", str(pre_path), "--finetuned", *ft_paths, "--method", "task_arithmetic", "--no-progress"]
    assert cli.main([*base, "--output", str(tmp_path / "out")]) == 0
    assert "(opt_state, step) copied" in capsys.readouterr().out
    want = recipes.make_merge("task_arithmetic")(pre.params, [f.params for f in fts])
    back = ocp.StandardCheckpointer().restore((tmp_path / "out").absolute(), pre)
    assert_tree_equal(back.params, want, rtol=1e-6, atol=1e-7)
    assert_tree_equal(back.opt_state, pre.opt_state)
    config = tmp_path / "c.yaml"
    config.write_text("pretrained: pre\nfinetuned: [ft0, ft1]\nmethod: task_arithmetic\noutput: drop\n"
                      "params_path: params\nother_leaves: drop\nprogress: false\n")  # fmt: skip
    assert cli.main(["merge", str(config)]) == 0
    assert list(io.load(tmp_path / "drop")) == ["params"]
    assert cli.main([*base, "--output", str(tmp_path / "x"), "--other-leaves", "keep"]) == 2
    assert cli.main([*base, "--output", str(tmp_path / "x"), "--params-path", "nope"]) == 1
    assert "no subtree 'nope'" in capsys.readouterr().err
