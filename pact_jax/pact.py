"""PACT: Preserving Anchored Cores in Task-vectors (arXiv:2606.18627).

A transform ``(pretrained, stacked) -> stacked`` run before any merger. With
no keywords, :func:`pact` computes the authors' algorithm (DESIGN.md §1a,
``full-finetune/src/utils/pact_utils.py`` of their release) with the fix to
its orthonormalisation, per matrix ``W0`` and task vectors ``tau_t``, on the
INPUT space of each matrix (the rows of a Flax ``(in, out)`` kernel):

1. ``V0K``: top ``K = max(1, floor(0.8 min(m, n)))`` input-side singular
   vectors of ``W0`` (the pre-trained core);
2. ``V_t``: top ``k = min(10, min(m, n))`` input-side singular vectors of ``tau_t``;
3. ``R_t`` = span of ``(I - V_t V_t^T) V0K`` (what task t relies on but does not change);
4. ``tau_j <- tau_j - tau_j P_j P_j^T``, ``P_j`` an orthonormal basis of
   ``span{R_i : i != j}``, found by a rank-revealing SVD with a relative
   tolerance (the release's plain QR keeps ``min(d, columns)`` directions
   whatever the rank, and so zeroes every task vector once ``(T - 1) K >= d``:
   ``orthonormalize="qr"`` reproduces it).

The math is in :mod:`pact_jax.subspace` (computed exactly in a subspace of
dimension at most ``2 T k``, not by the ``d x (T-1) K`` SVDs above); which
matrices are filtered in :mod:`pact_jax.scope`. :data:`PRESETS` names the
authors' adaptive variant, the release's behaviour, and pact_jax's earlier
"light" setting.

Scalar-weight perspective (our own extension, for element-wise mergers), per
leaf: entry ``e`` is LBW for task ``t`` when ``|W0_e| > 0`` is in the leaf's
top ``weight_fraction`` and ``|tau_t,e|`` in the bottom ``anchor_fraction`` of
``|tau_t|``; ``tau_s,e <- (1 - strength) tau_s,e`` wherever ``e`` is LBW for
some task ``t != s`` (any ``t`` if not ``exclude_self``). The authors use a
Fisher-information version of it as an analysis only (DESIGN §1b).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Collection, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from pact_jax import buckets, linalg, scope, subspace
from pact_jax.tree import (
    DEFAULT_RULES,
    LeafRules,
    PactInputError,
    PyTree,
    check_fraction,
    leaf_key,
)

Perspective = Literal["subspace", "scalar"]
Side = Literal["input", "output", "left", "right", "both"]

__all__ = ["DEFAULT_STRENGTH", "PRESETS", "lbw_statistics", "pact", "pact_preset", "resolve_rank"]

# ``strength=None`` per perspective: the authors remove the whole protected component.
DEFAULT_STRENGTH: dict[str, float] = {"subspace": 1.0, "scalar": 1.0}

PRESETS: Mapping[str, Mapping[str, Any]] = {
    # The authors' configs (rank_selection: fixed, K_ratio 0.8, k_per_task 10), with the fix: the defaults.
    "paper": {},
    # The authors' rank_selection: adaptive (tau_pre 0.85, tau_task 0.95 of the squared singular values).
    "adaptive": {"pretrained_rank": 1.0, "pretrained_energy": 0.85, "task_rank": 1.0, "task_energy": 0.95},
    # pact_jax's default before the authors' code was known, chosen by the ViT-zoo ablation
    # (benchmarks/results_ablation.md): a cosine threshold and a tenth of the component. It removes
    # about 0.5 % of ||tau||^2.
    "light": {"pretrained_rank": 0.1, "task_rank": 0.05, "align_threshold": 0.9, "strength": 0.1,
              "oversample": 10},
    # What the authors' full-fine-tune release computes: plain QR bases, and W0 = 0 (its "pre-trained
    # core" is the first K coordinate axes). Zeroes every filtered matrix once (T - 1) K >= d_in.
    "release": {"orthonormalize": "qr", "core": "axes"},
}


def pact_preset(name: str) -> dict[str, Any]:
    """A copy of the keywords of preset ``name`` (:data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown PACT preset {name!r}; choose one of {sorted(PRESETS)}.")
    return dict(PRESETS[name])


def resolve_rank(value: int | float, m: int, n: int, name: str, path: str, *, cap: bool = False) -> int:
    """An integer rank from ``value``: an int in ``[1, min(m, n)]`` (``cap``: larger ints
    become ``min(m, n)``, the authors' ``k = min(k_per_task, min(m, n))``), or a fraction
    in ``(0, 1]`` of ``min(m, n)``: ``max(1, floor(value * min(m, n)))``, the authors' ``K``."""
    r = min(m, n)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PactInputError(f"{name} must be an int or a float fraction, got {value!r}.")
    if isinstance(value, (int, np.integer)):
        if value < 1 or (value > r and not cap):
            problem = f"is larger than the {m}x{n} matrix allows" if value > r else "must be at least 1"
            raise PactInputError(
                f"leaf '{path}': {name}={value} {problem} (valid: 1..{r}); "
                "a float such as 0.8 is a fraction of min(m, n) and scales with the layer."
            )
        return int(min(value, r))
    if not 0 < value <= 1:
        raise PactInputError(f"{name}={value} as a fraction must lie in (0, 1].")
    return max(1, int(math.floor(value * r + 1e-9)))


def _filter_all_warning(kind: str, leaves: list[str]) -> None:
    warnings.warn(
        f"PACT: on {len(leaves)} matrices (e.g. '{leaves[0]}') {kind}, so the filter removes "
        "(almost) every task vector there; lower pretrained_rank or task_rank if that is not intended.",
        UserWarning,
        stacklevel=5,
    )


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
        "energy_removed": subspace.energy_removed(tau, out),
    }
    return out, stats


