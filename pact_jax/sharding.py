"""Sharded and multi-host merging with JAX's own machinery.

A merge is run as one ``jax.jit`` program over a :class:`jax.sharding.Mesh`
with explicit ``in_shardings``/``out_shardings``; XLA's SPMD partitioner does
the rest. Two things are placed:

* **Parameters** (``pretrained``, every ``finetuned[t]``, the output):
  :func:`param_shardings` splits one dimension of each leaf over the mesh
  (default: all devices), so no device holds a whole model. Element-wise work
  (task vectors, averaging, Task Arithmetic, DARE, the mean of non-matrix
  leaves, ``W0 + alpha * delta``) runs where the entries live.
* **Shape buckets**: inside the program, :func:`bucket_sharding` constrains
  every stacked bucket ``(L, ...)`` of :mod:`pact_jax.buckets` (``L``
  same-shape leaves, vmapped) to ``P(layers_axis, ...)`` (default: all
  devices): each device runs the SVDs (TSV-M, Iso-C, Iso-CTS, PACT) or the
  sorts (TIES, scalar PACT) of its own layers. Optionally the task axis of a
  kernel's task vectors, ``(L, T, m, n)``, goes on ``task_axis`` too (for
  buckets with fewer layers than devices). A matrix is never split inside an
  SVD (the math needs the whole matrix per layer); uneven ``L`` or ``T`` are
  padded by XLA.

Everything else (which collectives, where) is left to the partitioner, so the
result equals the unsharded merge up to float reassociation (tested).

Typical use (one host, any number of devices)::

    mesh = pact_jax.sharding.make_mesh()               # ("tasks": 1, "layers": n)
    merge = pact_jax.chain(pact_jax.pact, pact_jax.merges.tsv, alpha=0.5)
    smerge = pact_jax.sharding.shard_merge(merge, mesh)
    params = smerge(pretrained, finetuned)             # leaves: NamedSharding

Multi-host (TPU pod slice, several GPU hosts): call :func:`initialize` first
on every process, build the mesh over ``jax.devices()`` (all processes'
devices), run the same code on every process; see ``docs/sharding.md``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from pact_jax import buckets
from pact_jax.tree import PactInputError, PyTree, check_finite, check_same_leaves

__all__ = [
    "LAYERS",
    "TASKS",
    "make_mesh",
    "param_shardings",
    "stacked_shardings",
    "shard",
    "bucket_sharding",
    "shard_merge",
    "initialize",
]

TASKS = "tasks"
LAYERS = "layers"
AxisNames = str | tuple[str, ...]


# --------------------------------------------------------------------------
# Mesh


def _auto(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis ``AxisType.Auto``.

    The merge code is written for the automatic partitioner; ``jax.make_mesh``
    defaults to ``Explicit`` axes (sharding in types) since jax 0.7.
    """
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def make_mesh(
    devices: Sequence[jax.Device] | None = None,
    *,
    shape: Sequence[int] | None = None,
    axis_names: Sequence[str] = (TASKS, LAYERS),
) -> Mesh:
    """A device mesh for merging, with ``AxisType.Auto`` axes.

    Args:
      devices: the devices to use; default ``jax.devices()`` (in a multi-host
        run, every process's devices: call :func:`initialize` first).
      shape: mesh shape, one size per axis name, product ``len(devices)``.
        Default: every device on the last axis (``(1, n)``: all on
        ``"layers"``). By default :func:`shard_merge` uses every axis for the
        layers of a bucket and for parameter leaves, so the shape only
        matters with ``task_axis="tasks"`` (e.g. ``(2, n // 2)``).
      axis_names: mesh axis names.

    Returns:
      ``jax.sharding.Mesh`` of ``shape`` built by ``jax.make_mesh`` (which
      orders devices for the physical topology on TPU).
    """
    devices = list(jax.devices() if devices is None else devices)
    axis_names = tuple(axis_names)
    if shape is None:
        shape = (1,) * (len(axis_names) - 1) + (len(devices),)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {shape} and axis_names {axis_names} differ in length.")
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {shape} holds {math.prod(shape)} devices but {len(devices)} were given.")
    return jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def _axes(mesh: Mesh, axes: AxisNames | None, what: str) -> tuple[str, ...]:
    if axes is None:
        return ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"{what}={axes}: {unknown} not among the mesh axes {mesh.axis_names}.")
    return axes


