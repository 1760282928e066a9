"""pact_jax.sharding: sharded == unsharded, output shardings, buckets spread over devices.

Runs on 8 virtual CPU devices (``--xla_force_host_platform_device_count=8``
and ``PJRT_NPROC``, set by tests/conftest.py before the CPU backend starts).
The meshes are built from ``jax.devices("cpu")``, so these tests also run on a
GPU/TPU machine.
"""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pact_jax
from pact_jax import merges, sharding

CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(
    len(CPUS) < 8, reason="needs 8 CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
)
TOL = dict(atol=2e-5, rtol=2e-5)


def _model(key, n_blocks=4, t=3, shape=(8, 8), conv=False):
    """A small model with few distinct shapes (each one compiles its own
    kernels): ``n_blocks`` Dense kernels ``shape`` with biases, an attention
    output kernel ``(2, 4, 8)`` (matrix view ``(8, 8)``), a norm scale ``(8,)``
    and, with ``conv``, a Conv kernel ``(3, 3, 2, 8)`` (matrix view ``(18, 8)``)."""
    ks = iter(jax.random.split(key, 2 * n_blocks + 3))
    pre = {
        f"block_{i}": {"kernel": jax.random.normal(next(ks), shape), "bias": jax.random.normal(next(ks), shape[1:])}
        for i in range(n_blocks)
    }
    pre["attn"] = {"out": {"kernel": jax.random.normal(next(ks), (2, 4, 8))}}
    pre["norm"] = {"scale": 1.0 + 0.1 * jax.random.normal(next(ks), (8,))}
    if conv:
        pre["conv"] = {"kernel": jax.random.normal(next(ks), (3, 3, 2, 8))}
    fts = [
        jax.tree_util.tree_map(lambda x, i=i: x + 0.1 * jax.random.normal(jax.random.fold_in(key, 100 + i), x.shape), pre)
        for i in range(t)
    ]
    return pre, fts


@pytest.fixture(scope="module")
def model():
    return _model(jax.random.key(0))


@pytest.fixture(scope="module")
def model4():
    """T = 4 tasks, with a Conv kernel; shared so eager references reuse compiles."""
    return _model(jax.random.key(3), t=4, conv=True)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(CPUS[:8])


SUBSPACE = pact_jax.pact
SCALAR = functools.partial(pact_jax.pact, perspective="scalar")
TIES = functools.partial(merges.ties, density=0.5)
# (PACT step or None, merger steps): every merger without PACT and with the
# PACT perspective it is meant for (subspace: TA and the SVD-based mergers;
# scalar: TIES, DARE).
CASES = {
    "average": (None, [merges.average]),
    "task_arithmetic": (None, [merges.task_arithmetic]),
    "ties": (None, [TIES]),
    "dare+ties": (None, [merges.dare, TIES]),
    "tsv": (None, [merges.tsv]),
    "iso_c": (None, [merges.iso_c]),
    "iso_cts": (None, [merges.iso_cts]),
    "pact+average": (SUBSPACE, [merges.average]),
    "pact+task_arithmetic": (SUBSPACE, [merges.task_arithmetic]),
    "pact_scalar+ties": (SCALAR, [TIES]),
    "pact_scalar+dare+task_arithmetic": (SCALAR, [merges.dare, merges.task_arithmetic]),
    "pact+tsv": (SUBSPACE, [merges.tsv]),
    "pact+iso_c": (SUBSPACE, [merges.iso_c]),
    "pact_both_sides+iso_cts": (functools.partial(pact_jax.pact, side="both"), [merges.iso_cts]),
}


# In the DARE cases every leaf but the (8, 8) block kernels is merged by the
# plain mean: one DARE shape to compile (threefry compiles slowly on CPU, the
# more so partitioned).
DARE_RULES = pact_jax.LeafRules(average=r"bias|scale|^attn/")


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_unsharded(name, model, mesh):
    pre, fts = model
    step, rest = CASES[name]
    rules = DARE_RULES if merges.dare in rest else None
    merge = pact_jax.chain(*([step] if step else []), *rest, alpha=0.7, rules=rules)
    key = jax.random.key(7)
    expected = merge(pre, fts, key=key)  # eager, single device
    out = sharding.shard_merge(merge, mesh)(pre, fts, key=key)
    chex.assert_trees_all_close(out, expected, **TOL)
    chex.assert_trees_all_equal_dtypes(out, pre)
    wanted = sharding.param_shardings(pre, mesh)
    for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree_util.tree_leaves(wanted)):
        assert leaf.sharding == s, (jax.tree_util.keystr(path), leaf.sharding, s)