# --------------------------------------------------------------------------
# Public API


def _sides(side: str, rules: LeafRules, path: str) -> tuple[str, ...]:
    if side == "input":
        return (rules.input_side(path),)
    if side == "output":
        return (rules.output_side(path),)
    return ("left", "right") if side == "both" else (side,)


def _given_space(settings: dict[str, Any], path: str, t: int, d_in: int) -> jax.Array | None:
    """The caller's explicit space of ``path`` (``task_spaces=``), checked: ``(T, d_in, k)``."""
    spaces = settings["task_spaces"]
    if spaces is None or path not in spaces:
        return None
    v = jnp.asarray(spaces[path])
    if v.ndim != 3 or v.shape[:2] != (t, d_in):
        raise PactInputError(
            f"leaf '{path}': task_spaces has shape {v.shape}, expected (T, d, k) = ({t}, {d_in}, k) "
            "(orthonormal bases of the input side of each task's update)."
        )
    return v


def _subspace_jobs(settings: dict[str, Any], matrices: list, t: int) -> list:
    jobs, all_removed = [], []
    for _, path, w0, tau in matrices:
        m, n = w0.shape
        big_k = resolve_rank(settings["pretrained_rank"], m, n, "pretrained_rank", path)
        k = resolve_rank(settings["task_rank"], m, n, "task_rank", path, cap=True)
        sides = _sides(settings["side"], settings["rules"], path)
        d_in = {"left": m, "right": n}[sides[0]]
        given = _given_space(settings, path, t, d_in)
        if given is not None:
            k = given.shape[-1]
        others = t - 1 if settings["exclude_self"] else t
        if others > 0 and settings["strength"] > 0 and (
            big_k + others * k >= d_in or (settings["orthonormalize"] == "qr" and others * big_k >= d_in)
        ):
            all_removed.append(path)
        static = dict(
            sides=sides,
            pretrained_rank=big_k,
            task_rank=k,
            **{name: settings[name] for name in (
                "pretrained_energy", "task_energy", "core", "svd", "oversample", "power_iters",
                "exclude_self", "strength", "orthonormalize", "align_threshold")},
            tol=settings["span_tol"],
        )
        key = None if settings["key"] is None else leaf_key(settings["key"], path)
        jobs.append(((w0, tau, key, given), static))
    if all_removed and settings["pretrained_energy"] is None and settings["align_threshold"] is None:
        _filter_all_warning("K + (T-1) k reaches the input dimension (or (T-1) K with the release's QR)",
                            all_removed)
    return jobs


