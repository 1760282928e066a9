"""Why does PACT with the paper's defaults lower accuracy here? (issue 18, item 8)

    python -m benchmarks.pact_diagnosis --suite vit      # ViT zoo, seed 0, T = 8 (cached zoo; ~15-25 min here)
    python -m benchmarks.pact_diagnosis --suite minilm   # all-MiniLM-L6-v2 zoo, seed 0, T = 8
    python -m benchmarks.pact_diagnosis --quick          # the real zoo, a handful of variants, TSV-M only
    python -m benchmarks.pact_diagnosis --tiny           # a tiny stand-in zoo (the CI test; built in a minute)

On one zoo seed and the first ``T`` tasks of one quality suite
(:mod:`benchmarks.quality`'s ViT zoo or :mod:`benchmarks.minilm_suite`'s
MiniLM zoo, their evaluators, their alpha protocol), each *variant* below
filters the task vectors once (keyword variants of :func:`pact_jax.pact`, or
:func:`pact_jax.sift`), then each backbone merger (task arithmetic, TSV-M;
Iso-C on the first group) merges them, and alpha is chosen on validation
exactly as the suites do (:func:`benchmarks.quality.alpha_plan`,
:func:`benchmarks.quality.choose_alpha`: the authors' grid for the method
and transform, early stop after 3 points, best validation normalised
accuracy, the grid doubled when the best is its top). Every PACT variant
uses the authors' PACT range (SIFT its own, the light preset the suite's
whole grid). Because the paper default's best alpha sat at the *low* end of
that range, a variant whose best is the range's first point also walks 9
points between 0 and it (column "below the range"); the suite protocol's
choice is reported as well.

Variants (groups):

1. ``baseline``: no PACT; PACT paper default (``K = 0.8 min(m, n)``, ``k = 10``,
   every reliance direction, strength 1); SIFT (removes the component in
   ``V0K`` only: the "protect only the pre-trained core" version); no PACT
   on the whole grid the suites search for the light preset (its reference:
   the same alpha protocol); PACT light;
2. ``leaves``: the paper default restricted to attention matrices, MLP
   matrices, the first half of the matrices in model order
   (``layer_ratio=0.5``), the other half (explicit ``paths=``), exactly-2-D
   matrices (``only_2d``; on the ViT zoo that is the MLP matrices, on MiniLM
   every matrix: such duplicates are computed once and say so);
3. ``K`` / ``k``: ``pretrained_rank`` in {0.2, 0.4, 0.6} (0.8 is the paper)
   and ``task_rank`` in {2, 5, 20} (10 is the paper);
4. ``alpha``: the paper default on a wide grid, the whole of it walked:
   9 points below the authors' range, every other point of the range, and 15
   points on to 3x its top;
5. ``protected``: fewer protected directions: ``align_threshold`` in {0.5,
   0.9, 0.99}; ``strength`` in {0.25, 0.5}; and ``exclude_self=False`` (each
   task also protects its own reliance space: more, not fewer, directions).

Energy removed is :func:`benchmarks.quality.energy_removed`'s measure:
``||tau_t - tau~_t||^2 / ||tau_t||^2``, mean over tasks, over every leaf.
Per leaf and per leaf group (attention q/k/v/out, MLP in/out, patch
embedding, non-matrix leaves: biases, norms, cls / position embeddings)
the JSON gives each group's share of ``||tau||^2`` and the share of it
removed. For every matrix the report compares ``K + (T - 1) k`` with its
input dimension ``d_in``: at or above it the protect space is (nearly) all
of ``R^{d_in}`` and PACT removes (nearly) the whole task vector there.
:func:`subspace_overlap` says where each task vector's energy lies in the
input space with the paper's ``K`` and ``k``: in its own top-``k``
directions, in ``V0K``, in the other tasks' top-``k`` directions, in both
(about PACT's protect space), against what a random subspace of the same
dimension would hold.

Noise: one seed. A test mean over ``T x N`` examples has a binomial
standard error ``sqrt(p (1 - p) / (T N))``; a difference to "no PACT" is
called beyond noise only when it exceeds twice the (unpaired, so
conservative) standard error of the difference, and even then it is one
seed, one alpha selection.

Writes ``<out>/<suite>_seed<s>_T<t>.md`` and ``.json`` (default ``--out
benchmarks/results/pact_diagnosis/``); the JSON after every variant too, so
an interrupted run resumes with ``--reuse <that JSON>`` (also how a grid is
extended or pruned without recomputing what is there).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import pact_jax
from pact_jax import merges, recipes
from pact_jax import scope as scope_mod
from pact_jax.tree import leaves_with_paths

from benchmarks import quality
from benchmarks import zoo as zoo_mod

PyTree = Any
pact_mod = importlib.import_module("pact_jax.pact")  # the module (pact_jax.pact is the function)

ATTENTION = r"(attn|attention|query|key|value)"
MLP = r"mlp"
LAST_HALF = "__last_half__"  # resolved per model: the matrices layer_ratio=0.5 leaves out
PAPER_K, PAPER_TASK_RANK = 0.8, 10
LOW_POINTS = 10  # the walk below an authors' range: LOW_POINTS - 1 points in (0, its first point)
WIDE_FACTOR = 3.0  # the wide grid runs to 3x the authors' top
WIDE_POINTS = 15  # points between the authors' top and WIDE_FACTOR x it

GROUPS = ("attn q", "attn k", "attn v", "attn out", "MLP in", "MLP out", "patch embed", "other matrix", "non-matrix")
GROUP_LABELS = {
    "non-matrix": "non-matrix (bias, norm, cls/pos; PACT leaves them)",
}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    group: str  # baseline | leaves | K | k | alpha | protected
    label: str
    transform: str | None = "pact"  # None, "pact" or "sift"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    plan: str = "paper"  # the quality.alpha_plan setting whose grid it uses
    wide: bool = False  # walk the wide grid (and not the protocol's)
    reference: str = "none"  # the variant it is compared with (the same alpha protocol)


VARIANTS: tuple[Variant, ...] = (
    Variant("none", "baseline", "no PACT", None, {}, "none"),
    Variant("paper", "baseline", "PACT paper default (K=0.8, k=10)", "pact", {}),
    Variant("sift", "baseline", "SIFT (remove V0K only)", "sift", {}, "sift"),
    Variant("none_full", "baseline", "no PACT, whole grid (light's alpha plan)", None, {}, "light"),
    Variant("light", "baseline", "PACT light preset", "pact", pact_mod.pact_preset("light"), "light",
            reference="none_full"),
    Variant("attn", "leaves", "paper, attention matrices only", "pact", {"include": ATTENTION}),
    Variant("mlp", "leaves", "paper, MLP matrices only", "pact", {"include": MLP}),
    Variant("first_half", "leaves", "paper, first half (layer_ratio=0.5)", "pact", {"layer_ratio": 0.5}),
    Variant("last_half", "leaves", "paper, last half (paths=)", "pact", {"paths": LAST_HALF}),
    Variant("only_2d", "leaves", "paper, only_2d", "pact", {"only_2d": True}),
    Variant("K0.2", "K", "K=0.2, k=10", "pact", {"pretrained_rank": 0.2}),
    Variant("K0.4", "K", "K=0.4, k=10", "pact", {"pretrained_rank": 0.4}),
    Variant("K0.6", "K", "K=0.6, k=10", "pact", {"pretrained_rank": 0.6}),
    Variant("k2", "k", "K=0.8, k=2", "pact", {"task_rank": 2}),
    Variant("k5", "k", "K=0.8, k=5", "pact", {"task_rank": 5}),
    Variant("k20", "k", "K=0.8, k=20", "pact", {"task_rank": 20}),
    Variant("paper_wide", "alpha", "paper default, wide alpha grid (to 3x the top)", "pact", {}, wide=True),
    Variant("cos0.5", "protected", "paper, align_threshold=0.5", "pact", {"align_threshold": 0.5}),
    Variant("cos0.9", "protected", "paper, align_threshold=0.9", "pact", {"align_threshold": 0.9}),
    Variant("cos0.99", "protected", "paper, align_threshold=0.99", "pact", {"align_threshold": 0.99}),
    Variant("s0.25", "protected", "paper, strength=0.25", "pact", {"strength": 0.25}),
    Variant("s0.5", "protected", "paper, strength=0.5", "pact", {"strength": 0.5}),
    Variant("all_tasks", "protected", "paper, exclude_self=False (own space too)", "pact", {"exclude_self": False}),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
TINY_VARIANTS = ("none", "paper", "sift", "none_full", "light", "attn", "last_half", "K0.2", "k2", "paper_wide", "cos0.9",
                 "s0.5", "all_tasks")
QUICK_VARIANTS = ("none", "paper", "sift", "none_full", "light", "K0.2", "s0.5", "paper_wide")


@dataclasses.dataclass(frozen=True)
class DiagnosisConfig:
    suite: str = "vit"  # vit | minilm
    text_tasks: str = "real"  # minilm: 'real' (the default suite) or 'generated' (the earlier 8 generated tasks)
    seed: int = 0
    tasks: int = 8
    variants: tuple[str, ...] = VARIANT_NAMES
    methods: tuple[str, ...] = ("task_arithmetic", "tsv")
    baseline_methods: tuple[str, ...] = ("task_arithmetic", "tsv", "iso_c")  # methods of the 'baseline' group
    alpha: quality.AlphaProtocol = quality.AlphaProtocol()
    tiny: bool = False


# --------------------------------------------------------------------------
# Loading a suite's evaluator


def load_evaluator(cfg: DiagnosisConfig, cache: Path | None, log: Callable[[str], None]):
    """``(evaluator, description)`` of the suite's zoo ``cfg.seed`` on its first ``cfg.tasks`` tasks."""
    if cfg.suite == "vit":
        zcfg = zoo_mod.QUICK if cfg.tiny else zoo_mod.ZooConfig()
        _check_tasks(cfg.tasks, zcfg.num_tasks)
        data = zoo_mod.make_data(zcfg)
        zoo, cached = zoo_mod.get_zoo(zcfg, cfg.seed, cache, data=data, log=log)
        ev = quality.Evaluator(zcfg, zoo, data, cfg.tasks, cfg.seed)
        desc = {"suite": "ViT zoo (benchmarks.zoo)", "zoo_digest": zcfg.digest(), "cached": cached,
                "vit": dataclasses.asdict(zcfg.vit), "tasks": [t.name for t in zcfg.task_list[: cfg.tasks]]}
        return ev, desc
    if cfg.suite == "minilm":
        from benchmarks import minilm_suite as ms

        scfg = ms.TINY if cfg.tiny else ms.SuiteConfig(zoo=ms.GENERATED_ZOO) if cfg.text_tasks == "generated" \
            else ms.SuiteConfig()
        zc = scfg.zoo
        _check_tasks(cfg.tasks, zc.num_tasks)
        backbone = ms.load_backbone(scfg)
        data = ms.make_data(zc, backbone, ("val", "test"))

        def training_data():  # only when the seed is not cached (as minilm_suite.run)
            full = {**data, **ms.make_data(zc, backbone, ("train",))}
            tr = full["train"]
            names = ms._trained_names(backbone.cfg, zc)
            layers = {k: backbone.params["params"][k] for k in names}
            feats = np.stack([ms.pooled(backbone.cfg, names, layers, tr.x[t], tr.mask[t]) for t in range(len(tr.x))])
            return full, feats

        zoo, cached = ms.get_zoo(zc, backbone, cfg.seed, cache, training_data, log)
        ev = ms.evaluator(zc, backbone, zoo, data, cfg.tasks, cfg.seed)
        desc = {"suite": "MiniLM zoo (benchmarks.minilm_suite)", "zoo_digest": zc.digest(backbone.name),
                "cached": cached, "backbone": backbone.name, "trained_layers": zc.trained_layers,
                "tasks": [t.name for t in zc.task_list[: cfg.tasks]]}
        return ev, desc
    raise ValueError(f"unknown suite {cfg.suite!r}; choose vit or minilm.")


