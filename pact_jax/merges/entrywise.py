"""Entry-wise mergers: weight averaging, Task Arithmetic, TIES, and the DARE transform.

Each acts on every entry of a leaf independently of the matrix structure
(TIES and DARE see a leaf as flat ``(T, N)``); all take per-task weights and a
``convention``: ``'pact_jax'`` (the default) or ``'mergekit'`` (mergekit
0.1.5's rules, so that a mergekit config gives mergekit's numbers);
docs/mergekit.md sets the two side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from pact_jax import buckets, linalg
from pact_jax.merges._common import (
    Convention,
    _all_checks,
    _check_bool,
    _check_convention,
    _check_len,
    _check_weights,
    _elementwise,
    _merge_by_kind,
    _per_task_fraction,
    _weight_total,
    _weighted_mean,
    _weighted_sum,
)
from pact_jax.tree import (
    DEFAULT_RULES,
    LeafRules,
    PyTree,
    leaf_key,
    leaves_with_paths,
    validate_stacked,
)

DareRescale = Literal["inverse", "l1", "none"]
# mergekit 0.1.5 leaves a sparsified task vector unscaled when either L1 norm is below this.
_L1_EPS = 1e-7


# --------------------------------------------------------------------------
# Averaging and Task Arithmetic


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