def _pact_jobs(pretrained: PyTree, stacked: PyTree, settings: dict[str, Any]):
    """Validates the inputs, builds the per-leaf kernel jobs and runs them."""
    rules: LeafRules = settings["rules"]
    if settings["perspective"] == "subspace":
        select = functools.partial(
            scope.resolve_paths, rules=rules, paths=settings["paths"], only_2d=settings["only_2d"],
            include=settings["include"], exclude=settings["exclude"], layer_ratio=settings["layer_ratio"],
        )
    else:
        def select(shapes):  # every leaf that is neither frozen nor averaged, element-wise
            return frozenset(p for p, s in shapes.items() if rules.kind(p, s) not in ("freeze", "average"))
    items, matrices = scope.matrix_leaves(pretrained, stacked, rules, select,
                                          flat=settings["perspective"] == "scalar")
    t = items[0][1].shape[0]
    if settings["perspective"] == "subspace":
        jobs = _subspace_jobs(settings, matrices, t)
        kernel = subspace.pact_kernel
    else:
        static = {k: settings[k] for k in ("weight_fraction", "anchor_fraction", "strength", "exclude_self")}
        jobs = [((w0, tau), static) for _, _, w0, tau in matrices]
        kernel = _scalar_kernel
    return items, [i for i, *_ in matrices], buckets.run_bucketed(kernel, jobs)


_CHOICES = {
    "perspective": ("subspace", "scalar"),
    "side": ("input", "output", "left", "right", "both"),
    "svd": ("exact", "randomized"),
    "orthonormalize": ("svd", "qr"),
    "core": ("pretrained", "axes"),
}


def _settings(**kw: Any) -> dict[str, Any]:
    for name, choices in _CHOICES.items():
        if kw[name] not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {kw[name]!r}.")
    if kw["svd"] == "randomized" and kw["perspective"] == "subspace" and kw["key"] is None:
        raise ValueError("svd='randomized' needs a PRNG key: pact(..., key=jax.random.key(0)).")
    if kw["align_threshold"] is not None:
        kw["align_threshold"] = check_fraction(kw["align_threshold"], "align_threshold")
        if kw["orthonormalize"] == "qr":
            raise ValueError("align_threshold needs orthonormalize='svd' (QR has no singular values to threshold).")
    if kw["perspective"] == "scalar":  # no task spaces there (a chain forwards them to every PACT step)
        kw["task_spaces"] = None
    if kw["task_spaces"] is not None:
        if not isinstance(kw["task_spaces"], Mapping):
            raise ValueError(f"task_spaces must be a mapping {{leaf path: (T, d_in, k) array}}, got "
                             f"{type(kw['task_spaces']).__name__}.")
        if kw["side"] != "input":
            raise ValueError("task_spaces are input-side spaces: use side='input', or no task_spaces (for LoRA "
                             "adapters: --pact-arg lora_spaces=false, the dense SVD).")
    if kw["strength"] is None:
        kw["strength"] = DEFAULT_STRENGTH[kw["perspective"]]
    kw["strength"] = check_fraction(kw["strength"], "strength", allow_zero=True)
    check_fraction(kw["weight_fraction"], "weight_fraction")
    check_fraction(kw["anchor_fraction"], "anchor_fraction")
    for name in ("pretrained_energy", "task_energy"):
        if kw[name] is not None:
            kw[name] = check_fraction(kw[name], name)
    if kw["pretrained_energy"] is not None and kw["svd"] == "randomized":
        raise ValueError("pretrained_energy needs the whole spectrum of W0: use svd='exact'.")
    if isinstance(kw["span_tol"], bool) or not isinstance(kw["span_tol"], (int, float)) or not 0 <= kw["span_tol"] < 1:
        raise ValueError(f"span_tol must lie in [0, 1), got {kw['span_tol']!r}.")
    if kw["oversample"] < 0 or kw["power_iters"] < 0:
        raise ValueError(f"oversample and power_iters must be >= 0, got {kw['oversample']}, {kw['power_iters']}.")
    scope.check_scope(kw["include"], kw["exclude"], kw["layer_ratio"])
    for name in ("include", "exclude"):  # hashable for the kernel cache, and no list aliasing
        if kw[name] is not None and not isinstance(kw[name], str):
            kw[name] = tuple(kw[name])
    return kw