def _check_tasks(t: int, available: int) -> None:
    if not 1 <= t <= available:
        raise ValueError(f"--tasks {t}: the zoo has {available} tasks.")


# --------------------------------------------------------------------------
# Leaves, scope and energy


def leaf_group(path: str, shape: Sequence[int], rules: pact_jax.LeafRules) -> str | None:
    """The summary group of a leaf (``None``: frozen, never trained)."""
    kind = rules.kind(path, tuple(shape))
    if kind == "freeze":
        return None
    if kind != "matrix":
        return "non-matrix"
    p = path.lower()
    for pattern, group in ((r"query", "attn q"), (r"(^|/)key(/|$)", "attn k"), (r"value", "attn v"),
                           (r"attn/out|attn_out|attention/output", "attn out"), (r"mlp_in", "MLP in"),
                           (r"mlp_out", "MLP out"), (r"embed|conv", "patch embed")):
        if re.search(pattern, p):
            return group
    return "other matrix"


def model_shapes(pre: PyTree) -> dict[str, tuple[int, ...]]:
    return {p: tuple(np.shape(x)) for p, x in leaves_with_paths(pre)}


def resolve_kwargs(variant: Variant, shapes: Mapping[str, tuple[int, ...]], rules: pact_jax.LeafRules) -> dict[str, Any]:
    """The variant's transform keywords with its scope resolved into explicit ``paths=`` (model order)."""
    kw = dict(variant.kwargs)
    if kw.get("paths") == LAST_HALF:
        every = scope_mod.select_matrices(shapes, rules)
        first = set(scope_mod.select_matrices(shapes, rules, layer_ratio=0.5))
        kw["paths"] = tuple(p for p in every if p not in first)
    return recipes.with_scope_paths(kw, shapes, rules)


