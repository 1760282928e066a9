"""Merging checkpoints on disk group by group equals merging in memory; bad input writes nothing."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pact_jax import io, recipes
from pact_jax.io import CheckpointError, streaming
from pact_jax.tree import PactInputError


def meta_of(shapes: dict[str, tuple], dtype=np.float32):
    return {p: jax.ShapeDtypeStruct(s, dtype) for p, s in shapes.items()}


def test_plan_groups_covers_every_float_leaf_once_within_budget():
    rng = np.random.default_rng(0)
    shapes = {f"l{i}/kernel": tuple(int(x) for x in rng.choice([4, 8, 16, 32], size=2)) for i in range(40)}
    meta = meta_of(shapes)
    meta["step"] = jax.ShapeDtypeStruct((), np.int32)
    meta["huge/kernel"] = jax.ShapeDtypeStruct((64, 64), np.float32)
    t = 3
    budget = 2 * int(streaming.WORKING_SET_FACTOR * t * 32 * 32 * 4)  # two of the largest small leaves
    groups = streaming.plan_groups(meta, t, budget)
    flat = [p for g in groups for p in g]
    assert sorted(flat) == sorted(p for p in meta if p != "step")  # floats, each exactly once
    for g in groups:
        cost = streaming.working_set_bytes(meta, g, t)
        assert cost <= budget or g == ["huge/kernel"], (g, cost)
    assert streaming.plan_groups(meta, t, None) == [[p for p in meta if p != "step"]]
    with pytest.raises(ValueError, match="budget_bytes"):
        streaming.plan_groups(meta, t, 0)


def test_plan_groups_splits_a_large_bucket_into_equal_chunks():
    meta = meta_of({f"b{i}/kernel": (16, 16) for i in range(10)})
    per_leaf = streaming.working_set_bytes(meta, ["b0/kernel"], 2)
    groups = streaming.plan_groups(meta, 2, 4 * per_leaf)
    assert sorted(len(g) for g in groups) == [3, 3, 4]
    assert sum(len(g) for g in groups) == 10


RECIPES = [
    ("ties", True, {"density": 0.3}),
    ("tsv", True, {}),
    ("iso_cts", True, {}),
    ("dare_ties", False, {"p": 0.5, "density": 0.5}),
]


@pytest.mark.parametrize("method,use_pact,kw", RECIPES)
def test_streamed_merge_equals_in_memory_merge(tmp_path, tiny_checkpoints, method, use_pact, kw):
    pre_dir, ft_dirs, pre, fts = tiny_checkpoints
    merge = recipes.make_merge(method, use_pact=use_pact, method_kwargs=kw, alpha=0.7)
    key = jax.random.key(3)
    want = io.flatten(merge(pre, fts, key=key))
    budget = 4 * len(fts) * 4 * 200  # a few small leaves per group: several groups
    report = streaming.merge_checkpoints(pre_dir, ft_dirs, tmp_path / "out", merge, key=key, budget_bytes=budget)
    assert report.num_groups > 3 and report.num_tasks == 3
    got = io.load(tmp_path / "out")
    assert set(io.flatten(got)) == set(want)
    for p, w in io.flatten(got).items():
        np.testing.assert_allclose(np.asarray(w), np.asarray(want[p]), rtol=1e-5, atol=1e-6, err_msg=p)


def test_streamed_merge_to_other_format_and_alpha_override(tmp_path, tiny_checkpoints):
    pre_dir, ft_dirs, pre, fts = tiny_checkpoints
    merge = recipes.make_merge("task_arithmetic")
    streaming.merge_checkpoints(pre_dir, ft_dirs, tmp_path / "m.msgpack", merge, alpha=0.25)
    want = io.flatten(merge(pre, fts, alpha=0.25))
    for p, w in io.flatten(io.load(tmp_path / "m.msgpack")).items():
        np.testing.assert_allclose(w, np.asarray(want[p]), rtol=1e-6, atol=1e-7, err_msg=p)


def test_non_float_leaves_are_copied_from_pretrained(tmp_path, tiny_models):
    pre, fts = tiny_models
    pre = {**pre, "step": np.int32(7)}
    fts = [{**ft, "step": np.int32(100 + i)} for i, ft in enumerate(fts)]
    pre_dir = io.save(tmp_path / "pre", pre)
    ft_dirs = [io.save(tmp_path / f"ft{i}", ft) for i, ft in enumerate(fts)]
    report = streaming.merge_checkpoints(pre_dir, ft_dirs, tmp_path / "out", recipes.make_merge("average"))
    assert report.copied == ("step",)
    assert int(io.load(tmp_path / "out")["step"]) == 7


def test_output_inside_an_input_is_refused(tmp_path, tiny_checkpoints):
    pre_dir, ft_dirs, *_ = tiny_checkpoints
    merge = recipes.make_merge("average")
    for out in (pre_dir / "merged", ft_dirs[1], tmp_path):
        with pytest.raises(CheckpointError, match="refusing to write"):
            streaming.merge_checkpoints(pre_dir, ft_dirs, out, merge)


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("pre", "ft")))


def test_different_architecture_names_file_and_leaf(tmp_path, tiny_models):
    pre, fts = tiny_models
    pre_dir = io.save(tmp_path / "pre", pre)
    other = {"params": {k: v for k, v in fts[0]["params"].items() if k != "head"}}
    ft_dir = io.save(tmp_path / "ft_other", other)
    with pytest.raises(CheckpointError, match=r"ft_other.*missing leaves \['params/head/bias'"):
        streaming.merge_checkpoints(pre_dir, [ft_dir], tmp_path / "out", recipes.make_merge("average"))
    assert _leftovers(tmp_path) == []


def test_different_dtype_names_file_and_leaf(tmp_path, tiny_models):
    pre, fts = tiny_models
    pre_dir = io.save(tmp_path / "pre", pre)
    bf = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(jax.numpy.bfloat16), fts[0])
    ft_dir = io.save(tmp_path / "ft_bf16", bf)
    with pytest.raises(CheckpointError, match=r"ft_bf16: leaf 'params/conv/bias' has dtype bfloat16"):
        streaming.merge_checkpoints(pre_dir, [ft_dir], tmp_path / "out", recipes.make_merge("average"))
    assert _leftovers(tmp_path) == []


def test_nan_weights_name_file_and_leaf_and_write_nothing(tmp_path, tiny_models):
    pre, fts = tiny_models
    pre_dir = io.save(tmp_path / "pre", pre)
    bad = jax.tree_util.tree_map(np.array, fts[1])
    bad["params"]["dense_1"]["kernel"][2, 3] = np.nan
    ft_dirs = [io.save(tmp_path / "ft0", fts[0]), io.save(tmp_path / "ft_nan", bad)]
    with pytest.raises(PactInputError, match=r"ft_nan: leaf 'params/dense_1/kernel' holds non-finite"):
        streaming.merge_checkpoints(pre_dir, ft_dirs, tmp_path / "out", recipes.make_merge("tsv"), budget_bytes=4000)
    assert _leftovers(tmp_path) == []


def test_empty_task_list(tmp_path, tiny_checkpoints):
    pre_dir, *_ = tiny_checkpoints
    with pytest.raises(PactInputError, match="no fine-tuned checkpoints"):
        streaming.merge_checkpoints(pre_dir, [], tmp_path / "out", recipes.make_merge("average"))


def test_no_arrays_outlive_their_group(tmp_path, tiny_checkpoints):
    """Memory bound (issue 3), the part that is ours: a group's inputs, task vectors and merged
    leaves are all freed before the next group, so the live jax.Arrays do not grow with the
    number of groups (RSS is measured by python -m benchmarks.streaming)."""
    pre_dir, ft_dirs, *_ = tiny_checkpoints
    live: list[int] = []

    def after_each_group(groups):
        for g in groups:
            yield g
            live.append(len(jax.live_arrays()))

    merge = recipes.make_merge("tsv", use_pact=True, alpha=0.7)
    report = streaming.merge_checkpoints(
        pre_dir, ft_dirs, tmp_path / "out", merge, key=jax.random.key(0), budget_bytes=1, progress=after_each_group
    )
    assert report.num_groups == len(live) > 5
    assert max(live) == min(live), live


def test_the_progress_bar_counts_leaves_and_stays_silent_off_a_terminal(capsys, monkeypatch):
    import tqdm.auto

    from pact_jax.io import streaming

    groups = [["a", "b", "c"], ["d"]]
    assert list(streaming._progress(True, groups)) == groups
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal: tqdm(disable=None) draws nothing
    assert streaming._progress(False, groups) is groups

    seen = {}

    class Bar:
        def __init__(self, total, disable, **kw):
            seen.update(total=total, disable=disable, updates=[])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            seen["updates"].append(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    list(streaming._progress(True, groups))
    assert seen == {"total": 4, "disable": None, "updates": [3, 1]}