def pact(
    pretrained: PyTree,
    stacked: PyTree,
    *,
    perspective: Perspective = "subspace",
    pretrained_rank: int | float = 0.8,
    pretrained_energy: float | None = None,
    task_rank: int | float = 10,
    task_energy: float | None = None,
    align_threshold: float | None = None,
    side: Side = "input",
    strength: float | None = None,
    exclude_self: bool = True,
    orthonormalize: Literal["svd", "qr"] = "svd",
    core: Literal["pretrained", "axes"] = "pretrained",
    span_tol: float = 1e-4,
    weight_fraction: float = 0.1,
    anchor_fraction: float = 0.5,
    svd: linalg.SvdMethod = "exact",
    key: jax.Array | None = None,
    oversample: int = 0,
    power_iters: int = 2,
    only_2d: bool = False,
    include: scope.Patterns = None,
    exclude: scope.Patterns = scope.DEFAULT_EXCLUDE,
    layer_ratio: float = 1.0,
    paths: Collection[str] | None = None,
    task_spaces: Mapping[str, jax.Array] | None = None,
    rules: LeafRules = DEFAULT_RULES,
) -> PyTree:
    """PACT pre-processing of stacked task vectors (see the module docstring).

    With no keywords: the authors' algorithm with rank-revealing bases (DESIGN
    §1a steps 1-4). ``functools.partial(pact, **pact_preset("light"))`` etc.
    for the other :data:`PRESETS`.

    Args:
      pretrained: ``W0`` pytree.
      stacked: task vectors, leaves ``(T, *W0_leaf.shape)``.
      perspective: ``'subspace'`` (§1a; the chosen matrices, others untouched) or
        ``'scalar'`` (our element-wise extension, every leaf).
      pretrained_rank: ``K``: an int (at most ``min(m, n)``), or a fraction
        ``f`` of it: ``max(1, floor(f min(m, n)))`` (default 0.8, the authors' ``K_ratio``).
      pretrained_energy: adaptive ``K`` (the authors' ``tau_pre``, 0.85): the
        fewest of those directions whose squared singular values reach this
        share of ``||W0||_F^2``.
      task_rank: ``k`` per task: an int, capped at ``min(m, n)`` (default 10,
        the authors' ``k_per_task``), or a fraction.
      task_energy: adaptive ``k`` (``tau_task``, 0.95), likewise on ``tau_t``.
      align_threshold: ``None``: every direction of each reliance space (the
        authors). A cosine in ``(0, 1]``: only reliance directions whose
        singular value in ``(I - V_t V_t^T) V0K`` reaches it (pact_jax's earlier
        variant; runs the direct algorithm, cheap only for small ``K``).
      side: the space protected: ``'input'`` (default; the rows of a Flax
        kernel, the columns of a torch weight, from ``rules.layout``),
        ``'output'``, or the matrix view's ``'left'`` / ``'right'`` / ``'both'``.
      strength: share of the protected component removed, in ``[0, 1]``;
        ``None``: 1 (0 is the identity).
      exclude_self: receiver ``j`` protects the other tasks' reliance spaces
        (the authors); ``False``: every task's, its own included.
      orthonormalize: ``'svd'`` (rank-revealing, relative tolerance
        ``span_tol``) or ``'qr'``: the release's plain QR (reproduces its
        zeroing when ``(T - 1) K >= d``).
      core: ``'pretrained'`` (the real ``W0``) or ``'axes'``: the release's
        full-fine-tune pipeline, which passes ``W0 = 0``, so its core is the
        first ``K`` coordinate axes.
      span_tol: rank cut-off: singular values of ``(I - V_t V_t^T) V0K`` (at
        most 1) at or below ``span_tol``, and of a concatenation of reliance
        bases at or below ``span_tol`` times its largest, count as zero.
      weight_fraction, anchor_fraction: scalar perspective fractions.
      svd: ``'exact'`` or ``'randomized'`` for steps 1-2 (``key`` required;
        the authors' ``torch.svd_lowrank`` with ``q = K`` or ``k``, 2 power iterations).
      key: PRNG key; each leaf uses :func:`pact_jax.tree.leaf_key`.
      oversample, power_iters: randomized SVD sketch columns beyond the rank
        (0: the authors' ``q``) and power iterations.
      only_2d, include, exclude, layer_ratio: which matrices are filtered
        (:func:`pact_jax.scope.select_matrices`; default every matrix view
        except names containing ``text_projection``).
      paths: an explicit collection of leaf paths to filter instead (resolve
        ``layer_ratio < 1`` with :func:`pact_jax.scope.select_matrices` over
        the whole model when merging group by group).
      task_spaces: ``{path: V (T, d_in, k)}``: each task's explicit space
        (step 2) given instead of computed, columns orthonormal or zero,
        ``d_in`` the input side of the matrix view (``rules.input_side``);
        ``task_rank`` / ``task_energy`` do not apply to those paths. The LoRA
        variant (DESIGN §1a step 9) passes the row space of each adapter's
        ``A`` (:func:`pact_jax.lora.row_space`, k = r); :func:`pact_jax.chain`
        forwards a merge's ``task_spaces=`` here. Needs ``side='input'``;
        ignored by the scalar perspective.
      rules: :class:`pact_jax.LeafRules`; frozen and averaged leaves are
        returned unchanged.

    Returns:
      Stacked task vectors of the same structure, shapes and dtypes.

    Warns:
      UserWarning when ``K + (T - 1) k`` reaches a matrix's input dimension:
      the protected space is then (nearly) everything.
    """
    settings = _settings(**{k: v for k, v in locals().items() if k not in ("pretrained", "stacked")})
    items, index, results = _pact_jobs(pretrained, stacked, settings)
    out = [leaf for _, leaf in items]
    for i, (new, _) in zip(index, results):
        out[i] = new.reshape(items[i][1].shape).astype(items[i][1].dtype)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(stacked), out)


def lbw_statistics(pretrained: PyTree, stacked: PyTree, **pact_kwargs: Any) -> dict[str, dict[str, Any]]:
    """Per-leaf statistics of what :func:`pact` finds and removes.

    Takes :func:`pact`'s keywords. Returns ``{path: stats}`` for every leaf PACT
    processes, as NumPy arrays: subspace perspective ``{'left'|'right':
    {'pretrained_dims' (K kept), 'task_dims' (T,) (k kept), 'reliance_dims' (T,)
    (dim R_t), 'protect_dims' (T,) (dim P_t)}, 'energy_removed' (T,)}``;
    scalar perspective ``{'lbw_entries' (T,), 'masked_entries' (T,), 'energy_removed' (T,)}``.
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