def test_param_shardings_split_the_first_divisible_dim(mesh):
    tree = {"dense": jnp.zeros((16, 24)), "conv": jnp.zeros((3, 3, 4, 8)), "bias": jnp.zeros((6,)), "s": jnp.zeros(())}
    specs = jax.tree_util.tree_map(lambda s: s.spec, sharding.param_shardings(tree, mesh))
    axes = ("tasks", "layers")
    assert specs == {"dense": P(axes, None), "conv": P(None, None, None, axes), "bias": P(), "s": P()}
    specs = jax.tree_util.tree_map(lambda s: s.spec, sharding.param_shardings(tree, mesh, axes="layers"))
    assert specs["dense"] == P("layers", None)


def test_stacked_shardings_and_bucket_sharding_in_user_jit(model4):
    """Pipelines on stacked task vectors: place with stacked_shardings, run
    transforms and mergers under jax.jit with bucket_sharding inside."""
    pre, fts = model4
    mesh = sharding.make_mesh(CPUS[:8], shape=(2, 4))
    stacked = pact_jax.task_vectors(pre, fts)
    st_sh = sharding.stacked_shardings(stacked, mesh)
    assert st_sh["block_0"]["kernel"].spec == P("tasks", "layers", None)  # (4, 8, 8)
    assert st_sh["norm"]["scale"].spec == P("tasks", "layers")  # (4, 8)
    stacked_sharded = sharding.shard(stacked, st_sh)
    pre_sharded = sharding.shard(pre, sharding.param_shardings(pre, mesh, axes="layers"))
    out_sh = sharding.param_shardings(pre, mesh)

    @functools.partial(jax.jit, out_shardings=out_sh)
    def merge(pre, stacked):
        with sharding.bucket_sharding(mesh, layers_axis="layers", task_axis="tasks"):
            return merges.tsv(pact_jax.pact(pre, stacked))

    out = merge(pre_sharded, stacked_sharded)
    chex.assert_trees_all_close(out, merges.tsv(pact_jax.pact(pre, stacked)), **TOL)
    assert out["block_0"]["kernel"].sharding == out_sh["block_0"]["kernel"]


def _svd_batches(hlo: str) -> list[tuple[int, ...]]:
    """Operand shapes of the LAPACK SVD calls in a compiled CPU program."""
    calls = [line for line in hlo.splitlines() if "gesdd" in line and "custom-call(" in line]
    shapes = []
    for line in calls:
        operand = re.search(r"custom-call\(([^)]*)\)", line).group(1)
        name = operand.split(",")[0].strip()
        m = re.search(rf"{re.escape(name)} = f32\[([0-9,]*)\]", hlo)
        shapes.append(tuple(int(d) for d in m.group(1).split(",")))
    return shapes


def test_bucket_layers_are_spread_across_devices():
    """8 same-shape layers on 8 devices: each device's SVD call sees 1 layer."""
    pre, fts = _model(jax.random.key(2), n_blocks=8, t=2, shape=(8, 6))
    pre["attn"] = {}  # one matrix bucket: (8, 8, 6)
    for ft in fts:
        ft["attn"] = {}
    merge = pact_jax.chain(merges.iso_c)
    hlo_single = sharding.shard_merge(merge, sharding.make_mesh(CPUS[:1])).lower(pre, fts).compile().as_text()
    hlo_sharded = sharding.shard_merge(merge, sharding.make_mesh(CPUS[:8])).lower(pre, fts).compile().as_text()
    assert _svd_batches(hlo_single) == [(8, 8, 6)]  # iso_c: one SVD of the task sum per layer
    assert _svd_batches(hlo_sharded) == [(1, 8, 6)]


