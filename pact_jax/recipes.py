"""Named merge recipes: a method name (+ PACT or SIFT, or neither) -> a :func:`pact_jax.chain`.

The command line, the benchmarks and the notebooks build their merges here,
so "ties with PACT" means the same chain everywhere:

    merge = pact_jax.recipes.make_merge("iso_cts", use_pact=True, alpha=1.0)
    merge = pact_jax.recipes.make_merge("tsv", pact_preset="light")      # a preset implies PACT
    merge = pact_jax.recipes.make_merge("task_arithmetic", use_sift=True)  # SIFT instead of PACT

PACT's perspective follows the method (DESIGN §1a/§1b): the subspace
perspective for the mergers that act on whole task vectors (tsv, iso_c,
iso_cts, and task_arithmetic / average, whose sum the subspace view reads as a
matrix), the scalar-weight perspective for the entry-wise ones (ties,
dare_ties); ``pact_kwargs={"perspective": ...}`` overrides it.

Keywords reach PACT in this order, later ones winning: the perspective of the
method, the preset (:data:`pact_jax.pact.PRESETS`), ``svd=``, ``pact_kwargs``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np

import pact_jax
from pact_jax import merges
from pact_jax.chain import chain
from pact_jax.linalg import SvdMethod
from pact_jax.tree import DEFAULT_RULES, LeafRules, leaves_with_paths

METHODS: tuple[str, ...] = ("average", "task_arithmetic", "ties", "dare_ties", "tsv", "iso_c", "iso_cts")
# METHODS are the recipes the benchmarks and the demo loop over; ALL_METHODS adds DARE followed by
# task arithmetic (mergekit's dare_linear), which every entry point here accepts.
ALL_METHODS: tuple[str, ...] = (*METHODS, "dare_task_arithmetic")
# method -> the merger that follows DARE in it
DARE_METHODS: Mapping[str, str] = {"dare_ties": "ties", "dare_task_arithmetic": "task_arithmetic"}
SCALAR_METHODS = frozenset({"ties", "dare_ties"})
# The recipes whose merger takes per-task ``weights`` (and ``normalize``).
WEIGHTED_METHODS: tuple[str, ...] = ("average", "task_arithmetic", "ties", "dare_ties", "dare_task_arithmetic")
# The transform run before the merger: none, PACT or SIFT (the PACT authors' ablation baseline).
Transform = Literal["pact", "sift"] | None
TRANSFORMS: tuple[Transform, ...] = (None, "pact", "sift")
# Keywords of pact / sift choosing which matrices they touch; ``paths=`` overrides them all.
SCOPE_KEYS: tuple[str, ...] = ("only_2d", "include", "exclude", "layer_ratio")

# Used when no alpha is given. Task arithmetic sums T task vectors, so it is
# scaled down (0.3 is the usual choice for 8 ViT tasks); the others are
# already on the scale of one task vector.
DEFAULT_ALPHA: Mapping[str, float] = {
    "average": 1.0,
    "task_arithmetic": 0.3,
    "ties": 1.0,
    "dare_ties": 1.0,
    "dare_task_arithmetic": 0.3,
    "tsv": 1.0,
    "iso_c": 1.0,
    "iso_cts": 1.0,
}
# Per (method, transform) exceptions to DEFAULT_ALPHA. PACT with the paper's defaults removes
# 85-92 % of ||tau||^2 and SIFT 73 %, so the merged delta is smaller: on both quality suites
# (benchmarks/RESULTS.md, "PACT as published: the verdict") the best alpha after them was 1.7-3.7x
# the unfiltered method's (ViT zoo: TSV-M 1.2-1.8 vs 0.67, Iso-C / Iso-CTS 1.2-2.3 vs 0.8-1.2,
# TA 0.33 vs 0.13-0.2 at T = 8). Twice the method's default is the round middle of that evidence.
# The scalar perspective (ties, dare_ties) removes ~10 % and keeps the method's alpha.
_ALPHA_OVERRIDES: dict[tuple[str, Transform], float] = {
    (method, transform): 2.0 * DEFAULT_ALPHA[method]
    for method in ("average", "task_arithmetic", "dare_task_arithmetic", "tsv", "iso_c", "iso_cts")
    for transform in ("pact", "sift")
}


def default_alpha(method: str, transform: Transform = None, preset: str | None = None) -> float:
    """The alpha :func:`make_merge` uses for ``method`` after ``transform`` (``None``, ``'pact'``
    or ``'sift'``) when none is given; PACT's ``light`` preset removes ~0.5 % of tau and keeps
    the method's alpha."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {ALL_METHODS}.")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {TRANSFORMS}.")
    if transform == "pact" and preset == "light":
        return DEFAULT_ALPHA[method]
    return _ALPHA_OVERRIDES.get((method, transform), DEFAULT_ALPHA[method])


