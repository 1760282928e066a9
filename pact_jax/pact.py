"""PACT: Preserving Anchored Cores in Task-vectors (arXiv:2606.18627).

A transform ``(pretrained, stacked) -> stacked`` run before any merger. It
finds "Load-Bearing Wall" (LBW) parts of the pre-trained weights, i.e.
pre-trained structure that a task relies on but leaves anchored, and removes
from the task vectors the components that would disturb them. All equations
are in DESIGN.md §1a/§1b and ``docs/method.md``; every choice is a keyword of
:func:`pact`.

Subspace perspective (for SVD-based mergers), per matrix leaf ``W0 (m, n)``,
``tau (T, m, n)``:

1. ``W0 = U0 S0 V0^T``; ``U0k`` = top ``k`` left singular vectors
   (``pretrained_rank``; optionally fewer, by ``pretrained_energy``).
2. ``Ut`` = top ``r`` left singular vectors of ``tau_t`` (``task_rank``).
3. ``M_t = (I - Ut Ut^T) U0k = A_t G_t B_t^T``; the LBW basis ``L_t`` is the
   columns of ``A_t`` whose cosine ``G_t >= align_threshold``.
4. ``tau_s <- tau_s - strength * P_s tau_s`` where ``P_s`` projects onto
   ``span{L_t : t != s}`` (``exclude_self=True``) or ``span{L_t}`` (all t).
   ``side='right'`` does the same with ``V0`` and ``tau^T``; ``'both'``
   applies ``tau <- (I - strength P_L) tau (I - strength P_R)``, both
   projectors found from the input task vectors.
5. ``svd='randomized'``: steps 1-2 by randomized range finding.

Scalar-weight perspective (for element-wise mergers), per leaf:
entry ``e`` is LBW for task ``t`` when ``|W0_e| > 0`` is in the leaf's top
``weight_fraction`` and ``|tau_t,e|`` in the bottom ``anchor_fraction`` of
``|tau_t|``; ``tau_s,e <- (1 - strength) tau_s,e`` wherever ``e`` is LBW for
some task ``t != s`` (any ``t`` if not ``exclude_self``).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from pact_jax import buckets, linalg
from pact_jax.tree import (
    DEFAULT_RULES,
    LeafRules,
    PactInputError,
    PyTree,
    check_finite,
    check_floating,
    check_fraction,
    check_same_structure,
    leaf_key,
    leaves_with_paths,
    validate_stacked,
)

Perspective = Literal["subspace", "scalar"]
Side = Literal["left", "right", "both"]

__all__ = ["DEFAULT_STRENGTH", "lbw_statistics", "pact", "resolve_rank"]

# ``strength=None`` per perspective, from the quality benchmark's ablation
# (benchmarks/results_ablation.md, T = 8, validation): with the subspace
# perspective every stronger removal lowered TA / TSV-M / Iso-CTS on our zoo,
# and 0.1 was the only setting at or above "no PACT" for all three on all 3
# seeds (+0.0 to +0.3 points: within noise). The scalar perspective (TIES)
# was best at full strength.
DEFAULT_STRENGTH: dict[str, float] = {"subspace": 0.1, "scalar": 1.0}


def resolve_rank(value: int | float, m: int, n: int, name: str, path: str) -> int:
    """An integer rank from ``value``: an int in ``[1, min(m, n)]``, or a fraction
    in ``(0, 1]`` of ``min(m, n)`` (rounded, at least 1)."""
    r = min(m, n)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PactInputError(f"{name} must be an int or a float fraction, got {value!r}.")
    if isinstance(value, (int, np.integer)):
        if not 1 <= value <= r:
            problem = f"is larger than the {m}x{n} matrix allows" if value > r else "must be at least 1"
            raise PactInputError(
                f"leaf '{path}': {name}={value} {problem} (valid: 1..{r}); "
                "a float such as 0.1 is a fraction of min(m, n) and scales with the layer."
            )
        return int(value)
    if not 0 < value <= 1:
        raise PactInputError(f"{name}={value} as a fraction must lie in (0, 1].")
    return max(1, int(round(value * r)))


# --------------------------------------------------------------------------
# Subspace perspective


def _lbw_bases(
    w0: jax.Array,
    tau: jax.Array,
    key: jax.Array | None,
    *,
    pretrained_rank: int | float,
    pretrained_energy: float | None,
    task_rank: int | float,
    align_threshold: float,
    exclude_self: bool,
    svd: str,
    oversample: int,
    power_iters: int,
    span_tol: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Steps 1-4 for the left side of ``w0 (m, n)``, ``tau (T, m, n)``.

    Returns ``basis (S, m, c)`` with ``S = T`` (one basis per receiving task,
    ``exclude_self``) or ``S = 1``, columns orthonormal or zero, and stats.
    """
    t, m, n = tau.shape
    pretrained_rank = resolve_rank(pretrained_rank, m, n, "pretrained_rank", "")
    task_rank = resolve_rank(task_rank, m, n, "task_rank", "")
    k0, k1 = (None, None) if key is None else jax.random.split(key)
    opts = dict(method=svd, oversample=oversample, power_iters=power_iters)
    pre = linalg.truncated_svd(w0, pretrained_rank, key=k0, **opts)
    keep0 = linalg.energy_rank_mask(pre.s, pretrained_energy, total=jnp.sum(jnp.square(w0)))
    u0k = pre.u * keep0[None, :]  # (m, k); dropped directions are zero columns
    ut = linalg.truncated_svd(tau, task_rank, key=k1, **opts).u  # (T, m, r)
    # Step 3: principal directions between the task core's complement and U0k.
    m_t = u0k[None] - ut @ (jnp.swapaxes(ut, 1, 2) @ u0k[None])  # (T, m, k)
    a, cosines, _ = jnp.linalg.svd(m_t, full_matrices=False)  # (T, m, k'), (T, k')
    is_lbw = cosines >= align_threshold
    lbw = a * is_lbw[:, None, :]  # (T, m, k')
    kk = lbw.shape[-1]
    if exclude_self:
        others = 1.0 - jnp.eye(t, dtype=lbw.dtype)  # (receiver s, giver t)
        cat = others[:, :, None, None] * lbw[None]  # (T, T, m, k')
        cat = jnp.moveaxis(cat, 1, 2).reshape(t, m, t * kk)
    else:
        cat = jnp.moveaxis(lbw, 0, 1).reshape(1, m, t * kk)
    basis, span_dim = linalg.span_basis(cat, span_tol)
    stats = {
        "pretrained_dims": keep0.sum(),
        "lbw_dims": is_lbw.sum(-1),
        "cosines": cosines,
        "span_dims": jnp.broadcast_to(span_dim, (t,)),
    }
    return basis, stats


