"""Named merge recipes: a method name (+ PACT or not) -> a :func:`pact_jax.chain`.

The command line, the benchmarks and the notebooks build their merges here,
so "ties with PACT" means the same chain everywhere:

    merge = pact_jax.recipes.make_merge("iso_cts", use_pact=True, alpha=1.0)

PACT's perspective follows the method (DESIGN §1a/§1b): the subspace
perspective for the mergers that act on whole task vectors (tsv, iso_c,
iso_cts, and task_arithmetic / average, whose sum the subspace view reads as a
matrix), the scalar-weight perspective for the entry-wise ones (ties,
dare_ties); ``pact_kwargs={"perspective": ...}`` overrides it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pact_jax import merges
from pact_jax.chain import chain
from pact_jax.linalg import SvdMethod
from pact_jax.pact import pact
from pact_jax.tree import DEFAULT_RULES, LeafRules

METHODS: tuple[str, ...] = ("average", "task_arithmetic", "ties", "dare_ties", "tsv", "iso_c", "iso_cts")
SCALAR_METHODS = frozenset({"ties", "dare_ties"})

# Used when no alpha is given. Task arithmetic sums T task vectors, so it is
# scaled down (0.3 is the usual choice for 8 ViT tasks); the others are
# already on the scale of one task vector.
DEFAULT_ALPHA: Mapping[str, float] = {
    "average": 1.0,
    "task_arithmetic": 0.3,
    "ties": 1.0,
    "dare_ties": 1.0,
    "tsv": 1.0,
    "iso_c": 1.0,
    "iso_cts": 1.0,
}


def default_perspective(method: str) -> str:
    return "scalar" if method in SCALAR_METHODS else "subspace"


def _keywords(fn: Callable[..., Any]) -> set[str]:
    skip = {"key", "pretrained", "stacked", "rules"}
    return {n for n in inspect.signature(fn).parameters if n not in skip}


def _bind(fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> Callable[..., Any]:
    unknown = set(kwargs) - _keywords(fn)
    if unknown:
        raise ValueError(f"{what} got unknown hyperparameters {sorted(unknown)}; it takes {sorted(_keywords(fn))}.")
    return functools.partial(fn, **kwargs)


def make_merge(
    method: str,
    *,
    use_pact: bool = False,
    pact_kwargs: Mapping[str, Any] | None = None,
    method_kwargs: Mapping[str, Any] | None = None,
    alpha: float | None = None,
    rules: LeafRules = DEFAULT_RULES,
    svd: SvdMethod | None = None,
    budget_bytes: int | None = None,
) -> Callable[..., Any]:
    """The chain for ``method`` (one of :data:`METHODS`), optionally after PACT.

    Args:
      method: merger name; ``dare_ties`` is ``dare`` (drop rate ``p``) then
        ``ties`` (``density``): pass both through ``method_kwargs``.
      use_pact: run :func:`pact_jax.pact` on the task vectors first.
      pact_kwargs: keywords of :func:`pact_jax.pact`.
      method_kwargs: the merger's hyperparameters (``density``, ``p``,
        ``common_fraction``).
      alpha: scaling of the merged delta; default :data:`DEFAULT_ALPHA`.
      rules: leaf rules for every step.
      svd: ``'exact'`` or ``'randomized'`` for every SVD of which only top
        factors are used: PACT's (with ``use_pact``) and the merger's, if it
        takes ``svd`` (TSV-M). An ``svd`` in ``pact_kwargs`` or
        ``method_kwargs`` wins. ``'randomized'`` needs a key.
      budget_bytes: run the chain group of leaves by group of leaves within
        this working-set budget (see :func:`pact_jax.chain`); ``None``: the
        whole tree at once.

    Returns:
      ``merge(pretrained, finetuned, *, key=None, alpha=...)`` from :func:`chain`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")
    method_kwargs = _with_svd(method, method_kwargs, svd)
    steps: list[Callable[..., Any]] = []
    if use_pact:
        kw = {"perspective": default_perspective(method), **({} if svd is None else {"svd": svd})}
        kw.update(pact_kwargs or {})
        steps.append(_bind(pact, kw, "pact"))
    elif pact_kwargs:
        raise ValueError(f"PACT hyperparameters {sorted(pact_kwargs)} given, but PACT is off.")
    if method == "dare_ties":
        dare_kw = {k: method_kwargs.pop(k) for k in list(method_kwargs) if k in _keywords(merges.dare)}
        steps.append(_bind(merges.dare, dare_kw, "dare"))
        steps.append(_bind(merges.ties, method_kwargs, "ties"))
    else:
        steps.append(_bind(merges.MERGERS[method], method_kwargs, method))
    alpha = DEFAULT_ALPHA[method] if alpha is None else alpha
    return chain(*steps, alpha=alpha, rules=rules, budget_bytes=budget_bytes)


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
    pact_kwargs: Mapping[str, Any] | None = None,
    method_kwargs: Mapping[str, Any] | None = None,
    svd: SvdMethod | None = None,
) -> bool:
    """Whether the recipe of :func:`make_merge` (same arguments) draws random numbers:
    DARE, or a randomized SVD in PACT or the merger."""
    pact_svd = {**({} if svd is None else {"svd": svd}), **(pact_kwargs or {})}.get("svd")
    randomized = (use_pact and pact_svd == "randomized") or (
        _with_svd(method, method_kwargs, svd).get("svd") == "randomized"
    )
    return method == "dare_ties" or randomized