def default_perspective(method: str) -> str:
    return "scalar" if method in SCALAR_METHODS else "subspace"


def pact_presets() -> Mapping[str, Mapping[str, Any]]:
    """:data:`pact_jax.pact.PRESETS`: named sets of PACT keywords."""
    from pact_jax.pact import PRESETS

    return PRESETS


def _keywords(fn: Callable[..., Any]) -> set[str]:
    skip = {"key", "pretrained", "stacked", "rules"}
    return {n for n in inspect.signature(fn).parameters if n not in skip}


def _bind(fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> Callable[..., Any]:
    unknown = set(kwargs) - _keywords(fn)
    if unknown:
        raise ValueError(f"{what} got unknown hyperparameters {sorted(unknown)}; it takes {sorted(_keywords(fn))}.")
    return functools.partial(fn, **kwargs)


def transform_settings(
    method: str,
    *,
    use_pact: bool = False,
    pact_preset: str | None = None,
    pact_kwargs: Mapping[str, Any] | None = None,
    use_sift: bool = False,
    sift_kwargs: Mapping[str, Any] | None = None,
    svd: SvdMethod | None = None,
) -> tuple[Transform, dict[str, Any]]:
    """Which transform :func:`make_merge` runs before ``method``, and its keywords.

    Returns ``(None, {})``, ``('pact', pact keywords)`` or ``('sift', sift
    keywords)``; raises ``ValueError`` for contradictory arguments (see
    :func:`make_merge`).
    """
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {ALL_METHODS}.")
    use_pact = use_pact or pact_preset is not None
    if use_pact and use_sift:
        what = f"pact_preset={pact_preset!r}" if pact_preset is not None else "use_pact"
        raise ValueError(
            f"{what} and use_sift are exclusive: SIFT (the PACT authors' ablation baseline) filters the task "
            "vectors instead of PACT, not after it; choose one."
        )
    if pact_kwargs and not use_pact:
        raise ValueError(f"PACT hyperparameters {sorted(pact_kwargs)} given, but PACT is off.")
    if sift_kwargs and not use_sift:
        raise ValueError(f"SIFT hyperparameters {sorted(sift_kwargs)} given, but SIFT is off.")
    svd_kw = {} if svd is None else {"svd": svd}
    if use_sift:
        return "sift", {**svd_kw, **(sift_kwargs or {})}
    if not use_pact:
        return None, {}
    user = dict(pact_kwargs or {})
    perspective = user.get("perspective", default_perspective(method))
    if perspective == "subspace" and method in SCALAR_METHODS:
        warnings.warn(
            f"PACT's subspace perspective before {method}: {method} trims and elects signs entry by entry, and the "
            "filtered task vectors are dense low-rank updates; no benchmark here measures this pairing (the "
            f"default before {method} is the scalar-weight perspective).",
            stacklevel=3,
        )
    kw: dict[str, Any] = {"perspective": perspective}
    if pact_preset is not None:
        presets = pact_presets()
        if pact_preset not in presets:
            raise ValueError(f"unknown PACT preset {pact_preset!r}; choose one of {list(presets)}.")
        if perspective == "scalar" and pact_preset != "paper":
            raise ValueError(
                f"PACT preset {pact_preset!r} sets subspace-perspective keywords {sorted(presets[pact_preset])}, "
                f"but PACT before {method} uses the scalar-weight perspective (DESIGN §1b), which has no such "
                "keywords; use preset 'paper' (or none), or pact_kwargs={'perspective': 'subspace'}."
            )
        kw.update(presets[pact_preset])
    kw.update(svd_kw)
    kw.update(user)
    return "pact", kw


def is_scoped(transform: Transform, kwargs: Mapping[str, Any]) -> bool:
    """Whether ``transform`` with ``kwargs`` chooses its matrices by a scope (subspace PACT, SIFT)."""
    return transform == "sift" or (transform == "pact" and kwargs.get("perspective") == "subspace")


def with_scope_paths(
    kwargs: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], rules: LeafRules = DEFAULT_RULES
) -> dict[str, Any]:
    """``kwargs`` of :func:`pact_jax.pact` / :func:`pact_jax.sift` with their scope keywords
    (:data:`SCOPE_KEYS`) replaced by the explicit ``paths=`` that scope selects among ``shapes``
    (:func:`pact_jax.scope.select_matrices`: same matrices, same model order, whichever part of
    the tree the transform is later called on). An explicit ``paths`` is kept as it is."""
    if "paths" in kwargs:
        return dict(kwargs)
    from pact_jax import scope

    scope_kw = {k: kwargs[k] for k in SCOPE_KEYS if k in kwargs}
    out = {k: v for k, v in kwargs.items() if k not in SCOPE_KEYS}
    out["paths"] = tuple(scope.select_matrices(shapes, rules, **scope_kw))
    return out