def _identity(kw: Mapping[str, Any]) -> str:
    return repr(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in kw.items()))


def leaf_energy(stacked: PyTree, filtered: PyTree, rules: pact_jax.LeafRules | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per leaf ``{'total': ||tau_t||^2 (T,), 'removed': ||tau_t - tau~_t||^2 (T,), 'kept': ||tau~_t||^2}``;
    frozen leaves of ``rules`` (never trained: zero task vectors, e.g. MiniLM's embeddings) are skipped."""
    out = {}
    for (p, a), (_, b) in zip(leaves_with_paths(stacked), leaves_with_paths(filtered)):
        if rules is not None and rules.kind(p, a.shape[1:]) == "freeze":
            continue
        a = np.asarray(a, np.float64).reshape(a.shape[0], -1)
        b = np.asarray(b, np.float64).reshape(b.shape[0], -1)
        out[p] = {"total": np.square(a).sum(1), "removed": np.square(a - b).sum(1), "kept": np.square(b).sum(1)}
    return out


def energy_summary(energy: Mapping[str, Mapping[str, np.ndarray]], shapes, rules) -> dict[str, Any]:
    """Headline (the suites' measure: mean over tasks of removed / total) and per group / per leaf shares."""
    total_t = sum(e["total"] for e in energy.values())
    removed_t = sum(e["removed"] for e in energy.values())
    kept_t = sum(e["kept"] for e in energy.values())
    all_total = float(total_t.sum())
    groups: dict[str, dict[str, float]] = {}
    leaves: dict[str, dict[str, Any]] = {}
    for p, e in energy.items():
        g = leaf_group(p, shapes[p], rules)
        if g is None or e["total"].sum() == 0:
            continue
        tot, rem = float(e["total"].sum()), float(e["removed"].sum())
        acc = groups.setdefault(g, {"total": 0.0, "removed": 0.0})
        acc["total"] += tot
        acc["removed"] += rem
        leaves[p] = {"group": g, "share": tot / all_total, "removed": rem / tot}
    for acc in groups.values():
        acc["share"] = acc["total"] / all_total  # of ||tau||^2 (all tasks)
        acc["removed_of_group"] = acc["removed"] / acc["total"] if acc["total"] else 0.0
        acc["removed_of_all"] = acc["removed"] / all_total
    return {
        "removed": float(np.mean(removed_t / total_t)),
        "kept": float(np.mean(kept_t / total_t)),
        "groups": {g: groups[g] for g in GROUPS if g in groups},
        "leaves": leaves,
    }


def saturation(kw: Mapping[str, Any], pre: PyTree, stacked: PyTree, rules, t: int, energy) -> dict[str, Any] | None:
    """Matrices where ``K + (T - 1) k >= d_in`` (the protect space is all of the input space), for
    fixed ranks; ``None`` for threshold / energy-rank variants."""
    if kw.get("align_threshold") is not None or kw.get("pretrained_energy") is not None:
        return None
    settings = {**{"pretrained_rank": PAPER_K, "task_rank": PAPER_TASK_RANK, "exclude_self": True}, **kw}
    shapes = model_shapes(pre)
    chosen = scope_mod.resolve_paths(shapes, rules, paths=kw.get("paths"), only_2d=kw.get("only_2d", False),
                                     include=kw.get("include"), exclude=kw.get("exclude", scope_mod.DEFAULT_EXCLUDE),
                                     layer_ratio=kw.get("layer_ratio", 1.0))
    rows, sat_share, all_total = [], 0.0, sum(float(e["total"].sum()) for e in energy.values())
    for p in sorted(chosen, key=scope_mod.natural_key):
        if rules.kind(p, shapes[p]) != "matrix":
            continue
        m, n = rules.matrix_shape(p, shapes[p])
        big_k = pact_mod.resolve_rank(settings["pretrained_rank"], m, n, "pretrained_rank", p)
        k = pact_mod.resolve_rank(settings["task_rank"], m, n, "task_rank", p, cap=True)
        d_in = m if rules.input_side(p) == "left" else n
        others = t - 1 if settings["exclude_self"] else t
        need = big_k + others * k
        sat = need >= d_in
        share = float(energy[p]["total"].sum()) / all_total
        if sat:
            sat_share += share
        rows.append({"path": p, "view": [m, n], "d_in": d_in, "K": big_k, "k": k, "K+(T-1)k": need,
                     "saturated": bool(sat), "share": share})
    return {"matrices": len(rows), "saturated": sum(r["saturated"] for r in rows), "saturated_share": sat_share,
            "rows": rows}


def protect_dims(pre, stacked, rules, kw) -> dict[str, float]:
    """Mean over tasks of ``dim P_t`` per filtered matrix (:func:`pact_jax.lbw_statistics`)."""
    stats = pact_jax.lbw_statistics(pre, stacked, rules=rules, **kw)
    out = {}
    for p, s in stats.items():
        side = next((s[k] for k in ("left", "right") if k in s), None)
        if side is not None:
            out[p] = float(np.mean(side["protect_dims"]))
    return out


def _orth_np(x: np.ndarray, rtol: float = 1e-6, atol: float = 1e-6) -> np.ndarray:
    """Orthonormal basis of ``range(x)`` for ``x`` with columns of norm <= 1: left singular vectors
    with singular values above ``max(atol, rtol * largest)``."""
    if x.shape[1] == 0:
        return x
    u, sv, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, sv > max(atol, rtol * (sv[0] if sv.size else 0.0))]


def _top_left(x: np.ndarray, r: int) -> np.ndarray:
    """Top ``r`` left singular vectors of ``x (d, n)``, from the eigenvectors of the smaller Gram matrix."""
    d, n = x.shape
    if d <= n:
        w, v = np.linalg.eigh(x @ x.T)
        return v[:, ::-1][:, :r]
    w, v = np.linalg.eigh(x.T @ x)
    v = v[:, ::-1][:, :r]
    u = x @ v
    return u / np.maximum(np.linalg.norm(u, axis=0, keepdims=True), 1e-300)


def subspace_overlap(pre: PyTree, stacked: PyTree, rules: pact_jax.LeafRules, energy,
                     pretrained_rank: float = PAPER_K, task_rank: int = PAPER_TASK_RANK) -> dict[str, Any]:
    """Where each task vector's energy lies in its matrix's input space, with the paper's ``K`` and ``k``.

    Per matrix and task ``j``, the share of ``||tau_j||^2`` in: its own top ``k`` input directions
    (``V_j``); the pre-trained core ``V0K`` (what SIFT removes); the other tasks' top ``k``
    directions ``span{V_i : i != j}``; ``V0K + span{V_i : i != j}`` (about PACT's protect space,
    DESIGN §1a); and, for reference, the share a random subspace of that dimension would hold
    (``dim / d_in``). Summed over tasks and leaves per leaf group (energy-weighted).
    """
    shapes = model_shapes(pre)
    pre_leaves = dict(leaves_with_paths(pre))
    names = ("own_topk", "core", "others_topk", "core+others", "random_core+others")
    per_leaf: dict[str, dict[str, float]] = {}
    groups: dict[str, dict[str, float]] = {}
    for p, tau in leaves_with_paths(stacked):
        if rules.kind(p, shapes[p]) != "matrix" or p not in energy or energy[p]["total"].sum() == 0:
            continue
        m, n = rules.matrix_shape(p, shapes[p])
        w0 = np.asarray(pre_leaves[p], np.float64).reshape(m, n)
        taus = np.asarray(tau, np.float64).reshape(-1, m, n)
        if rules.input_side(p) == "right":
            w0, taus = w0.T, np.transpose(taus, (0, 2, 1))
        d = w0.shape[0]
        big_k = pact_mod.resolve_rank(pretrained_rank, m, n, "pretrained_rank", p)
        k = pact_mod.resolve_rank(task_rank, m, n, "task_rank", p, cap=True)
        core = _top_left(w0, big_k)
        tops = [_top_left(x, k) for x in taus]
        acc = dict.fromkeys(names, 0.0)
        total = 0.0
        for j, x in enumerate(taus):
            e = float(np.square(x).sum())
            if e == 0:
                continue
            stack = np.concatenate([tops[i] for i in range(len(taus)) if i != j], axis=1)
            others = _orth_np(stack)
            # V0K + others = V0K (+) (the part of the others outside V0K): no (d, K + (T-1)k) SVD needed.
            outside = _orth_np(stack - core @ (core.T @ stack))
            in_core = float(np.square(core.T @ x).sum())
            acc["own_topk"] += float(np.square(tops[j].T @ x).sum())
            acc["core"] += in_core
            acc["others_topk"] += float(np.square(others.T @ x).sum())
            acc["core+others"] += in_core + float(np.square(outside.T @ (x - core @ (core.T @ x))).sum())
            acc["random_core+others"] += e * (core.shape[1] + outside.shape[1]) / d
            total += e
        per_leaf[p] = {kk: v / total for kk, v in acc.items()} | {"d_in": d, "K": big_k, "k": k}
        g = groups.setdefault(leaf_group(p, shapes[p], rules), dict.fromkeys((*names, "total"), 0.0))
        for kk, v in acc.items():
            g[kk] += v
        g["total"] += total
    for g in groups.values():
        tot = g.pop("total")
        for kk in names:
            g[kk] /= tot
    return {"K": pretrained_rank, "k": task_rank, "groups": {g: groups[g] for g in GROUPS if g in groups},
            "leaves": per_leaf}


# --------------------------------------------------------------------------
# Alpha: the suite's protocol, memoised


class MemoEvaluator:
    """Wraps a :class:`benchmarks.quality.TaskEvaluator` for one merged delta: every validation alpha
    is evaluated once (the protocol walk, the walk below the range and the wide grid share points)."""

    def __init__(self, ev: quality.TaskEvaluator, delta: PyTree, chunk: int):
        self.ev, self.delta, self.chunk = ev, delta, chunk
        self.val: dict[float, np.ndarray] = {}
        self.test: dict[float, np.ndarray] = {}
        self.t = ev.t

    @staticmethod
    def _key(a: float) -> float:
        return round(float(a), 10)

    def sweep_tasks(self, delta: PyTree, alphas: Sequence[float]) -> np.ndarray:
        assert delta is self.delta
        missing = list(dict.fromkeys(self._key(a) for a in alphas if self._key(a) not in self.val))
        for i in range(0, len(missing), self.chunk):
            part = missing[i: i + self.chunk]
            padded = part + [part[-1]] * (self.chunk - len(part))  # one compiled shape
            acc = self.ev.sweep_tasks(self.delta, padded)
            for a, row in zip(part, acc):
                self.val[a] = np.asarray(row)
        return np.stack([self.val[self._key(a)] for a in alphas])

    def val_scores(self, acc: np.ndarray) -> dict[str, float]:
        return self.ev.val_scores(acc)

    def test_acc(self, alpha: float) -> np.ndarray:
        k = self._key(alpha)
        if k not in self.test:
            self.test[k] = np.asarray(self.ev.test_acc(self.delta, k))
        return self.test[k]

    def scores(self, alphas: Sequence[float]) -> list[dict[str, float]]:
        return [self.val_scores(a) for a in self.sweep_tasks(self.delta, alphas)]


def low_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """The points walked below a range whose best is its first point: ``LOW_POINTS - 1`` evenly
    spaced in ``(0, grid[0])``."""
    return tuple(float(a) for a in np.linspace(0.0, grid[0], LOW_POINTS + 1)[1:-1])


def wide_grid(plan: quality.AlphaPlan) -> tuple[float, ...]:
    """Below the range, every other point of it, and ``WIDE_POINTS`` on to ``WIDE_FACTOR`` x its top."""
    grid = plan.grid
    hi = grid[-1]
    above = np.linspace(hi, WIDE_FACTOR * hi, WIDE_POINTS + 1)[1:]
    below = low_grid(grid) if plan.describe()["lo"] > 0 else ()
    return tuple(sorted({*below, *grid[1::2], hi, *(float(a) for a in above)}))


def _pick(memo: MemoEvaluator, alphas: Sequence[float]) -> dict[str, Any]:
    """Best validation normalised accuracy over ``alphas`` (the first maximum), with test there."""
    alphas = sorted({memo._key(a) for a in alphas})
    sc = memo.scores(alphas)
    norm = [s["normalized"] for s in sc]
    b = int(np.argmax(norm))
    test = memo.test_acc(alphas[b])
    return {"alpha": alphas[b], "val_mean": sc[b]["mean"], "val_normalized": norm[b],
            "test_mean": float(test.mean()), "test_per_task": test.tolist(),
            "at_end": "high" if b == len(alphas) - 1 else "low" if b == 0 else None,
            "curve": {"alpha": alphas, "val_mean": [s["mean"] for s in sc], "val_normalized": norm}}


def evaluate_delta(ev: quality.TaskEvaluator, delta: PyTree, method: str, variant: Variant,
                   protocol: quality.AlphaProtocol) -> dict[str, Any]:
    """The suite's alpha choice (and, where it applies, the walk below the range; the wide grid)."""
    memo = MemoEvaluator(ev, delta, protocol.chunk)
    plan = quality.alpha_plan(method, variant.plan, ev.t, protocol.points, protocol.full_points)
    out: dict[str, Any] = {"grid": plan.describe()}
    if variant.wide:
        out["wide"] = _pick(memo, wide_grid(plan))
        out["wide"]["grid"] = {"lo": 0.0, "hi": out["wide"]["curve"]["alpha"][-1],
                               "points": len(out["wide"]["curve"]["alpha"])}
        chosen = out["wide"]
    else:
        res = quality.choose_alpha(memo, delta, plan, protocol.chunk)
        test = memo.test_acc(res["alpha"])
        res.update(test_mean=float(test.mean()), test_per_task=test.tolist())
        out["protocol"] = res
        chosen = res
        if res["at_end"] == "low" and out["grid"]["lo"] > 0:
            below = _pick(memo, [*low_grid(plan.grid), *res["curve"]["alpha"]])
            out["below"] = below
            chosen = below
    out["chosen"] = {k: chosen[k] for k in ("alpha", "val_mean", "val_normalized", "test_mean")}
    out["val_points"] = len(memo.val)
    return out


# --------------------------------------------------------------------------
# Driver


def merge_kwargs(method: str) -> dict[str, Any]:
    return dict(quality.METHOD_KWARGS.get(method, {}))


def run(cfg: DiagnosisConfig, cache: Path | None = None, log: Callable[[str], None] = print,
        reuse: Mapping[str, Any] | None = None,
        on_variant: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every variant of ``cfg``; ``reuse``: an earlier result of the same suite, seed, T and alpha
    protocol whose variant records (with every method asked for) are taken as they are;
    ``on_variant(result so far)`` after each variant (the CLI writes it: an interrupted run can be
    resumed with ``--reuse``)."""
    t_start, c_start = time.perf_counter(), time.process_time()
    if reuse is not None:
        check_reuse(cfg, reuse)
    ev, desc = load_evaluator(cfg, cache, log)
    log(f"{desc['suite']} seed {cfg.seed} T={cfg.tasks}: fine-tuned {100 * ev.finetuned.mean():.2f}, "
        f"probe on the pre-trained encoder {100 * ev.pretrained.mean():.2f} "
        f"({time.perf_counter() - t_start:.0f} s wall)")
    pre, rules, t = ev.pre, ev.rules, ev.t
    shapes = model_shapes(pre)
    stacked = jax.block_until_ready(pact_jax.task_vectors(pre, ev.fts))
    n_val, n_test = int(np.shape(ev.val[1])[-1]), int(np.shape(ev.test[1])[-1])
    filtered_cache: dict[str, tuple[PyTree, dict, str]] = {}
    results: dict[str, Any] = {}
    variants = [v for v in VARIANTS if v.name in cfg.variants]
    t0 = time.perf_counter()
    overlap = subspace_overlap(pre, stacked, rules, leaf_energy(stacked, stacked, rules))
    log(f"  subspace overlap (K={PAPER_K}, k={PAPER_TASK_RANK}): {time.perf_counter() - t0:.0f} s")
    out = {
        "command": None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": quality.machine(),
        "config": {"suite": cfg.suite, "seed": cfg.seed, "tasks": cfg.tasks, "tiny": cfg.tiny,
                   "methods": list(cfg.methods), "baseline_methods": list(cfg.baseline_methods),
                   "variants": [v.name for v in variants],
                   "alpha_protocol": dataclasses.asdict(cfg.alpha), "low_points": LOW_POINTS - 1,
                   "wide_factor": WIDE_FACTOR, "wide_points": WIDE_POINTS,
                   "method_kwargs": {m: merge_kwargs(m) for m in cfg.baseline_methods}},
        "zoo": desc,
        "n_val": n_val, "n_test": n_test,
        "finetuned": {"test": ev.finetuned.tolist(), "mean": float(ev.finetuned.mean()),
                      "val": ev.finetuned_val.tolist()},
        "pretrained_probe": {"test": ev.pretrained.tolist(), "mean": float(ev.pretrained.mean())},
        "overlap": overlap,
        "variants": results,
        "timings": {},
    }

    def snapshot() -> None:
        if on_variant is not None:
            out["timings"] = {"wall_s": time.perf_counter() - t_start, "cpu_s": time.process_time() - c_start,
                              "partial": True}
            out["verdict"] = verdict(out)
            on_variant(out)

    for variant in variants:
        methods = cfg.baseline_methods if variant.group == "baseline" else cfg.methods
        old = (reuse or {}).get("variants", {}).get(variant.name)
        if old is not None and set(methods) <= set(old["methods"]) and old["label"] == variant.label:
            results[variant.name] = {**old, "methods": {m: old["methods"][m] for m in methods}, "reused": True}
            log(f"  {variant.name:<11} reused from the earlier result")
            snapshot()
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        kw = resolve_kwargs(variant, shapes, rules) if variant.transform else {}
        ident = f"{variant.transform}:{_identity(kw)}"
        same_as = None
        if ident in filtered_cache:
            filtered, energy, same_as = filtered_cache[ident]
        else:
            if variant.transform is None:
                filtered = stacked
            else:
                with _quiet():
                    filtered = jax.block_until_ready(getattr(pact_jax, variant.transform)(pre, stacked, rules=rules, **kw))
            energy = leaf_energy(stacked, filtered, rules)
            filtered_cache[ident] = (filtered, energy, variant.name)
        transform_s = time.perf_counter() - t0
        rec: dict[str, Any] = {
            "group": variant.group, "label": variant.label, "transform": variant.transform,
            "kwargs": {k: v for k, v in variant.kwargs.items()},
            "paths": list(kw["paths"]) if "paths" in kw else None,
            "same_transform_as": same_as,
            "energy": energy_summary(energy, shapes, rules),
            "saturation": saturation(kw, pre, stacked, rules, t, energy) if variant.transform == "pact" else None,
            "methods": {},
        }
        if variant.name == "paper":
            with _quiet():
                dims = protect_dims(pre, stacked, rules, kw)
            for row in rec["saturation"]["rows"]:
                row["protect_dims"] = dims.get(row["path"])
        twin = next((v for v in variants if v.name == same_as), None)
        for method in methods:
            if twin is not None and (twin.plan, twin.wide) == (variant.plan, variant.wide) \
                    and method in results.get(twin.name, {}).get("methods", {}):
                rec["methods"][method] = {**results[twin.name]["methods"][method], "same_evaluation_as": twin.name}
                log(f"  {variant.name:<11} {method:<16} the same filtered task vectors and alpha plan as {twin.name}")
                continue
            t1 = time.perf_counter()
            delta = jax.block_until_ready(merges.MERGERS[method](filtered, rules=rules, **merge_kwargs(method)))
            merge_s = time.perf_counter() - t1
            r = evaluate_delta(ev, delta, method, variant, cfg.alpha)
            r.update(merge_s=merge_s, seconds=time.perf_counter() - t1)
            rec["methods"][method] = r
            c = r["chosen"]
            log(f"  {variant.name:<11} {method:<16} removes {100 * rec['energy']['removed']:5.1f}%  "
                f"alpha {c['alpha']:.4g}  val {100 * c['val_mean']:5.2f}  test {100 * c['test_mean']:5.2f}"
                + (f"  (suite protocol: alpha {r['protocol']['alpha']:.4g}, test {100 * r['protocol']['test_mean']:.2f}"
                   f"{', at the ' + r['protocol']['at_end'] + ' end' if r['protocol']['at_end'] else ''})"
                   if "protocol" in r else "")
                + f"  [{r['seconds']:.0f} s, {r['val_points']} alphas]")
        rec["seconds"] = time.perf_counter() - t0
        rec["cpu_seconds"] = time.process_time() - c0
        rec["transform_seconds"] = transform_s
        results[variant.name] = rec
        snapshot()
    out["timings"] = {"wall_s": time.perf_counter() - t_start, "cpu_s": time.process_time() - c_start}
    if reuse is not None:
        reused = [k for k, v in results.items() if v.get("reused")]
        prev = reuse["timings"]
        out["timings"]["reused"] = {"variants": reused, "earlier_wall_s": prev.get("wall_s"),
                                    "earlier_cpu_s": prev.get("cpu_s")}
    out["verdict"] = verdict(out)
    return out


def check_reuse(cfg: DiagnosisConfig, reuse: Mapping[str, Any]) -> None:
    old = reuse["config"]
    grid = lambda a: (a["points"], a["full_points"])  # noqa: E731  (the chunk size changes no result)
    same = (old["suite"], old["seed"], old["tasks"], old["tiny"], grid(old["alpha_protocol"])) == (
        cfg.suite, cfg.seed, cfg.tasks, cfg.tiny, grid(dataclasses.asdict(cfg.alpha)))
    if not same:
        raise ValueError("--reuse: that result is for another suite, seed, T or alpha protocol.")


class _quiet:
    """Silences PACT's 'removes (almost) every task vector' warning inside the diagnosis (the report says it)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", UserWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


# --------------------------------------------------------------------------
# Verdict and report


def se(p: float, n: int) -> float:
    return float(np.sqrt(max(p * (1 - p), 1e-12) / n))


def verdict(res: Mapping[str, Any]) -> dict[str, Any]:
    """Per method: each variant's test difference to its reference (no PACT under the same alpha
    plan: ``none``, or ``none_full`` for the whole-grid light preset when it ran) with twice its
    (unpaired) standard error."""
    n = res["config"]["tasks"] * res["n_test"]
    vs = res["variants"]
    refs = {v.name: v.reference for v in VARIANTS}
    out: dict[str, Any] = {}
    if "none" not in vs:
        return out
    for method, base in vs["none"]["methods"].items():
        rows = {}
        for name, rec in vs.items():
            if name == "none" or method not in rec["methods"]:
                continue
            ref = refs.get(name, "none")
            if ref not in vs or method not in vs[ref]["methods"]:
                ref = "none"
            p0 = vs[ref]["methods"][method]["chosen"]["test_mean"]
            p = rec["methods"][method]["chosen"]["test_mean"]
            two_se = 2 * float(np.hypot(se(p, n), se(p0, n)))
            rows[name] = {"reference": ref, "diff": p - p0, "two_se": two_se,
                          "beyond_noise": "better" if p - p0 > two_se else "worse" if p0 - p > two_se else "within"}
        out[method] = {"none": base["chosen"]["test_mean"], "variants": rows,
                       "better": [k for k, v in rows.items()
                                  if v["beyond_noise"] == "better" and vs[k]["transform"] is not None]}
    return out


def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


METHOD_LABELS = {"task_arithmetic": "TA", "tsv": "TSV-M", "iso_c": "Iso-C", "iso_cts": "Iso-CTS"}


def report_lines(res: Mapping[str, Any]) -> list[str]:
    cfg, vs = res["config"], res["variants"]
    n = cfg["tasks"] * res["n_test"]
    methods = list(dict.fromkeys([*cfg["baseline_methods"], *cfg["methods"]]))
    lines = [
        f"# PACT diagnosis: {res['zoo']['suite']}, seed {cfg['seed']}, T = {cfg['tasks']}"
        + (" (tiny stand-in)" if cfg["tiny"] else ""),
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}  ",
        f"Date: {res['date']}  ",
        f"Run time: {res['timings']['wall_s']:.0f} s wall, {res['timings']['cpu_s']:.0f} s CPU (shared machine).",
        "",
        f"Fine-tuned models (each on its task): {_pct(res['finetuned']['mean'])}; pre-trained encoder + each task's "
        f"probe: {_pct(res['pretrained_probe']['mean'])} (test mean accuracy, %). Test: {res['n_test']} examples "
        f"per task ({n} in all); validation {res['n_val']} per task. One seed: a test mean has a binomial "
        f"standard error of about {100 * se(0.8, n):.1f} points; a difference to no PACT counts as beyond noise "
        "only above twice the unpaired standard error of the difference (column 'vs none'; the light preset, "
        "whose alpha the suites search on a whole grid without early stop, is compared with no PACT on that "
        "same grid, 'none_full').",
        "",
        "Alpha: the suites' protocol (`benchmarks.quality.alpha_plan` / `choose_alpha`: authors' grid for the "
        "method and transform, early stop after 3, best validation normalised accuracy, grid doubled when the best "
        "is its top). Every PACT variant uses the authors' PACT range, SIFT its own, PACT light the suite's whole "
        f"grid. Where the best is the range's first point, {cfg['low_points']} points in (0, first point) are "
        "walked too and the better of all by validation is reported ('below'); 'suite α/test' is what the "
        "suite's protocol alone picks. 'wide': the whole grid from below the range to "
        f"{cfg['wide_factor']:g}x its top.",
        "",
        "## Accuracy and energy removed, per variant",
        "",
    ]
    for method in methods:
        rows = []
        for name, rec in vs.items():
            r = rec["methods"].get(method)
            if r is None:
                continue
            c = r["chosen"]
            sat = rec["saturation"]
            sat_s = "–" if sat is None else f"{sat['saturated']}/{sat['matrices']} ({_pct(sat['saturated_share'], 0)}%)"
            proto = r.get("protocol")
            how = ("wide" if "wide" in r else "below" if "below" in r else
                   ("top→x2" if proto and proto.get("widened_to") else "") + (f" {proto['at_end']} end" if proto and proto.get("at_end") else ""))
            v = res["verdict"].get(method, {}).get("variants", {}).get(name)
            vs_none = "" if v is None else f"{100 * v['diff']:+.2f} ± {100 * v['two_se']:.2f}" + (
                f" (vs {v['reference']})" if v["reference"] != "none" else "") + (
                " **better**" if v["beyond_noise"] == "better" else " worse" if v["beyond_noise"] == "worse" else "")
            rows.append([
                f"{rec['label']}" + (f" (= {rec['same_transform_as']})" if rec["same_transform_as"] else ""),
                _pct(rec["energy"]["removed"], 1), sat_s,
                f"{c['alpha']:.3g}", how.strip(), _pct(c["val_mean"]), _pct(c["test_mean"]), vs_none,
                "" if not proto or "below" not in r else f"{proto['alpha']:.3g} / {_pct(proto['test_mean'])}",
            ])
        lines += [f"### {METHOD_LABELS.get(method, method)}", ""]
        lines += _table(["variant", "energy removed %", "matrices with K+(T-1)k ≥ d_in (share of ‖τ‖²)", "α",
                         "α note", "val %", "test %", "vs none (± 2 SE)", "suite α / test"], rows)
        lines.append("")
    paper = vs.get("paper")
    if paper and paper.get("saturation"):
        lines += ["## Which leaves: the paper default per matrix", "",
                  "d_in: the protected (input) dimension; protect dims: mean over tasks of dim P_t "
                  "(`pact_jax.lbw_statistics`); share: of ‖τ‖² over all tasks; removed: share of that leaf's "
                  "‖τ‖² removed.", ""]
        rows = []
        for row in paper["saturation"]["rows"]:
            leaf = paper["energy"]["leaves"].get(row["path"], {})
            pd_ = row.get("protect_dims")
            rows.append([row["path"], "×".join(map(str, row["view"])), row["d_in"], row["K"], row["k"],
                         row["K+(T-1)k"], "yes" if row["saturated"] else "no",
                         "–" if pd_ is None else f"{pd_:.1f}", _pct(leaf.get("share"), 1), _pct(leaf.get("removed"), 1)])
        lines += _table(["matrix", "view", "d_in", "K", "k", "K+(T-1)k", "≥ d_in", "protect dims", "share %",
                         "removed %"], rows)
        lines.append("")
    ov = res.get("overlap")
    if ov:
        lines += [f"## Where the task vectors' energy lies (input space; K = {ov['K']:g}·min(m, n), k = {ov['k']})", "",
                  "Share of ‖τ_j‖² (%, over tasks and the group's matrices) in: task j's own top-k input directions; "
                  "the pre-trained core V0K (what SIFT removes); the other tasks' top-k directions span{V_i : i ≠ j}; "
                  "V0K + span{V_i : i ≠ j} (about PACT's protect space); last column: what a random subspace of that "
                  "dimension would hold (dim / d_in). PACT's actual removal is in the next table.", ""]
        rows = [[GROUP_LABELS.get(g, g)] + [_pct(v[c], 1) for c in ("own_topk", "core", "others_topk", "core+others",
                                                                    "random_core+others")]
                for g, v in ov["groups"].items()]
        lines += _table(["group", "own top-k", "V0K", "others' top-k", "V0K + others' top-k", "random, same dim"], rows)
        lines.append("")
    lines += ["## Which leaves: energy removed per leaf group", "",
              "Each cell: share of the group's ‖τ‖² removed (%); the header gives the group's share of all "
              "of ‖τ‖².", ""]
    groups = [g for g in GROUPS if any(g in rec["energy"]["groups"] for rec in vs.values())]
    first = next(iter(vs.values()))["energy"]["groups"]
    header = ["variant", "removed (all) %"] + [f"{GROUP_LABELS.get(g, g)} [{_pct(first.get(g, {}).get('share'), 1)}%]"
                                               for g in groups]
    rows = []
    for name, rec in vs.items():
        if rec["transform"] is None or rec["same_transform_as"]:
            continue
        gs = rec["energy"]["groups"]
        rows.append([rec["label"], _pct(rec["energy"]["removed"], 1)]
                    + [_pct(gs.get(g, {}).get("removed_of_group"), 1) for g in groups])
    lines += _table(header, rows)
    lines.append("")
    wide = vs.get("paper_wide")
    if wide:
        lines += ["## Wide alpha grid for the paper default", ""]
        rows = []
        for method, r in wide["methods"].items():
            w = r["wide"]
            cur = w["curve"]
            base = vs.get("none", {}).get("methods", {}).get(method)
            best_val = max(cur["val_mean"])
            rows.append([METHOD_LABELS.get(method, method), f"{cur['alpha'][0]:.3g} – {cur['alpha'][-1]:.3g} "
                         f"({len(cur['alpha'])})", f"{w['alpha']:.3g}", w["at_end"] or "inside",
                         _pct(w["val_mean"]), _pct(w["test_mean"]), _pct(best_val),
                         "–" if base is None else _pct(base["chosen"]["val_mean"]),
                         "–" if base is None else _pct(base["chosen"]["test_mean"])])
        lines += _table(["method", "α range (points)", "best α", "where", "val %", "test %",
                         "best val % anywhere", "no PACT val %", "no PACT test %"], rows)
        lines.append("")
        for method, r in wide["methods"].items():
            cur = r["wide"]["curve"]
            pts = ", ".join(f"{a:.3g}: {100 * v:.1f}" for a, v in zip(cur["alpha"], cur["val_mean"]))
            lines.append(f"- {METHOD_LABELS.get(method, method)} validation mean accuracy by α: {pts}")
        lines.append("")
    lines += ["## Settings that beat no PACT beyond noise (seed 0 only)", "",
              "Each against no PACT under the same alpha protocol (the light preset against the whole-grid "
              "no PACT).", ""]
    for method, v in res["verdict"].items():
        better = v["better"]
        lines.append(f"- {METHOD_LABELS.get(method, method)} (no PACT {_pct(v['none'])}): "
                     + (", ".join(f"{vs[b]['label']} ({100 * v['variants'][b]['diff']:+.2f} vs "
                                  f"{v['variants'][b]['reference']})" for b in better)
                        if better else "none"))
    if "none_full" in vs:
        lines += ["", "Alpha protocol alone (no PACT, whole grid without early stop vs the authors' early-stopped "
                  "grid): " + "; ".join(
                      f"{METHOD_LABELS.get(m, m)} {_pct(vs['none']['methods'][m]['chosen']['test_mean'])} → "
                      f"{_pct(r['chosen']['test_mean'])} (α {vs['none']['methods'][m]['chosen']['alpha']:.3g} → "
                      f"{r['chosen']['alpha']:.3g})" for m, r in vs["none_full"]["methods"].items()
                      if m in vs["none"]["methods"]) + "."]
    lines.append("")
    return lines


def output_paths(res: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    cfg = res["config"]
    stem = f"{cfg['suite']}{'_tiny' if cfg['tiny'] else ''}_seed{cfg['seed']}_T{cfg['tasks']}"
    return out_dir / f"{stem}.md", out_dir / f"{stem}.json"


def write_json(res: Mapping[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = output_paths(res, out_dir)[1]
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, default=_json_default))
    tmp.replace(js)
    return js


def write(res: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """The markdown report and the JSON."""
    js = write_json(res, out_dir)
    md = output_paths(res, out_dir)[0]
    md.write_text("\n".join(report_lines(res)) + "\n")
    return md, js


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pact_diagnosis", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=("vit", "minilm"), default="vit")
    p.add_argument("--text-tasks", choices=("real", "generated"), default="real",
                   help="with --suite minilm: the real-text suite (default) or the earlier 8 generated tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", type=int, default=None, help="T (default 8; --tiny: the tiny zoo's task count)")
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANT_NAMES, help="variants (default: all)")
    p.add_argument("--methods", nargs="+", default=None, choices=recipes.METHODS,
                   help="methods for every variant (default: task_arithmetic tsv)")
    p.add_argument("--baseline-methods", nargs="+", default=None, choices=recipes.METHODS,
                   help="methods for the baseline group (default: task_arithmetic tsv iso_c)")
    p.add_argument("--points", type=int, default=None, help="points per authors' alpha grid (default 30)")
    p.add_argument("--quick", action="store_true", help=f"the real zoo, variants {' '.join(QUICK_VARIANTS)}, TSV-M only")
    p.add_argument("--tiny", action="store_true", help="a tiny stand-in zoo (the CI test)")
    p.add_argument("--cache", type=Path, default=None, help="zoo cache (default: the suite's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pact_diagnosis")
    p.add_argument("--reuse", type=Path, default=None,
                   help="an earlier JSON of the same suite / seed / T: its variants are taken, not recomputed")
    return p


def config_from_args(args: argparse.Namespace) -> DiagnosisConfig:
    cfg = DiagnosisConfig(suite=args.suite, text_tasks=args.text_tasks, seed=args.seed, tiny=args.tiny)
    changes: dict[str, Any] = {}
    if args.tiny:
        tiny_t = 4 if args.suite == "vit" else 2
        changes.update(tasks=tiny_t, variants=TINY_VARIANTS, baseline_methods=("task_arithmetic", "tsv"),
                       alpha=quality.AlphaProtocol(points=4, chunk=2))
    if args.quick:
        changes.update(variants=QUICK_VARIANTS, methods=("tsv",), baseline_methods=("tsv",))
    if args.tasks is not None:
        changes["tasks"] = args.tasks
    if args.variants:
        changes["variants"] = tuple(args.variants)
    if args.methods:
        changes["methods"] = tuple(args.methods)
    if args.baseline_methods:
        changes["baseline_methods"] = tuple(args.baseline_methods)
    if args.points is not None:
        if args.points < 1:
            raise ValueError("--points: at least 1.")
        changes["alpha"] = dataclasses.replace(changes.get("alpha", cfg.alpha), points=args.points)
    return dataclasses.replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    reuse = json.loads(args.reuse.read_text()) if args.reuse else None
    try:
        if reuse is not None:
            check_reuse(cfg, reuse)
    except ValueError as e:
        parser.error(str(e))
    command = "python -m benchmarks.pact_diagnosis" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))

    def checkpoint(partial: dict[str, Any]) -> None:  # an interrupted run resumes with --reuse <that JSON>
        partial["command"] = command
        write_json(partial, args.out)

    res = run(cfg, args.cache, log=lambda s: print(s, flush=True), reuse=reuse, on_variant=checkpoint)
    res["command"] = command
    md, js = write(res, args.out)
    print("\n".join(report_lines(res)[-len(res["verdict"]) - 3:]))
    print(f"wrote {md}, {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
