"""Merging methods: functions of stacked task vectors ``(T, ...)``.

A *merger* maps ``stacked -> delta`` (the merged update before ``alpha``; see
:func:`pact_jax.apply_delta`). A *transform* maps ``stacked -> stacked``
(:func:`dare` here, :func:`pact_jax.pact`). Every function takes
``rules: LeafRules``: leaves matched by ``rules.freeze`` get ``delta = 0``,
leaves matched by ``rules.average`` get the task mean, and transforms leave
both untouched.

Non-matrix leaves (biases, norms, and 1-D leaves in general) in the SVD-based
methods (:func:`tsv`, :func:`iso_c`, :func:`iso_cts`) are merged by the task
mean, as in the reference implementations of those papers.

The entry-wise methods (:func:`average`, :func:`task_arithmetic`, :func:`ties`,
:func:`dare`) take per-task weights and a ``convention``: ``'pact_jax'`` (the
default) or ``'mergekit'`` (mergekit 0.1.5's rules, so that a mergekit config
gives mergekit's numbers); docs/mergekit.md sets the two side by side.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from pact_jax import buckets, linalg
from pact_jax.tree import (
    DEFAULT_RULES,
    LeafRules,
    PyTree,
    check_fraction,
    leaf_key,
    leaves_with_paths,
    validate_stacked,
)

__all__ = [
    "CONVENTIONS",
    "average",
    "task_arithmetic",
    "ties",
    "ties_keep_count",
    "top_k_mask",
    "dare",
    "tsv",
    "tsv_ranks",
    "iso_c",
    "iso_cts",
    "newton_schulz_polar",
]


def _merge_by_kind(
    stacked: PyTree,
    rules: LeafRules,
    kernel: Callable[..., jax.Array],
    *,
    view: str,
    static: dict[str, Any] | None = None,
    static_for: Callable[[str], dict[str, Any]] | None = None,
    non_matrix: Callable[[jax.Array], jax.Array] = lambda x: x.mean(0),
    key: jax.Array | None = None,
    mean: Callable[[jax.Array], jax.Array] = lambda x: x.mean(0),
    check_tasks: Callable[[int], None] | None = None,
) -> PyTree:
    """Shared traversal of the mergers.

    ``view='matrix'``: matrix leaves go to ``kernel(tau (T, m, n)) -> (m, n)``
    (``kernel(tau, leaf_key)`` when ``key`` is given: ``key`` folded with the
    leaf's path), other leaves to ``non_matrix``. ``view='flat'``: every non-frozen,
    non-averaged leaf goes to ``kernel(tau (T, N)) -> (N,)``.
    ``static`` holds the kernel's hyperparameters (static under jit); anything
    derived from the shape is computed inside the kernel, so each kernel
    compiles once per distinct shape. ``static_for(path)`` adds per-leaf static
    hyperparameters to a matrix leaf's job (e.g. which side of its matrix view
    is the layer's output); buckets key on them, so leaves that differ only
    there compile separately. ``mean`` merges the leaves that ``rules.average``
    names (a weighted mean for weighted mergers); ``check_tasks(T)`` checks
    per-task hyperparameters against the number of tasks.
    """
    t = validate_stacked(stacked)
    if check_tasks is not None:
        check_tasks(t)
    items = leaves_with_paths(stacked)
    treedef = jax.tree_util.tree_structure(stacked)
    out: list[Any] = [None] * len(items)
    jobs, job_index = [], []
    for i, (path, leaf) in enumerate(items):
        shape = leaf.shape[1:]
        kind = rules.kind(path, shape)
        if kind == "freeze":
            out[i] = jnp.zeros(shape, leaf.dtype)
        elif kind == "average":
            out[i] = mean(leaf)
        elif view == "matrix" and kind == "matrix":
            x = leaf.reshape(t, *rules.matrix_shape(path, shape))
            job_static = dict(static or {})
            if static_for is not None:
                job_static.update(static_for(path))
            jobs.append(((x,) if key is None else (x, leaf_key(key, path)), job_static))
            job_index.append(i)
        elif view == "flat":
            x = leaf.reshape(t, -1)
            jobs.append(((x,), static or {}))
            job_index.append(i)
        else:
            out[i] = non_matrix(leaf)
    for i, res in zip(job_index, buckets.run_bucketed(kernel, jobs)):
        out[i] = res.reshape(items[i][1].shape[1:])
    return jax.tree_util.tree_unflatten(treedef, out)


def _elementwise(
    stacked: PyTree,
    rules: LeafRules,
    fn: Callable[[jax.Array], jax.Array],
    weights: tuple[float, ...] | None = None,
) -> PyTree:
    """``fn(tau (T, ...)) -> (...)`` on every leaf, with the freeze/average rules."""
    return _merge_by_kind(
        stacked, rules, None, view="none", non_matrix=fn, mean=_weighted_mean(weights), check_tasks=_check_len(weights)
    )


# --------------------------------------------------------------------------
# Averaging and Task Arithmetic

# How the entry-wise mergers break the choices that the papers leave open (docs/mergekit.md):
# 'pact_jax' (the default) or 'mergekit' (mergekit 0.1.5's rules, read from its source).
Convention = Literal["pact_jax", "mergekit"]
CONVENTIONS: tuple[str, ...] = ("pact_jax", "mergekit")
DareRescale = Literal["inverse", "l1", "none"]
# mergekit 0.1.5 leaves a sparsified task vector unscaled when either L1 norm is below this.
_L1_EPS = 1e-7


def _check_convention(convention: Any) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}.")
    return convention


def _check_weights(weights: Any) -> tuple[float, ...] | None:
    """Per-task weights as a tuple of finite floats (static: they select the compiled kernel)."""
    if weights is None:
        return None
    if isinstance(weights, (str, bytes, dict)) or not hasattr(weights, "__len__") or np.ndim(weights) != 1:
        raise ValueError(f"weights must be a sequence of numbers, one per task, got {weights!r}.")
    out = []
    for w in weights:
        if isinstance(w, (bool, str, bytes)) or not isinstance(w, (int, float, np.number, np.ndarray, jax.Array)):
            raise ValueError(f"weights must be numbers, got {w!r} in {list(weights)!r}.")
        out.append(float(w))
    if not out or not all(math.isfinite(w) for w in out):
        raise ValueError(f"weights must be one finite number per task, got {list(weights)!r}.")
    return tuple(out)


def _check_len(values: tuple[float, ...] | float | None, name: str = "weights") -> Callable[[int], None] | None:
    """A check that a per-task tuple has one entry per task (None for a scalar or no value)."""
    if not isinstance(values, tuple):
        return None

    def check(t: int) -> None:
        if len(values) != t:
            raise ValueError(f"{name} has {len(values)} entries, but there are {t} task vectors: give one per task.")

    return check


def _per_task_fraction(value: Any, name: str, *, allow_zero: bool = False) -> float | tuple[float, ...]:
    """A fraction, or one fraction per task (a tuple; equal values collapse to one float)."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        return check_fraction(value, name, allow_zero=allow_zero)
    values = tuple(check_fraction(v, f"{name} (per task)", allow_zero=allow_zero) for v in value)
    if not values:
        raise ValueError(f"{name} must be a number or one number per task, got {value!r}.")
    return values[0] if len(set(values)) == 1 else values


def _all_checks(*checks: Callable[[int], None] | None) -> Callable[[int], None] | None:
    present = [c for c in checks if c is not None]
    if not present:
        return None

    def check(t: int) -> None:
        for c in present:
            c(t)

    return check


def _weighted_sum(x: jax.Array, weights: tuple[float, ...] | None) -> jax.Array:
    """``sum_t w_t x_t`` over the task axis of ``x (T, ...)``; ``sum_t x_t`` for no weights."""
    if weights is None:
        return x.sum(0)
    return jnp.tensordot(jnp.asarray(weights, x.dtype), x, axes=1)


def _weight_total(weights: tuple[float, ...], what: str) -> float:
    total = math.fsum(weights)
    if abs(total) < 1e-8:
        raise ValueError(f"{what}: the weights {list(weights)} sum to 0, so their normalised sum is undefined.")
    return total


def _weighted_mean(weights: tuple[float, ...] | None) -> Callable[[jax.Array], jax.Array]:
    """The merge of the leaves ``rules.average`` names: the (weighted) task mean."""
    if weights is None:
        return lambda x: x.mean(0)

    def mean(x: jax.Array) -> jax.Array:
        return _weighted_sum(x, weights) / _weight_total(weights, "the weighted mean of an averaged leaf")

    return mean


def average(stacked: PyTree, *, weights: Sequence[float] | None = None, rules: LeafRules = DEFAULT_RULES) -> PyTree:
    """Weight averaging: ``delta = sum_t w_t tau_t / sum_t w_t`` (``w_t = 1``: the task mean;
    with ``alpha = 1``, the (weighted) mean model, mergekit's ``linear``).

    Args:
      weights: one weight per task (default all 1); they must not sum to 0.
    """
    w = _check_weights(weights)
    if w is None:
        return _elementwise(stacked, rules, lambda x: x.mean(0))
    total = _weight_total(w, "average")
    return _elementwise(stacked, rules, lambda x: _weighted_sum(x, w) / total, w)


def task_arithmetic(
    stacked: PyTree,
    *,
    weights: Sequence[float] | None = None,
    normalize: bool = False,
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """Task Arithmetic (Ilharco et al. 2023): ``delta = sum_t w_t tau_t`` (``w_t = 1`` by default).

    Args:
      weights: one weight per task (mergekit's per-model ``weight``).
      normalize: divide by ``sum_t w_t`` (mergekit's ``normalize``, off by
        default for task arithmetic there too); the weights must not sum to 0.
    """
    w = _check_weights(weights)
    _check_bool(normalize, "normalize")
    if not normalize:
        return _elementwise(stacked, rules, lambda x: _weighted_sum(x, w), w)
    if w is None:
        return _elementwise(stacked, rules, lambda x: x.mean(0))
    total = _weight_total(w, "task_arithmetic(normalize=True)")
    return _elementwise(stacked, rules, lambda x: _weighted_sum(x, w) / total, w)


# --------------------------------------------------------------------------
# TIES and DARE


def ties_keep_count(n: int, density: float, convention: Convention = "pact_jax") -> int:
    """Entries of an ``n``-entry leaf that TIES's trim keeps per task.

    ``'pact_jax'``: ``max(1, round(density * n))``. ``'mergekit'`` (0.1.5's
    ``magnitude``): ``n`` for ``density >= 1``, else ``max(1, int(density * n))``
    (rounded down).
    """
    if _check_convention(convention) == "mergekit":
        return n if density >= 1 else max(1, int(density * n))
    return min(n, max(1, round(density * n)))


def top_k_mask(mag: jax.Array, k: int | tuple[int, ...]) -> jax.Array:
    """Exactly ``k`` largest entries per row of ``mag (T, N) >= 0`` (``k`` an int or one per row).

    Entries tied with the ``k``-th largest magnitude are taken in index order
    (lowest flat index first), so the mask is deterministic and never holds
    more than ``k`` entries. No sort: the ``k``-th magnitude comes from
    :func:`pact_jax.linalg.kth_largest`, the tied entries from a cumulative
    count, so this stays cheap on million-entry leaves and jit-compatible.
    """
    kk = k if isinstance(k, int) else jnp.asarray(k, jnp.int32)
    kth = linalg.kth_largest(mag, kk)[:, None]
    above = mag > kth
    tied = mag == kth
    room = (jnp.asarray(kk, jnp.int32) - above.sum(-1, dtype=jnp.int32))[..., None]
    return above | (tied & (jnp.cumsum(tied, axis=-1, dtype=jnp.int32) <= room))


def _ties_kernel(
    tau: jax.Array,
    *,
    density: float | tuple[float, ...],
    weights: tuple[float, ...] | None = None,
    normalize: bool = True,
    convention: Convention = "pact_jax",
) -> jax.Array:
    """TIES on one flattened leaf ``tau (T, N) -> (N,)``.

    1. trim: per task keep exactly ``k_t = ties_keep_count(N, density_t)``
       largest ``|tau_t|`` entries (ties at the ``k_t``-th magnitude taken in
       index order, :func:`top_k_mask`);
    2. weight: ``x_t = w_t trimmed_t``;
    3. elect: ``gamma = sign(sum_t x_t)``; ``'mergekit'``: ``+1`` where the sum
       is ``>= 0``; ``'pact_jax'``: a zero sum elects no sign and the entry is 0;
    4. disjoint merge over the tasks ``A = {t : x_t != 0, sign(x_t) = gamma}``:
       ``sum_{t in A} x_t / sum_{t in A} w_t`` (``normalize``; a divisor of 0
       counts as 1), or ``sum_{t in A} x_t``.
    """
    t, n = tau.shape
    densities = density if isinstance(density, tuple) else (density,) * t
    ks = tuple(ties_keep_count(n, d, convention) for d in densities)
    if min(ks) < n:
        k = ks[0] if len(set(ks)) == 1 else ks
        trimmed = jnp.where(top_k_mask(jnp.abs(tau), k), tau, 0.0)
    else:
        trimmed = tau
    if weights is not None:
        w = jnp.asarray(weights, tau.dtype)[:, None]
        trimmed = trimmed * w
    total = trimmed.sum(0)
    elected = jnp.where(total >= 0, 1.0, -1.0) if convention == "mergekit" else jnp.sign(total)
    agree = (jnp.sign(trimmed) == elected) & (trimmed != 0)
    merged = jnp.where(agree, trimmed, 0.0).sum(0)
    if not normalize:
        return merged
    divisor = agree.sum(0) if weights is None else jnp.where(agree, w, 0.0).sum(0)
    return merged / jnp.where(divisor == 0, 1, divisor)


def ties(
    stacked: PyTree,
    density: float | Sequence[float] = 0.2,
    *,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    convention: Convention = "pact_jax",
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

    Trimming is per leaf and per task: exactly ``k = ties_keep_count(N,
    density)`` of the leaf's ``N`` entries survive (ties at the ``k``-th
    magnitude broken by index, so the density is never exceeded). Applied to
    every leaf (matrices, biases, norms) except the frozen/averaged ones; the
    averaged ones get the (weighted) task mean.

    Args:
      stacked: task vectors, leaves ``(T, ...)``.
      density: fraction of entries kept per task, in ``(0, 1]``, or one per task.
      weights: per-task weights ``w_t`` (default 1), applied after the trim and
        before the sign election; the disjoint mean divides by the weights of
        the agreeing tasks (mergekit's per-model ``weight``).
      normalize: divide by the agreeing tasks' weights (the paper's disjoint
        mean); ``False``: their weighted sum (mergekit's ``normalize: false``).
      convention: ``'pact_jax'``: ``k = max(1, round(density N))`` and a zero
        sign sum drops the entry; ``'mergekit'``: mergekit 0.1.5's
        ``k = max(1, int(density N))`` and a zero sign sum counted positive.
    """
    density = _per_task_fraction(density, "density")
    w = _check_weights(weights)
    _check_bool(normalize, "normalize")
    static: dict[str, Any] = {"density": density}
    if convention != "pact_jax":
        static["convention"] = _check_convention(convention)
    if w is not None:
        static["weights"] = w
    if not normalize:
        static["normalize"] = False
    return _merge_by_kind(
        stacked, rules, _ties_kernel, view="flat", static=static, mean=_weighted_mean(w),
        check_tasks=_all_checks(_check_len(w), _check_len(density, "density")),
    )  # fmt: skip


def dare(
    key: jax.Array,
    stacked: PyTree,
    p: float | Sequence[float] = 0.9,
    *,
    rescale: DareRescale | None = None,
    convention: Convention = "pact_jax",
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """DARE (Yu et al. 2024): drop each entry with probability ``p``, rescale the rest.

    A transform ``stacked -> stacked``; follow it with a merger (TA or TIES).
    Each leaf draws its mask from :func:`pact_jax.tree.leaf_key` (``key``
    folded with its path), so the result depends only on ``key`` and paths.
    ``p = 1`` drops everything, ``p = 0`` keeps everything.

    Args:
      key: PRNG key.
      stacked: task vectors, leaves ``(T, ...)``.
      p: drop probability in ``[0, 1]``, or one per task (mergekit's
        ``density`` is the keep probability ``1 - p``).
      rescale: ``'inverse'``: the kept entries times ``1/(1-p)`` (the paper;
        the ``'pact_jax'`` default); ``'l1'``: each task's leaf times
        ``||tau_t||_1 / ||kept_t||_1`` (unscaled where either norm is below
        1e-7; mergekit 0.1.5's ``rescale: true``, its default);
        ``'none'``: the kept entries as they are.
      convention: picks the default ``rescale``: ``'pact_jax'`` ->
        ``'inverse'``, ``'mergekit'`` -> ``'l1'``.
    """
    if not isinstance(key, jax.Array):
        raise ValueError(f"dare needs a PRNG key as its first argument, e.g. dare(jax.random.key(0), stacked); "
                         f"got {type(key).__name__}.")
    p = _per_task_fraction(p, "p", allow_zero=True)
    if rescale is None:
        rescale = "l1" if _check_convention(convention) == "mergekit" else "inverse"
    _check_convention(convention)
    if rescale not in ("inverse", "l1", "none"):
        raise ValueError(f"rescale must be 'inverse', 'l1' or 'none', got {rescale!r}.")
    t = validate_stacked(stacked)
    check = _check_len(p, "p")
    if check is not None:
        check(t)
    static: dict[str, Any] = {"p": p}
    if rescale != "inverse":
        static["rescale"] = rescale
    items = leaves_with_paths(stacked)
    out = [leaf for _, leaf in items]
    jobs, index = [], []
    for i, (path, leaf) in enumerate(items):
        if rules.kind(path, leaf.shape[1:]) not in ("freeze", "average"):
            axes = rules.flax_axes(path, leaf.shape[1:])
            # A torch leaf draws its mask in Flax order: a model merges alike in either layout.
            job_static = static if axes == tuple(range(len(axes))) else {**static, "axes": axes}
            jobs.append(((leaf, leaf_key(key, path)), job_static))
            index.append(i)
    for i, res in zip(index, buckets.run_bucketed(_dare_kernel, jobs)):
        out[i] = res
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(stacked), out)


def _bernoulli(key: jax.Array, prob: Any, shape: tuple[int, ...], axes: tuple[int, ...] | None) -> jax.Array:
    """``bernoulli(key, prob, shape)``; with ``axes`` (:meth:`pact_jax.LeafRules.flax_axes` of a
    torch leaf) drawn for the leaf's Flax order ``(T, *shape[1:][axes])`` and transposed back."""
    if axes is None:
        return jax.random.bernoulli(key, jnp.broadcast_to(prob, shape), shape)
    draw = (shape[0], *(shape[1 + a] for a in axes))
    back = (0, *(1 + axes.index(i) for i in range(len(axes))))
    return jnp.transpose(jax.random.bernoulli(key, jnp.broadcast_to(prob, draw), draw), back)


def _dare_kernel(
    tau: jax.Array,
    key: jax.Array,
    *,
    p: float | tuple[float, ...],
    rescale: DareRescale = "inverse",
    axes: tuple[int, ...] | None = None,
) -> jax.Array:
    """Drop-and-rescale one leaf ``tau (T, ...)``; bucketed so that each
    distinct shape compiles the random bit generator once. ``axes``: the mask
    is drawn in the leaf's Flax order (:func:`_bernoulli`)."""
    per_task = (tau.shape[0],) + (1,) * (tau.ndim - 1)
    if isinstance(p, tuple):
        keep = _bernoulli(key, jnp.asarray([1.0 - x for x in p], jnp.float32).reshape(per_task), tau.shape, axes)
    else:
        keep = _bernoulli(key, 1.0 - p, tau.shape, axes)
    if rescale == "inverse":
        if isinstance(p, tuple):
            scale = jnp.asarray([0.0 if x == 1.0 else 1.0 / (1.0 - x) for x in p], tau.dtype).reshape(per_task)
        else:
            scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
        return jnp.where(keep, tau * scale, 0.0).astype(tau.dtype)
    kept = jnp.where(keep, tau, 0.0)
    if rescale == "l1":
        axes = tuple(range(1, tau.ndim))
        before = jnp.abs(tau).sum(axes, keepdims=True)
        after = jnp.abs(kept).sum(axes, keepdims=True)
        ok = (before >= _L1_EPS) & (after >= _L1_EPS)
        kept = kept * jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0)
    return kept.astype(tau.dtype)


# --------------------------------------------------------------------------
# SVD-based mergers


def tsv_rank(m: int, n: int, t: int) -> int:
    """Singular triplets kept per task by TSV-M: ``max(1, floor(min(m, n) / T))``."""
    return max(1, min(m, n) // t)


def tsv_ranks(m: int, n: int, t: int, spread_remainder: bool = False) -> tuple[int, ...]:
    """Triplets kept by each of the ``T`` tasks.

    ``spread_remainder=False``: :func:`tsv_rank` for every task.
    ``spread_remainder=True`` (the PACT authors' PACT + TSV-M): with
    ``r = min(m, n)``, the first ``r mod T`` tasks keep ``floor(r/T) + 1``
    and the others ``floor(r/T)`` (at least 1 each), so all ``r`` directions
    are used.
    """
    if not spread_remainder:
        return (tsv_rank(m, n, t),) * t
    base, extra = divmod(min(m, n), t)
    return tuple(max(1, base + (i < extra)) for i in range(t))


def _tsv_kernel(
    tau: jax.Array,
    key: jax.Array | None = None,
    *,
    svd: linalg.SvdMethod = "exact",
    oversample: int = 10,
    power_iters: int = 2,
    spread_remainder: bool = False,
) -> jax.Array:
    """TSV-M on one matrix ``tau (T, m, n) -> (m, n)``.

    ``tau_t ~= U_t S_t V_t^T`` (top ``ranks[t]`` of :func:`tsv_ranks`, exact or
    randomized SVD, computed at the largest rank and masked to each task's own);
    ``U = [U_1 .. U_T]``, ``V = [V_1 .. V_T]``, ``S = diag(S_1 .. S_T)``;
    ``delta = polar(U) S polar(V)^T``. Triplets with ``s`` at rounding level
    (:func:`pact_jax.linalg.significant`, scale ``max_t s_t,1``) are dropped.
    A dropped triplet has zero columns in ``U`` and ``V``, hence in their polar
    factors, so it adds nothing.
    """
    t, m, n = tau.shape
    ranks = tsv_ranks(m, n, t, spread_remainder)
    rank = max(ranks)
    u, s, vh = linalg.truncated_svd(
        tau, rank, method=svd, key=key, oversample=oversample, power_iters=power_iters
    )
    keep = linalg.significant(s, s.max(), max(m, n))  # (T, rank)
    if min(ranks) < rank:
        own = jnp.arange(rank)[None, :] < jnp.asarray(ranks)[:, None]
        keep = keep & own
    keep = keep.astype(u.dtype)
    u, vh = u * keep[:, None, :], vh * keep[:, :, None]
    u_cat = jnp.moveaxis(u, 0, 1).reshape(m, t * rank)
    v_cat = jnp.moveaxis(jnp.swapaxes(vh, 1, 2), 0, 1).reshape(n, t * rank)
    s_cat = (s * keep).reshape(t * rank)
    return (linalg.polar(u_cat) * s_cat) @ linalg.polar(v_cat).T


def tsv(
    stacked: PyTree,
    *,
    svd: linalg.SvdMethod = "exact",
    key: jax.Array | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    spread_remainder: bool = False,
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025).

    Per matrix leaf ``(T, m, n)``: the top ``k = floor(min(m, n)/T)`` singular
    triplets of each task vector, concatenated and decorrelated by the
    orthogonal polar factor: ``delta = polar(U) diag(S) polar(V)^T``.
    Non-matrix leaves: task mean.

    Args:
      svd: ``'exact'`` or ``'randomized'`` (only the top ``k`` triplets are
        needed, so a sketch of ``k + oversample`` columns suffices; see
        :func:`pact_jax.linalg.randomized_svd`).
      key: PRNG key, required for ``svd='randomized'``; each leaf uses
        :func:`pact_jax.tree.leaf_key`.
      oversample, power_iters: randomized SVD knobs.
      spread_remainder: ``False`` (default, the TSV paper's and the authors'
        plain TSV-M): every task keeps ``max(1, floor(min(m, n)/T))`` triplets.
        ``True`` (the PACT authors' PACT + TSV-M): the first
        ``min(m, n) mod T`` tasks keep one more (:func:`tsv_ranks`).
    """
    if svd not in ("exact", "randomized"):
        raise ValueError(f"svd must be 'exact' or 'randomized', got {svd!r}.")
    if svd == "randomized" and key is None:
        raise ValueError("tsv(svd='randomized') needs a PRNG key: key=jax.random.key(0).")
    _check_bool(spread_remainder, "spread_remainder")
    static = {"svd": svd, "oversample": oversample, "power_iters": power_iters}
    if spread_remainder:  # only when set, so the default's compiled kernels are shared
        static["spread_remainder"] = True
    return _merge_by_kind(
        stacked, rules, _tsv_kernel, view="matrix", static=static, key=key if svd == "randomized" else None
    )


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


PolarMethod = Literal["svd", "newton_schulz"]


def newton_schulz_polar(x: jax.Array, steps: int) -> jax.Array:
    """``steps`` Newton–Schulz iterations towards the orthogonal polar factor of ``x (m, n)``.

    ``X_0 = x / ||x||_F`` (all singular values in ``(0, 1]``), then
    ``X <- X (3 I - X^T X) / 2`` (written as ``(3 I - X X^T) X / 2`` when
    ``m < n``, the same map on the smaller Gram matrix). Each singular value
    follows ``s <- (3 s - s^3) / 2``, which converges to 1 for ``s`` in
    ``(0, sqrt(3))`` and keeps 0 at 0; a small ``s`` grows only by 1.5x per
    step, so few steps leave the small singular values of a large matrix well
    below 1. ``x = 0`` gives 0. Matmuls at float32 precision (``HIGHEST``).
    """
    m, n = x.shape
    norm = jnp.linalg.norm(x)
    y = x / jnp.where(norm > 0, norm, 1.0)
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)

    def step(_, y):
        if m >= n:
            return 0.5 * dot(y, 3.0 * jnp.eye(n, dtype=y.dtype) - dot(y.T, y))
        return 0.5 * dot(3.0 * jnp.eye(m, dtype=y.dtype) - dot(y, y.T), y)

    return jax.lax.fori_loop(0, steps, step, y)


def _iso_c_kernel(
    tau: jax.Array,
    *,
    polar: PolarMethod = "svd",
    ns_steps: int = 5,
    layerwise_scaling: bool = False,
) -> jax.Array:
    """Iso-C on one matrix: ``sum_t tau_t = U S V^T -> mean(S) U V^T``.

    ``polar='svd'``: over the significant triplets only
    (:func:`pact_jax.linalg.significant`): for a rank-deficient sum the
    null-space singular vectors are arbitrary. ``polar='newton_schulz'``:
    ``X = newton_schulz_polar(sum, ns_steps)``, ``delta = (<X, sum>_F / min(m, n)) X``
    (``<UV^T, U S V^T> = sum(S)``: the mean singular value without an SVD, over
    all ``min(m, n)``). ``layerwise_scaling``: ``delta *= ||sum||_F / ||delta||_F``
    (0 when ``delta = 0``).
    """
    _, m, n = tau.shape
    total = tau.sum(0)
    if polar == "svd":
        u, s, vh = linalg.exact_svd(total)
        keep = linalg.significant(s, s[0], max(m, n)).astype(u.dtype)
        delta = _masked_mean(s, keep) * ((u * keep) @ vh)
    else:
        x = newton_schulz_polar(total, ns_steps)
        delta = (jnp.vdot(x, total) / min(m, n)) * x
    if layerwise_scaling:
        norm = jnp.linalg.norm(delta)
        delta = delta * jnp.where(norm > 0, jnp.linalg.norm(total) / jnp.where(norm > 0, norm, 1.0), 0.0)
    return delta


def _masked_mean(s: jax.Array, keep: jax.Array) -> jax.Array:
    """Mean of ``s`` over ``keep`` (0/1 weights); 0 when nothing is kept."""
    return (s * keep).sum() / jnp.maximum(keep.sum(), 1.0)


def iso_c(
    stacked: PyTree,
    *,
    layerwise_scaling: bool = False,
    polar: PolarMethod = "svd",
    ns_steps: int = 5,
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025).

    Per matrix leaf: SVD of the task sum, every singular value replaced by
    their mean: ``delta = mean(S) U V^T``. Non-matrix leaves: task mean.

    Args:
      layerwise_scaling: ``False`` (default, the Iso paper): as above.
        ``True`` (the PACT authors' Iso-C config, ``enable_layerwise_scaling``):
        each matrix's delta is rescaled to the Frobenius norm of the plain
        sum, ``delta *= ||sum_t tau_t||_F / ||delta||_F`` (0-safe). With
        ``polar='svd'`` this makes every singular value the root mean square
        of ``S`` instead of its mean.
      polar: ``'svd'`` (default): ``U V^T`` and ``mean(S)`` from the SVD of the
        sum. ``'newton_schulz'`` (the PACT authors' ``isoc_ns``):
        ``X = newton_schulz_polar(sum, ns_steps)`` (start ``sum/||sum||_F``,
        ``X <- X (3I - X^T X)/2``) and ``delta = (<X, sum>_F / min(m, n)) X``;
        no SVD. Few steps do not converge for the small singular values of a
        large matrix (:func:`newton_schulz_polar`), so this is a different
        merge, not an approximation of ``'svd'``, unless ``ns_steps`` is large.
      ns_steps: Newton–Schulz iterations (``polar='newton_schulz'``), >= 1.
    """
    _check_bool(layerwise_scaling, "layerwise_scaling")
    if polar not in ("svd", "newton_schulz"):
        raise ValueError(f"polar must be 'svd' or 'newton_schulz', got {polar!r}.")
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"ns_steps must be an integer >= 1, got {ns_steps!r}.")
    static: dict[str, Any] = {}
    if polar != "svd":
        static.update(polar=polar, ns_steps=ns_steps)
    if layerwise_scaling:
        static["layerwise_scaling"] = True
    return _merge_by_kind(stacked, rules, _iso_c_kernel, view="matrix", static=static)


def iso_cts_split(m: int, n: int, t: int, common_fraction: float) -> tuple[int, int]:
    """``(k, s)``: common-subspace size and directions per task of Iso-CTS.

    ``r = min(m, n)``; the task-specific part ``r - floor(r * f)`` is rounded
    to a multiple of ``T`` so each task gets ``s`` directions and ``k = r - T s``.
    """
    r = min(m, n)
    specific = round((r - int(r * common_fraction)) / t) * t
    specific = min(specific, (r // t) * t)
    return r - specific, specific // t


def _iso_cts_kernel(
    tau: jax.Array, *, common_fraction: float, common_side: Literal["left", "right"] = "left"
) -> jax.Array:
    """Iso-CTS on one matrix ``tau (T, m, n) -> (m, n)``.

    ``sum_t tau_t = U S V^T``; common part ``U[:, :k], S[:k], V[:, :k]``; each
    task's residual ``tau_t - U_k U_k^T tau_t`` (``common_side='left'``) or
    ``tau_t - tau_t V_k V_k^T`` (``'right'``) gives its top ``s`` triplets;
    all factors are concatenated, orthogonalised by the polar factor, and every
    singular value replaced by the mean of the concatenated ones. Triplets at
    rounding level (:func:`pact_jax.linalg.significant`, scale: the sum's
    largest singular value) are dropped, as in :func:`iso_c`.

    Everything but the residual is symmetric under transposition, so
    ``'right'`` is ``'left'`` on ``tau^T``, transposed back.
    """
    if common_side == "right":
        return _iso_cts_kernel(jnp.swapaxes(tau, 1, 2), common_fraction=common_fraction).T
    t, m, n = tau.shape
    common, per_task = iso_cts_split(m, n, t, common_fraction)
    u, s, vh = linalg.exact_svd(tau.sum(0))
    keep = linalg.significant(s[:common], s[0], max(m, n)).astype(u.dtype)
    uk = u[:, :common] * keep
    us, ss, vs, keeps = [uk], [s[:common]], [vh[:common].T], [keep]
    if per_task > 0:
        residual = tau - uk @ (uk.T @ tau)
        ut, st, vht = linalg.exact_svd(residual, per_task)
        us.append(jnp.moveaxis(ut, 0, 1).reshape(m, t * per_task))
        ss.append(st.reshape(t * per_task))
        vs.append(jnp.moveaxis(jnp.swapaxes(vht, 1, 2), 0, 1).reshape(n, t * per_task))
        keeps.append(linalg.significant(ss[-1], s[0], max(m, n)).astype(u.dtype))
    keep_all = jnp.concatenate(keeps)
    u_all = linalg.polar(jnp.concatenate(us, axis=1) * keep_all)
    v_all = linalg.polar(jnp.concatenate(vs, axis=1) * keep_all)
    return _masked_mean(jnp.concatenate(ss), keep_all) * (u_all @ v_all.T)


def iso_cts(
    stacked: PyTree,
    common_fraction: float = 0.8,
    *,
    common_side: Literal["output", "input"] = "output",
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al. 2025).

    Per matrix leaf: the top ``k ~= common_fraction * min(m, n)`` directions of
    the task sum plus ``s = (min(m, n) - k)/T`` directions per task from the
    part of each task vector orthogonal to them (:func:`iso_cts_split`),
    orthogonalised, with isotropic singular values. Non-matrix leaves: task mean.

    Args:
      common_fraction: share of the spectrum given to the common subspace, in
        ``[0, 1]``; 1 reduces to :func:`iso_c`.
      common_side: the side on which the common subspace is removed from each
        task vector. ``'output'`` (default; the Iso paper's and the PACT
        authors' code: left singular vectors of a torch ``(d_out, d_in)``
        weight): ``tau_t - P tau_t`` with ``P`` the projector on the top-``k``
        output-side singular vectors of the sum. ``'input'``: on the input
        side. Which side of the matrix view that is follows
        ``rules.layout`` (:meth:`pact_jax.LeafRules.output_side`): on Flax
        ``(d_in, d_out)`` kernels ``'output'`` is the right side (columns).
        The default changed: earlier versions always used the left side of
        the matrix view, i.e. ``'input'`` on Flax kernels; pass
        ``common_side='input'`` to reproduce them.
    """
    common_fraction = check_fraction(common_fraction, "common_fraction", allow_zero=True)
    if common_side not in ("output", "input"):
        raise ValueError(f"common_side must be 'output' or 'input', got {common_side!r}.")
    side_of = rules.output_side if common_side == "output" else rules.input_side
    return _merge_by_kind(
        stacked,
        rules,
        _iso_cts_kernel,
        view="matrix",
        static={"common_fraction": common_fraction},
        static_for=lambda path: {"common_side": side_of(path)},
    )


MERGERS: dict[str, Callable[..., PyTree]] = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "tsv": tsv,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
}