def make_merge(
    method: str,
    *,
    use_pact: bool = False,
    pact_preset: str | None = None,
    pact_kwargs: Mapping[str, Any] | None = None,
    use_sift: bool = False,
    sift_kwargs: Mapping[str, Any] | None = None,
    method_kwargs: Mapping[str, Any] | None = None,
    alpha: float | None = None,
    rules: LeafRules = DEFAULT_RULES,
    svd: SvdMethod | None = None,
    budget_bytes: int | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Callable[..., Any]:
    """The chain for ``method`` (one of :data:`ALL_METHODS`), optionally after PACT or SIFT.

    Args:
      method: merger name (:data:`ALL_METHODS`); ``dare_ties`` is ``dare``
        (drop rate ``p``) then ``ties`` (``density``), ``dare_task_arithmetic``
        is ``dare`` then ``task_arithmetic``: pass both steps' keywords
        through ``method_kwargs`` (``convention`` reaches both).
      use_pact: run :func:`pact_jax.pact` on the task vectors first.
      pact_preset: a name of :data:`pact_jax.pact.PRESETS` (``'paper'``,
        ``'adaptive'``, ``'light'``, ``'release'``); implies ``use_pact``.
        Its keywords come under ``svd`` and ``pact_kwargs``. The presets
        other than ``'paper'`` set subspace-perspective keywords, so with a
        scalar-perspective method (ties, dare_ties) they are an error unless
        ``pact_kwargs`` sets ``perspective='subspace'``.
      pact_kwargs: keywords of :func:`pact_jax.pact`.
      use_sift: run :func:`pact_jax.sift` (the PACT authors' ablation
        baseline) instead; exclusive with ``use_pact`` / ``pact_preset``.
      sift_kwargs: keywords of :func:`pact_jax.sift`.
      method_kwargs: the merger's hyperparameters (``density``, ``p``,
        ``common_fraction``, ``weights``, ``normalize``, ``convention``).
      alpha: scaling of the merged delta; default :func:`default_alpha`.
      rules: leaf rules for every step.
      svd: ``'exact'`` or ``'randomized'`` for every SVD of which only top
        factors are used: PACT's or SIFT's and the merger's, if it takes
        ``svd`` (TSV-M). An ``svd`` in ``pact_kwargs``, ``sift_kwargs`` or
        ``method_kwargs`` wins. ``'randomized'`` needs a key.
      budget_bytes: run the chain group of leaves by group of leaves within
        this working-set budget (see :func:`pact_jax.chain`); ``None``: the
        whole tree at once. The transform's scope (``layer_ratio`` counts
        matrices of the whole model) is then resolved into ``paths=`` from
        the whole ``pretrained`` tree at each call.
      shapes: ``{path: shape}`` of the model's (float) leaves: resolve the
        subspace transform's scope into ``paths=`` now
        (:func:`with_scope_paths`). Needed when something else calls the
        merge on parts of the tree, as :func:`pact_jax.io.streaming.merge_checkpoints`
        does (the CLI passes the pre-trained checkpoint's metadata).

    Returns:
      ``merge(pretrained, finetuned, *, key=None, alpha=...)`` from :func:`chain`.
    """
    transform, t_kw = transform_settings(
        method, use_pact=use_pact, pact_preset=pact_preset, pact_kwargs=pact_kwargs,
        use_sift=use_sift, sift_kwargs=sift_kwargs, svd=svd,
    )  # fmt: skip
    method_kwargs = _with_svd(method, method_kwargs, svd)
    alpha = default_alpha(method, transform, pact_preset) if alpha is None else alpha
    scoped = is_scoped(transform, t_kw)
    if scoped and shapes is not None:
        t_kw = with_scope_paths(t_kw, shapes, rules)

    def build(transform_kw: Mapping[str, Any]) -> Callable[..., Any]:
        steps: list[Callable[..., Any]] = []
        if transform is not None:
            steps.append(_bind(getattr(pact_jax, transform), transform_kw, transform))
        mkw = dict(method_kwargs)
        if method in DARE_METHODS:
            merger = merges.MERGERS[DARE_METHODS[method]]
            dare_kw = {k: mkw[k] for k in mkw if k in _keywords(merges.dare)}
            # A keyword both take (convention) reaches both; one only DARE takes moves to DARE.
            mkw = {k: v for k, v in mkw.items() if k not in dare_kw or k in _keywords(merger)}
            steps.append(_bind(merges.dare, dare_kw, "dare"))
            steps.append(_bind(merger, mkw, DARE_METHODS[method]))
        else:
            steps.append(_bind(merges.MERGERS[method], mkw, method))
        return chain(*steps, alpha=alpha, rules=rules, budget_bytes=budget_bytes)

    merge = build(t_kw)  # checks every keyword now, whatever happens at call time
    if not (scoped and budget_bytes is not None and "paths" not in t_kw):
        return merge
    return _resolving_scope_at_call(build, t_kw, rules, alpha)


def _resolving_scope_at_call(build, t_kw, rules, default_alpha_value) -> Callable[..., Any]:
    """A merge that resolves the transform's scope over the whole ``pretrained`` it is called with,
    then runs the grouped chain (whose steps see one group of leaves at a time)."""

    def resolved(pretrained):
        shapes = {p: tuple(np.shape(x)) for p, x in leaves_with_paths(pretrained)}
        return build(with_scope_paths(t_kw, shapes, rules))

    def delta(pretrained, finetuned, *, key=None):
        return resolved(pretrained).delta(pretrained, finetuned, key=key)

    def merge(pretrained, finetuned, *, key=None, alpha=default_alpha_value):
        return resolved(pretrained)(pretrained, finetuned, key=key, alpha=alpha)

    merge.delta = delta  # type: ignore[attr-defined]
    return merge


def _with_svd(method: str, method_kwargs: Mapping[str, Any] | None, svd: SvdMethod | None) -> dict[str, Any]:
    """``method_kwargs`` with ``svd`` added when the merger takes one and none was given."""
    kw = dict(method_kwargs or {})
    if svd is not None and method in merges.MERGERS and "svd" in _keywords(merges.MERGERS[method]):
        kw.setdefault("svd", svd)
    return kw


def needs_key(
    method: str,
    *,
    use_pact: bool = False,
    pact_preset: str | None = None,
    pact_kwargs: Mapping[str, Any] | None = None,
    use_sift: bool = False,
    sift_kwargs: Mapping[str, Any] | None = None,
    method_kwargs: Mapping[str, Any] | None = None,
    svd: SvdMethod | None = None,
    **_unused: Any,
) -> bool:
    """Whether the recipe of :func:`make_merge` (same arguments; ``alpha``, ``rules``,
    ``budget_bytes``, ``shapes`` are accepted and ignored) draws random numbers: DARE, or a
    randomized SVD in PACT, SIFT or the merger."""
    unknown = set(_unused) - {"alpha", "rules", "budget_bytes", "shapes"}
    if unknown:
        raise TypeError(f"needs_key got unexpected keywords {sorted(unknown)}.")
    transform, t_kw = transform_settings(
        method, use_pact=use_pact, pact_preset=pact_preset, pact_kwargs=pact_kwargs,
        use_sift=use_sift, sift_kwargs=sift_kwargs, svd=svd,
    )  # fmt: skip
    randomized = (transform is not None and t_kw.get("svd") == "randomized") or (
        _with_svd(method, method_kwargs, svd).get("svd") == "randomized"
    )
    return method in DARE_METHODS or randomized