def _axes_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


# --------------------------------------------------------------------------
# Parameter and stacked-task-vector layouts


def _split_one_dim(shape: Sequence[int], axes: tuple[str, ...], size: int) -> list:
    """Spec entries for ``shape``: the first dim divisible by ``size`` on ``axes``
    (``[]``, i.e. replicated, if none)."""
    entries: list = [None] * len(shape)
    if size > 1:
        for d, n in enumerate(shape):
            if n % size == 0:
                entries[d] = _spec_entry(axes)
                return entries
    return []


def param_shardings(tree: PyTree, mesh: Mesh, *, axes: AxisNames | None = None) -> PyTree:
    """A ``NamedSharding`` per leaf of a parameter pytree.

    Each leaf of shape ``(d_0, ..., d_k)`` is split along its first
    dimension divisible by the number of devices on ``axes``, e.g. a Dense
    kernel ``(768, 3072)`` on 8 devices gets ``P(axes, None)`` and a Conv
    kernel ``(3, 3, 64, 128)`` gets ``P(None, None, axes, None)``; leaves with
    no such dimension (and scalars) are replicated, ``P()``. A split first
    dimension keeps the row blocks of the matrix view
    ``(prod(shape[:k]), prod(shape[k:]))`` and of the flattened leaf
    contiguous, so those reshapes need no data movement (a later split
    dimension may make XLA gather the leaf for them; see docs/sharding.md).
    This is the layout of the inputs and, by default, of the output of
    :func:`shard_merge`.

    Args:
      tree: parameter pytree (arrays, or anything with ``.shape``, e.g.
        ``jax.ShapeDtypeStruct``).
      mesh: the device mesh.
      axes: mesh axes that split a leaf; default all of them.
    """
    mesh = _auto(mesh)
    axes = tuple(mesh.axis_names) if axes is None else _axes(mesh, axes, "axes")
    size = _axes_size(mesh, axes)
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, P(*_split_one_dim(np.shape(x), axes, size))), tree
    )


def stacked_shardings(
    stacked: PyTree,
    mesh: Mesh,
    *,
    task_axis: AxisNames | None = TASKS,
    param_axes: AxisNames | None = None,
) -> PyTree:
    """A ``NamedSharding`` per leaf ``(T, *shape)`` of stacked task vectors.

    The task axis ``T`` goes on ``task_axis`` (replicated when ``T`` is not a
    multiple of its size); ``shape`` is split as in :func:`param_shardings`
    over ``param_axes`` (default: the mesh axes other than ``task_axis``).
    E.g. on a ``("tasks": 2, "layers": 4)`` mesh a ``(4, 768, 3072)`` leaf gets
    ``P("tasks", "layers", None)``. For pipelines written on stacked task
    vectors (:func:`pact_jax.pact`, :mod:`pact_jax.merges`); see
    :func:`bucket_sharding`.
    """
    mesh = _auto(mesh)
    task_axes = _axes(mesh, task_axis, "task_axis")
    param_axes = _rest_axes(mesh, param_axes, "param_axes", task_axes)
    t_size, p_size = _axes_size(mesh, task_axes), _axes_size(mesh, param_axes)

    def one(x):
        t, *shape = np.shape(x)
        lead = _spec_entry(task_axes) if t_size > 1 and t % t_size == 0 else None
        return NamedSharding(mesh, P(lead, *_split_one_dim(shape, param_axes, p_size)))

    return jax.tree_util.tree_map(one, stacked)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _put(x: Any, s: Sharding) -> jax.Array:
    if _is_key(x):
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and (s.is_fully_addressable or not x.is_fully_addressable):
        return jax.device_put(x, s)  # no-op when already placed; a reshard of a global array otherwise
    if s.is_fully_addressable:
        return jax.device_put(x, s)
    # Multi-host: every process holds the same host-local value; each one
    # transfers only the shards of its own devices.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])