def test_task_axis_splits_the_tasks_of_a_bucket(model4):
    """mesh (tasks 2, layers 4) with task_axis="tasks": the per-task SVDs of a
    bucket are split over both axes."""
    pre, fts = model4
    mesh = sharding.make_mesh(CPUS[:8], shape=(2, 4))
    merge = pact_jax.chain(pact_jax.pact, merges.tsv, alpha=0.5)
    smerge = sharding.shard_merge(merge, mesh, layers_axis="layers", task_axis="tasks")
    chex.assert_trees_all_close(smerge(pre, fts), merge(pre, fts), **TOL)
    # The (8, 8) bucket holds 5 layers (4 blocks, attention output): TSV's SVDs
    # of the T = 4 task vectors become (2 layers, 2 tasks) per device.
    assert (2, 2, 8, 8) in _svd_batches(smerge.lower(pre, fts).compile().as_text())


def test_out_shardings_replicated_and_sharded_inputs_kept(model, mesh):
    pre, fts = model
    merge = pact_jax.chain(merges.tsv, alpha=0.5)
    replicated = NamedSharding(mesh, P())
    out = sharding.shard_merge(merge, mesh, out_shardings=replicated)(pre, fts)
    assert all(leaf.sharding == replicated for leaf in jax.tree_util.tree_leaves(out))
    chex.assert_trees_all_close(out, merge(pre, fts), **TOL)
    # Inputs already placed on the mesh (e.g. restored by orbax with a target
    # sharding) keep their layout, and so does the output.
    custom = jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P(*([None] * x.ndim))), pre)
    custom["block_0"]["kernel"] = NamedSharding(mesh, P("layers", None))
    pre_placed = sharding.shard(pre, custom)
    fts_placed = [sharding.shard(ft, custom) for ft in fts]
    out = sharding.shard_merge(merge, mesh)(pre_placed, fts_placed, alpha=0.3)
    assert out["block_0"]["kernel"].sharding.spec == P("layers", None)
    assert out["block_1"]["kernel"].sharding.spec == P(None, None)
    chex.assert_trees_all_close(out, merge(pre, fts, alpha=0.3), **TOL)


def test_explicit_mesh_is_accepted(model):
    pre, fts = model
    explicit = jax.make_mesh((8,), ("x",), devices=CPUS[:8])  # jax >= 0.7: Explicit axes by default
    merge = pact_jax.chain(merges.task_arithmetic, alpha=0.5)
    out = sharding.shard_merge(merge, explicit)(pre, fts)
    chex.assert_trees_all_close(out, merge(pre, fts), **TOL)
    assert out["block_0"]["kernel"].sharding.spec == P("x", None)


def test_errors(model, mesh):
    pre, fts = model
    merge = pact_jax.chain(merges.tsv)
    with pytest.raises(ValueError, match="not among the mesh axes"):
        sharding.shard_merge(merge, mesh, layers_axis="model")
    with pytest.raises(ValueError, match="overlap"):
        sharding.shard_merge(merge, mesh, layers_axis="layers", task_axis="layers")
    with pytest.raises(ValueError, match="holds 6 devices but 8"):
        sharding.make_mesh(CPUS[:8], shape=(2, 3))
    bad = jax.tree_util.tree_map(lambda x: x, fts[0])
    bad["block_0"]["kernel"] = bad["block_0"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(pact_jax.PactInputError, match=r"finetuned\[1\].*block_0/kernel.*non-finite"):
        sharding.shard_merge(merge, mesh)(pre, [fts[0], bad])
    with pytest.raises(pact_jax.PactInputError, match="finetuned"):
        sharding.shard_merge(merge, mesh)(pre, fts[0])


def test_shard_places_keys_and_numpy(mesh):
    s = NamedSharding(mesh, P())
    tree = {"a": np.arange(8.0), "k": jax.random.key(0)}
    placed = sharding.shard(tree, s)
    assert placed["a"].sharding == s and placed["k"].sharding == s
    assert jax.random.key_impl(placed["k"]) == jax.random.key_impl(tree["k"])
    np.testing.assert_array_equal(jax.random.key_data(placed["k"]), jax.random.key_data(tree["k"]))