def _project_out(tau: jax.Array, basis: jax.Array, strength: float) -> jax.Array:
    """``tau_s - strength * B_s B_s^T tau_s`` for ``tau (T, m, n)``, ``basis (S, m, c)``, S in {1, T}."""
    return tau - strength * (basis @ (jnp.swapaxes(basis, 1, 2) @ tau))


def _subspace_kernel(
    w0: jax.Array,
    tau: jax.Array,
    key: jax.Array | None,
    *,
    side: str,
    strength: float,
    **lbw_kw: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PACT subspace perspective on one matrix: ``(m, n), (T, m, n) -> (T, m, n), stats``."""
    compute = jnp.promote_types(tau.dtype, jnp.float32)
    w0, tau = w0.astype(compute), tau.astype(compute)
    kl, kr = (None, None) if key is None else jax.random.split(key)
    out, stats = tau, {}
    if side in ("left", "both"):
        basis_l, stats["left"] = _lbw_bases(w0, tau, kl, **lbw_kw)
    if side in ("right", "both"):
        basis_r, stats["right"] = _lbw_bases(w0.T, jnp.swapaxes(tau, 1, 2), kr, **lbw_kw)
    if side in ("left", "both"):
        out = _project_out(out, basis_l, strength)
    if side in ("right", "both"):
        out = jnp.swapaxes(_project_out(jnp.swapaxes(out, 1, 2), basis_r, strength), 1, 2)
    stats["energy_removed"] = _energy_removed(tau, out)
    return out, stats


def _energy_removed(tau: jax.Array, out: jax.Array) -> jax.Array:
    """Per task ``||tau_t - out_t||^2 / ||tau_t||^2`` (0 for a zero task vector)."""
    axes = tuple(range(1, tau.ndim))
    num = jnp.sum(jnp.square(tau - out), axis=axes)
    den = jnp.sum(jnp.square(tau), axis=axes)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


# --------------------------------------------------------------------------
# Scalar-weight perspective


def _top_fraction_mask(x: jax.Array, count: int) -> jax.Array:
    """``x >= `` its ``count``-th largest value along the last axis."""
    return x >= linalg.kth_largest(x, count)[..., None]


def _scalar_kernel(
    w0: jax.Array,
    tau: jax.Array,
    *,
    weight_fraction: float,
    anchor_fraction: float,
    strength: float,
    exclude_self: bool,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PACT scalar perspective on one flattened leaf: ``(N,), (T, N) -> (T, N), stats``.

    Fractions become counts ``max(1, round(fraction * N))``.
    """
    top_count = max(1, round(weight_fraction * w0.size))
    anchor_count = max(1, round(anchor_fraction * w0.size))
    # Zero pre-trained entries carry nothing to preserve, even when ties put them in the top fraction.
    important = _top_fraction_mask(jnp.abs(w0), top_count) & (w0 != 0)  # (N,)
    # anchored: |tau_t| within its anchor_count smallest magnitudes.
    mag = jnp.abs(tau)
    anchored = mag <= linalg.kth_smallest(mag, anchor_count)[:, None]
    lbw = important[None] & anchored  # (T, N)
    count = lbw.sum(0)
    masked = (count[None] - lbw) > 0 if exclude_self else jnp.broadcast_to(count > 0, lbw.shape)
    out = tau * (1.0 - strength * masked)
    stats = {
        "lbw_entries": lbw.sum(-1),
        "masked_entries": masked.sum(-1),
        "energy_removed": _energy_removed(tau, out),
    }
    return out, stats


# --------------------------------------------------------------------------
# Public API


def _pact_jobs(pretrained: PyTree, stacked: PyTree, settings: dict[str, Any]):
    """Validates the inputs, then yields the per-leaf kernel jobs and run them."""
    check_floating(pretrained, "pretrained")
    check_finite(pretrained, "pretrained")
    check_same_structure(pretrained, stacked, "pretrained", "stacked task vectors")
    t = validate_stacked(stacked)
    rules: LeafRules = settings["rules"]
    perspective = settings["perspective"]
    key = settings["key"]
    items = leaves_with_paths(stacked)
    w0_leaves = [leaf for _, leaf in leaves_with_paths(pretrained)]
    jobs, index = [], []
    for i, ((path, tau), w0) in enumerate(zip(items, w0_leaves)):
        if tau.shape[1:] != jnp.shape(w0):
            raise PactInputError(
                f"leaf '{path}': task vectors have shape {tau.shape} but pretrained has {jnp.shape(w0)}; "
                "expected (T, *pretrained.shape)."
            )
        kind = rules.kind(path, jnp.shape(w0))
        if kind in ("freeze", "average"):
            continue
        w0 = jnp.asarray(w0)
        if perspective == "subspace":
            if kind != "matrix":
                continue
            m, n = rules.matrix_shape(path, w0.shape)
            for name in ("pretrained_rank", "task_rank"):  # fail early, naming the leaf
                resolve_rank(settings[name], m, n, name, path)
            key_i = None if key is None else leaf_key(key, path)
            static = dict(
                side=settings["side"],
                strength=settings["strength"],
                pretrained_rank=settings["pretrained_rank"],
                pretrained_energy=settings["pretrained_energy"],
                task_rank=settings["task_rank"],
                align_threshold=settings["align_threshold"],
                exclude_self=settings["exclude_self"],
                svd=settings["svd"],
                oversample=settings["oversample"],
                power_iters=settings["power_iters"],
                span_tol=settings["span_tol"],
            )
            jobs.append(((w0.reshape(m, n), tau.reshape(t, m, n), key_i), static))
        else:
            static = dict(
                weight_fraction=settings["weight_fraction"],
                anchor_fraction=settings["anchor_fraction"],
                strength=settings["strength"],
                exclude_self=settings["exclude_self"],
            )
            jobs.append(((w0.reshape(-1), tau.reshape(t, -1)), static))
        index.append(i)
    kernel = _subspace_kernel if perspective == "subspace" else _scalar_kernel
    return items, index, buckets.run_bucketed(kernel, jobs)


def _settings(**kw: Any) -> dict[str, Any]:
    if kw["perspective"] not in ("subspace", "scalar"):
        raise ValueError(f"perspective must be 'subspace' or 'scalar', got {kw['perspective']!r}.")
    if kw["side"] not in ("left", "right", "both"):
        raise ValueError(f"side must be 'left', 'right' or 'both', got {kw['side']!r}.")
    if kw["svd"] not in ("exact", "randomized"):
        raise ValueError(f"svd must be 'exact' or 'randomized', got {kw['svd']!r}.")
    if kw["svd"] == "randomized" and kw["perspective"] == "subspace" and kw["key"] is None:
        raise ValueError("svd='randomized' needs a PRNG key: pact(..., key=jax.random.key(0)).")
    check_fraction(kw["align_threshold"], "align_threshold")
    if kw["strength"] is None:
        kw["strength"] = DEFAULT_STRENGTH[kw["perspective"]]
    check_fraction(kw["strength"], "strength", allow_zero=True)
    check_fraction(kw["weight_fraction"], "weight_fraction")
    check_fraction(kw["anchor_fraction"], "anchor_fraction")
    if kw["pretrained_energy"] is not None:
        check_fraction(kw["pretrained_energy"], "pretrained_energy")
    kw["strength"] = float(kw["strength"])
    kw["align_threshold"] = float(kw["align_threshold"])
    return kw


def pact(
    pretrained: PyTree,
    stacked: PyTree,
    *,
    perspective: Perspective = "subspace",
    pretrained_rank: int | float = 0.1,
    pretrained_energy: float | None = None,
    task_rank: int | float = 0.05,
    align_threshold: float = 0.9,
    side: Side = "left",
    weight_fraction: float = 0.1,
    anchor_fraction: float = 0.5,
    strength: float | None = None,
    exclude_self: bool = True,
    svd: linalg.SvdMethod = "exact",
    key: jax.Array | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    span_tol: float = 1e-4,
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """PACT pre-processing of stacked task vectors (see the module docstring).

    Args:
      pretrained: ``W0`` pytree.
      stacked: task vectors, leaves ``(T, *W0_leaf.shape)``.
      perspective: ``'subspace'`` (§1a; matrix leaves, others untouched) or
        ``'scalar'`` (§1b; every leaf, element-wise).
      pretrained_rank: ``k``, top pre-trained directions considered: an int,
        or a fraction of ``min(m, n)``.
      pretrained_energy: if set, keep only the fewest of those ``k``
        directions holding this fraction of ``||W0||_F^2``.
      task_rank: ``r``, size of each task core: int or fraction of ``min(m, n)``.
      align_threshold: minimum cosine (in ``(0, 1]``) between a pre-trained
        direction and the complement of a task core for it to be LBW.
      side: ``'left'`` (``U0``), ``'right'`` (``V0``, ``tau^T``) or ``'both'``.
      weight_fraction: scalar perspective, top fraction of ``|W0|`` per leaf.
      anchor_fraction: scalar perspective, bottom fraction of ``|tau_t|``
        counted as anchored.
      strength: how much of the LBW component is removed, in ``[0, 1]``;
        0 is the identity. ``None``: :data:`DEFAULT_STRENGTH` of the
        perspective (0.1 subspace, 1.0 scalar; set from the ablation).
      exclude_self: protect task ``t``'s LBW only in the *other* tasks' vectors.
      svd: ``'exact'`` or ``'randomized'`` for steps 1-2.
      key: PRNG key, required for ``svd='randomized'``; each leaf uses
        :func:`pact_jax.tree.leaf_key` (``key`` folded with its path).
      oversample, power_iters: randomized SVD knobs (see
        :func:`pact_jax.linalg.randomized_svd`).
      span_tol: singular values of the stacked LBW bases at or below this are
        treated as zero when building the projector (bases are unit-norm).
      rules: :class:`pact_jax.LeafRules`; frozen and averaged leaves are
        returned unchanged.

    Returns:
      Stacked task vectors of the same structure, shapes and dtypes.
    """
    settings = _settings(**{k: v for k, v in locals().items() if k not in ("pretrained", "stacked")})
    items, index, results = _pact_jobs(pretrained, stacked, settings)
    out = [leaf for _, leaf in items]
    for i, (new, _) in zip(index, results):
        out[i] = new.reshape(items[i][1].shape).astype(items[i][1].dtype)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(stacked), out)


def lbw_statistics(pretrained: PyTree, stacked: PyTree, **pact_kwargs: Any) -> dict[str, dict[str, np.ndarray]]:
    """Per-leaf statistics of what :func:`pact` finds and removes.

    Takes :func:`pact`'s keywords. Returns ``{path: stats}`` for every leaf PACT
    processes, as NumPy arrays: subspace perspective ``{'left'|'right':
    {'pretrained_dims', 'lbw_dims' (T,), 'span_dims' (T,), 'cosines' (T, k)},
    'energy_removed' (T,)}``; scalar perspective ``{'lbw_entries' (T,),
    'masked_entries' (T,), 'energy_removed' (T,)}``.
    """
    defaults = {
        k: p.default for k, p in inspect.signature(pact).parameters.items() if p.default is not p.empty
    }
    unknown = set(pact_kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"lbw_statistics got unknown keywords {sorted(unknown)}.")
    settings = _settings(**{**defaults, **pact_kwargs})
    items, index, results = _pact_jobs(pretrained, stacked, settings)
    return {items[i][0]: jax.tree_util.tree_map(np.asarray, stats) for i, (_, stats) in zip(index, results)}