def shard(tree: PyTree, shardings: PyTree | Sharding) -> PyTree:
    """Places every leaf of ``tree`` with its sharding (a pytree matching
    ``tree``, or one ``Sharding`` for all leaves).

    Works on one host (``jax.device_put``) and on several: there, a leaf that
    is a host-local value (NumPy array, single-device ``jax.Array``), equal on
    every process, becomes a global ``jax.Array`` by
    ``jax.make_array_from_callback`` (each process copies only its devices'
    shards); a global ``jax.Array`` is resharded. PRNG key arrays are
    supported.
    """
    if isinstance(shardings, Sharding):
        return jax.tree_util.tree_map(lambda x: _put(x, shardings), tree)
    return jax.tree_util.tree_map(_put, tree, shardings)


# --------------------------------------------------------------------------
# Shape buckets


def _rest_axes(mesh: Mesh, axes: AxisNames | None, name: str, task_axes: tuple[str, ...]) -> tuple[str, ...]:
    """``axes`` validated (``name`` in messages), or every mesh axis not in ``task_axes``;
    the two must not overlap."""
    rest = tuple(a for a in mesh.axis_names if a not in task_axes) if axes is None else _axes(mesh, axes, name)
    if set(rest) & set(task_axes):
        raise ValueError(f"{name} {rest} and task_axis {task_axes} overlap.")
    return rest


def _bucket_axes(mesh: Mesh, layers_axis: AxisNames | None, task_axis: AxisNames | None):
    """Validated spec entries ``(layers, tasks)`` of :func:`bucket_sharding`."""
    tasks = _axes(mesh, task_axis, "task_axis")
    layers = _rest_axes(mesh, layers_axis, "layers_axis", tasks)
    if not layers:
        raise ValueError("no mesh axis is left for the layers of a bucket (layers_axis).")
    return _spec_entry(layers), _spec_entry(tasks)


@contextlib.contextmanager
def bucket_sharding(
    mesh: Mesh,
    *,
    layers_axis: AxisNames | None = None,
    task_axis: AxisNames | None = None,
) -> Iterator[None]:
    """Spreads the shape buckets of every merger/transform across devices.

    Within this context, each bucket of ``L`` same-shape leaves that
    :func:`pact_jax.buckets.run_bucketed` stacks, ``(L, ...)``, is constrained
    with ``jax.lax.with_sharding_constraint`` to
    ``NamedSharding(mesh, P(layers_axis, U, ...))`` (``U`` =
    ``P.UNCONSTRAINED``: left to the partitioner), and, if ``task_axis`` is
    given, a kernel's task vectors ``(L, T, ...)`` to
    ``P(layers_axis, task_axis, U, ...)``; the kernel outputs ``(L, ...)`` to
    ``P(layers_axis, U, ...)``. So each device runs the vmapped kernel (SVDs,
    sorts) on its slice of layers (and tasks). ``L`` and ``T`` need not
    divide the axis sizes (XLA pads).

    Enter it *inside* the function you ``jax.jit`` (the constraints are
    recorded while tracing; ``jit`` caches traces without seeing this context)::

        @jax.jit
        def merge(pre, stacked):
            with pact_jax.sharding.bucket_sharding(mesh):
                return pact_jax.merges.tsv(pact_jax.pact(pre, stacked))

    Args:
      mesh: the device mesh.
      layers_axis: mesh axis (or axes) for the leading bucket axis ``L``;
        default: every mesh axis not in ``task_axis``.
      task_axis: mesh axis (or axes) for the task axis ``T``; default
        ``None``: left to the partitioner. Splitting ``T`` helps only when
        buckets hold fewer layers than there are devices; XLA then moves a
        bucket from the parameter layout by all-gather (it logs "Involuntary
        full rematerialization"), i.e. a transient full copy of the bucket
        per device.
    """
    mesh = _auto(mesh)
    lead, second = _bucket_axes(mesh, layers_axis, task_axis)

    def place(x: Any, has_task_axis: bool) -> Any:
        rest = [P.UNCONSTRAINED] * (x.ndim - 1)
        if has_task_axis and rest:
            rest[0] = second
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(lead, *rest)))

    with buckets.placement(place):
        yield


# --------------------------------------------------------------------------
# Sharded merge


@jax.jit
def _all_finite(trees: PyTree) -> jax.Array:
    """One program (one host sync) checking every floating leaf for NaN/Inf."""
    flags = [
        jnp.isfinite(x).all()
        for x in jax.tree_util.tree_leaves(trees)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.stack(flags).all() if flags else jnp.asarray(True)


def _same_mesh(a: Mesh, b: Mesh) -> bool:
    return a.axis_names == b.axis_names and a.devices.shape == b.devices.shape and all(
        x.id == y.id for x, y in zip(a.devices.flat, b.devices.flat)
    )


def _input_shardings(tree: PyTree, default: PyTree, mesh: Mesh) -> PyTree:
    """``default``, except where a leaf already carries a NamedSharding over ``mesh``."""

    def pick(x, d):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and not _is_key(x) and _same_mesh(s.mesh, mesh):
            return NamedSharding(mesh, s.spec)
        return d

    return jax.tree_util.tree_map(pick, tree, default)


def shard_merge(
    merge: Callable[..., PyTree],
    mesh: Mesh,
    *,
    layers_axis: AxisNames | None = None,
    task_axis: AxisNames | None = None,
    param_axes: AxisNames | None = None,
    out_shardings: PyTree | Sharding | None = None,
    check_inputs: bool = True,
) -> Callable[..., PyTree]:
    """Runs a merge function as one ``jax.jit`` program over ``mesh``.

    ``merge`` is ``merge(pretrained, finetuned, *, key=None, **kwargs) ->
    params``, e.g. from :func:`pact_jax.chain` (or its ``merge.delta``): every
    merger, with or without :func:`pact_jax.pact` / DARE, both PACT
    perspectives. Returns ``smerge`` with the same signature, which

    1. places ``pretrained`` and each ``finetuned[t]`` with
       :func:`param_shardings` over ``param_axes`` (a leaf that is already a
       ``jax.Array`` with a ``NamedSharding`` over this mesh keeps its spec),
       ``key`` and ``kwargs`` (e.g. ``alpha``) replicated, via :func:`shard`
       (works across hosts);
    2. checks the inputs for NaN/Inf in one small program (``check_inputs``;
       the merge itself, under ``jit``, cannot);
    3. calls ``jax.jit(merge, in_shardings=..., out_shardings=...)`` with the
       buckets under :func:`bucket_sharding` (``layers_axis``, ``task_axis``).

    Args:
      merge: the merge function.
      mesh: device mesh (``Explicit`` axes are treated as ``Auto``).
      layers_axis, task_axis: see :func:`bucket_sharding` (default: a
        bucket's layers over all devices, tasks left to the partitioner).
      param_axes: mesh axes that split parameter leaves; default all.
      out_shardings: ``None``: the output leaves get the shardings of the
        placed ``pretrained`` leaves (``merge`` must return a tree shaped like
        ``pretrained``); or one ``Sharding`` for every output leaf (e.g.
        ``NamedSharding(mesh, P())`` to replicate); or a matching pytree.
      check_inputs: run :func:`pact_jax.tree.check_finite` on the inputs.

    Returns:
      ``smerge(pretrained, finetuned, *, key=None, **kwargs)``: the merged
      pytree as global ``jax.Array`` leaves carrying ``out_shardings``.
      Compiles once per input structure/shapes/shardings.
      ``smerge.lower(...)`` (same arguments) gives the ``jax.stages.Lowered``
      program, ``smerge.mesh`` the mesh.
    """
    mesh = _auto(mesh)
    bucket_kw = dict(layers_axis=layers_axis, task_axis=task_axis)
    _bucket_axes(mesh, layers_axis, task_axis)  # fail early on bad axis names
    _axes(mesh, param_axes, "param_axes")
    replicated = NamedSharding(mesh, P())
    compiled: dict[Any, Callable[..., PyTree]] = {}

    def body(pretrained, finetuned, key, kwargs):
        with bucket_sharding(mesh, **bucket_kw):
            return merge(pretrained, finetuned, key=key, **kwargs)

    def prepare(pretrained, finetuned, key, kwargs):
        if isinstance(finetuned, dict) or not isinstance(finetuned, Sequence) or isinstance(finetuned, str):
            raise PactInputError("finetuned must be a sequence (list or tuple) of parameter pytrees, one per task.")
        finetuned = list(finetuned)
        for i, ft in enumerate(finetuned):
            check_same_leaves(pretrained, ft, "pretrained", f"finetuned[{i}]")
        default = param_shardings(pretrained, mesh, axes=param_axes)
        p_sh = _input_shardings(pretrained, default, mesh)
        ft_sh = [_input_shardings(ft, default, mesh) for ft in finetuned]
        in_sh = (
            p_sh,
            ft_sh,
            jax.tree_util.tree_map(lambda _: replicated, key),
            jax.tree_util.tree_map(lambda _: replicated, kwargs),
        )
        args = shard((pretrained, finetuned, key, kwargs), in_sh)
        if check_inputs and not bool(_all_finite((args[0], args[1]))):
            check_finite(args[0], "pretrained")  # raises, naming the leaf
            for i, ft in enumerate(args[1]):
                check_finite(ft, f"finetuned[{i}]")
        out_sh = p_sh if out_shardings is None else out_shardings
        flat_in, in_def = jax.tree_util.tree_flatten(in_sh)
        flat_out, out_def = jax.tree_util.tree_flatten(out_sh)
        cache_key = (in_def, tuple(flat_in), out_def, tuple(flat_out))
        if cache_key not in compiled:
            compiled[cache_key] = jax.jit(body, in_shardings=in_sh, out_shardings=out_sh)
        return compiled[cache_key], args

    def smerge(
        pretrained: PyTree, finetuned: Sequence[PyTree], *, key: jax.Array | None = None, **kwargs: Any
    ) -> PyTree:
        jitted, args = prepare(pretrained, finetuned, key, kwargs)
        return jitted(*args)

    def lower(
        pretrained: PyTree, finetuned: Sequence[PyTree], *, key: jax.Array | None = None, **kwargs: Any
    ) -> jax.stages.Lowered:
        """``jax.stages.Lowered`` of the sharded program (``.compile().as_text()``,
        ``.compile().memory_analysis()``), for the same arguments as ``smerge``."""
        jitted, args = prepare(pretrained, finetuned, key, kwargs)
        return jitted.lower(*args)

    smerge.__doc__ = f"{merge.__doc__ or 'merge'} Sharded over {dict(mesh.shape)} (pact_jax.sharding.shard_merge)."
    smerge.lower = lower  # type: ignore[attr-defined]
    smerge.mesh = mesh  # type: ignore[attr-defined]
    return smerge


# --------------------------------------------------------------------------
# Multi-host


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    cpu_collectives: str | None = None,
    **kwargs: Any,
) -> None:
    """``jax.distributed.initialize``, once per process, before any JAX computation.

    On Cloud TPU, Slurm and Open MPI every argument may be omitted (detected
    from the environment). Elsewhere give ``coordinator_address``
    (``"host:port"`` of process 0), ``num_processes`` and ``process_id``.
    A second call in an initialized process is a no-op.

    Args:
      cpu_collectives: for multi-process CPU runs, the value of
        ``jax_cpu_collectives_implementation`` (``"gloo"``, the default in
        jax 0.10, or ``"mpi"``); ``None`` leaves the setting alone.
      **kwargs: passed on (``initialization_timeout``,
        ``cluster_detection_method``, ...).
    """
    if jax.distributed.is_initialized():
        return
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, local_device_ids=local_device_ids, **kwargs
    )
