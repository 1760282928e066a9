"""Plain per-layer loops of the benchmarked merges, in NumPy and in PyTorch (CPU).

Written the way a user of either library would write them: a Python loop over
the leaves of a flat ``{path: array}`` checkpoint, and inside it a loop over
tasks calling ``np.linalg.svd`` / ``torch.linalg.svd`` on one matrix at a time,
all in float32. The math is the one pact_jax implements (DESIGN.md §1, the
``pact_jax.pact`` and ``pact_jax.merges`` docstrings), restated here without
importing pact_jax:

* PACT subspace perspective, ``side='left'``, no ``pretrained_energy``:
  ``U0k`` = top-``k`` left singular vectors of ``W0 (m, n)``; ``Ut`` = top-``r``
  of ``tau_t``; ``M_t = U0k - Ut (Ut^T U0k) = A_t G_t B_t^T``; LBW basis
  ``L_t`` = columns of ``A_t`` with ``G_t >= align_threshold``; ``tau_s <- tau_s -
  strength * B_s B_s^T tau_s`` with ``B_s`` an orthonormal basis (SVD, singular
  values ``> span_tol``) of ``[L_t, t != s]`` (``exclude_self``) or of all ``L_t``.
* PACT scalar perspective: ``e`` is LBW for task ``t`` when ``|W0_e| > 0`` is at
  least the ``top``-th largest ``|W0|`` and ``|tau_t,e|`` at most the
  ``anchor``-th smallest ``|tau_t|``; ``tau_s,e <- (1 - strength) tau_s,e``
  where ``e`` is LBW of another task.
* TSV-M, Iso-CTS, TIES as in ``pact_jax.merges``; TIES's trim keeps exactly
  ``k = max(1, round(density N))`` entries per task, ties at the ``k``-th
  magnitude taken lowest index first.
* ``svd='randomized'``: PACT's two truncated SVDs by Halko-Martinsson-Tropp
  range finding (Gaussian sketch of ``rank + oversample`` columns,
  ``power_iters`` QR-orthonormalised power iterations); each library draws its
  own Gaussian test matrices, so randomized results agree only up to the
  sketches' approximation error.

Leaf rules: leaves matching the ``average`` regex are merged by the task mean;
leaves with at least two dimensions not named ``bias`` are matrices, seen as
2-D as is, 3-D ``.../out/kernel`` ``(h, hd, d) -> (h*hd, d)``, other 3-D
``(d, h, hd) -> (d, h*hd)``, 4-D conv ``(kh, kw, cin, cout) -> (kh*kw*cin, cout)``.
Non-matrix leaves: task mean in TSV-M / Iso-CTS (PACT's subspace perspective
leaves them alone); TIES and scalar PACT process every leaf.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A PACT + merger recipe with every hyperparameter spelled out.

    ``method`` is ``'tsv'``, ``'iso_cts'`` or ``'ties'``; ``pact`` holds the
    keywords of ``pact_jax.pact`` (the subspace ones for the SVD mergers, the
    scalar ones for TIES), ``merger`` the merger's (``common_fraction``,
    ``density``).
    """

    name: str
    method: str
    pact: dict[str, Any]
    merger: dict[str, Any]
    alpha: float = 1.0

    @property
    def uses_svd(self) -> bool:
        return self.method != "ties"


SUBSPACE = dict(
    perspective="subspace",
    pretrained_rank=0.1,
    task_rank=0.05,
    align_threshold=0.9,
    side="left",
    strength=0.1,
    exclude_self=True,
    span_tol=1e-4,
    oversample=10,
    power_iters=2,
)
SCALAR = dict(perspective="scalar", weight_fraction=0.1, anchor_fraction=0.5, strength=1.0, exclude_self=True)

RECIPES: dict[str, Recipe] = {
    "pact_tsv": Recipe("pact_tsv", "tsv", SUBSPACE, {}),
    # The baselines take Iso-CTS's common subspace on the matrix view's left (the input side of a
    # Flax kernel), pact_jax's default before issue 18: pinned so both sides compute the same.
    "pact_iso_cts": Recipe("pact_iso_cts", "iso_cts", SUBSPACE, {"common_fraction": 0.8, "common_side": "input"}),
    "pact_ties": Recipe("pact_ties", "ties", SCALAR, {"density": 0.2}),
}
"""The benchmarked recipes: PACT's `light` preset (pact_jax's defaults when issue 6 measured them), written out."""


# --------------------------------------------------------------------------
# Shared, library-independent helpers


def leaf_kind(path: str, shape: tuple[int, ...], average: str | None) -> str:
    """``'average' | 'matrix' | 'other'``."""
    if average is not None and re.search(average, path):
        return "average"
    if len(shape) >= 2 and path.split("/")[-1] != "bias":
        return "matrix"
    return "other"


def matrix_shape(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        if path.endswith("/out/kernel"):
            return shape[0] * shape[1], shape[2]
        return shape[0], shape[1] * shape[2]
    return math.prod(shape[:-1]), shape[-1]


def resolve_rank(value: float | int, m: int, n: int) -> int:
    """An int is a rank; a float a fraction of ``min(m, n)``, floored (as pact_jax and the PACT authors), at least 1."""
    if isinstance(value, int):
        return value
    return max(1, int(math.floor(value * min(m, n) + 1e-9)))


def tsv_rank(m: int, n: int, t: int) -> int:
    return max(1, min(m, n) // t)


def iso_cts_split(m: int, n: int, t: int, common_fraction: float) -> tuple[int, int]:
    """``(common directions, directions per task)`` of Iso-CTS."""
    r = min(m, n)
    specific = round((r - int(r * common_fraction)) / t) * t
    specific = min(specific, (r // t) * t)
    return r - specific, specific // t


# --------------------------------------------------------------------------
# NumPy


def np_top_svd(x, rank, svd, rng, oversample, power_iters):
    """Top-``rank`` ``(u, s, vh)`` of ``x (m, n)``, exact or randomized."""
    if svd == "exact":
        u, s, vh = np.linalg.svd(x, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    m, n = x.shape
    width = min(rank + oversample, m, n)
    q, _ = np.linalg.qr(x @ rng.standard_normal((n, width), dtype=np.float32))
    for _ in range(power_iters):
        w, _ = np.linalg.qr(x.T @ q)
        q, _ = np.linalg.qr(x @ w)
    ub, s, vh = np.linalg.svd(q.T @ x, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def np_pact_subspace(w0, tau, p, svd, rng):
    """PACT subspace perspective on one matrix: ``w0 (m, n)``, ``tau (T, m, n) -> (T, m, n)``."""
    n_tasks, m, n = tau.shape
    k = resolve_rank(p["pretrained_rank"], m, n)
    r = resolve_rank(p["task_rank"], m, n)
    u0k = np_top_svd(w0, k, svd, rng, p["oversample"], p["power_iters"])[0]
    lbw = []
    for t in range(n_tasks):
        ut = np_top_svd(tau[t], r, svd, rng, p["oversample"], p["power_iters"])[0]
        a, cosines, _ = np.linalg.svd(u0k - ut @ (ut.T @ u0k), full_matrices=False)
        lbw.append(a[:, cosines >= p["align_threshold"]])
    out = np.empty_like(tau)
    for s in range(n_tasks):
        cols = np.concatenate([lbw[t] for t in range(n_tasks) if t != s or not p["exclude_self"]], axis=1)
        if cols.shape[1] == 0:
            out[s] = tau[s]
            continue
        b, sv, _ = np.linalg.svd(cols, full_matrices=False)
        b = b[:, sv > p["span_tol"] * sv[0]]  # relative, as pact_jax
        out[s] = tau[s] - p["strength"] * (b @ (b.T @ tau[s]))
    return out


def np_pact_scalar(w0, tau, p):
    """PACT scalar perspective on a flattened leaf: ``w0 (N,)``, ``tau (T, N) -> (T, N)``."""
    size = w0.size
    top = max(1, round(p["weight_fraction"] * size))
    anchor = max(1, round(p["anchor_fraction"] * size))
    mag0 = np.abs(w0)
    important = (mag0 >= np.partition(mag0, size - top)[size - top]) & (w0 != 0)
    lbw = []
    for t in range(tau.shape[0]):
        mag = np.abs(tau[t])
        lbw.append(important & (mag <= np.partition(mag, anchor - 1)[anchor - 1]))
    out = np.empty_like(tau)
    for s in range(tau.shape[0]):
        mask = np.zeros(size, dtype=bool)
        for t in range(tau.shape[0]):
            if t != s or not p["exclude_self"]:
                mask |= lbw[t]
        out[s] = np.where(mask, tau[s] * np.float32(1.0 - p["strength"]), tau[s])
    return out


def np_polar(x, conds):
    """Orthogonal polar factor; appends ``s_min / s_max`` of ``x`` to ``conds``."""
    p, s, qt = np.linalg.svd(x, full_matrices=False)
    conds.append(float(s[-1] / s[0]) if s[0] > 0 else 0.0)
    return (p * np_significant(s, s[0], max(x.shape))) @ qt  # partial isometry if rank-deficient


def np_significant(s, scale, size):
    """Singular values above rounding level (the merges drop null-space directions)."""
    return s > size * np.finfo(s.dtype).eps * scale


def np_tsv(tau, conds):
    n_tasks, m, n = tau.shape
    rank = tsv_rank(m, n, n_tasks)
    us, ss, vs = [], [], []
    svds = [np.linalg.svd(tau[t], full_matrices=False) for t in range(n_tasks)]
    scale = max(s[0] for _, s, _ in svds)
    for u, s, vh in svds:
        keep = np_significant(s[:rank], scale, max(m, n))
        us.append(u[:, :rank] * keep)
        ss.append(s[:rank])
        vs.append(vh[:rank].T * keep)
    u, v = np_polar(np.concatenate(us, axis=1), conds), np_polar(np.concatenate(vs, axis=1), conds)
    return (u * np.concatenate(ss)) @ v.T


def np_iso_cts(tau, common_fraction, conds):
    n_tasks, m, n = tau.shape
    common, per_task = iso_cts_split(m, n, n_tasks, common_fraction)
    u, s, vh = np.linalg.svd(tau.sum(0), full_matrices=False)
    keep = np_significant(s[:common], s[0], max(m, n))
    uk = u[:, :common][:, keep]
    us, ss, vs = [uk], [s[:common][keep]], [vh[:common].T[:, keep]]
    for t in range(n_tasks if per_task > 0 else 0):
        ut, st, vht = np.linalg.svd(tau[t] - uk @ (uk.T @ tau[t]), full_matrices=False)
        keep = np_significant(st[:per_task], s[0], max(m, n))
        us.append(ut[:, :per_task][:, keep])
        ss.append(st[:per_task][keep])
        vs.append(vht[:per_task].T[:, keep])
    u_all, v_all = np_polar(np.concatenate(us, axis=1), conds), np_polar(np.concatenate(vs, axis=1), conds)
    return np.concatenate(ss).mean() * (u_all @ v_all.T)


def np_ties(tau, density):
    """``tau (T, N) -> (N,)``.

    Trim: each task keeps exactly ``k = max(1, round(density N))`` entries, the
    largest ``|tau_t|``; entries tied with the ``k``-th magnitude are taken
    lowest index first until ``k`` are kept (``pact_jax.merges.top_k_mask``).
    """
    size = tau.shape[1]
    keep = min(size, max(1, round(density * size)))
    trimmed = np.zeros_like(tau)
    for t in range(tau.shape[0]):
        mag = np.abs(tau[t])
        kth = np.partition(mag, size - keep)[size - keep]
        mask = mag > kth
        tied = np.flatnonzero(mag == kth)
        mask[tied[: keep - int(mask.sum())]] = True
        trimmed[t, mask] = tau[t, mask]
    elected = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(0)
    total = np.where(agree, trimmed, 0).sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), 0).astype(np.float32)


def merge_numpy(pre, finetuned, recipe: Recipe, *, average, svd="exact", seed=0, conds=None):
    """Merged checkpoint ``{path: W0 + alpha * delta}`` from flat float32 NumPy checkpoints.

    ``conds``: if a dict, receives ``{path: min s_min / s_max}`` over the polar
    factors of each matrix leaf (TSV-M / Iso-CTS); near 0 means the polar
    factor is not unique and its completion is set by rounding.
    """
    rng = np.random.default_rng(seed)
    p = recipe.pact
    out = {}
    for path, w0 in pre.items():
        tau = np.stack([ft[path] - w0 for ft in finetuned])
        n_tasks, shape = tau.shape[0], w0.shape
        kind = leaf_kind(path, shape, average)
        if kind == "average":
            delta = tau.mean(0)
        elif recipe.method == "ties":
            cleaned = np_pact_scalar(w0.reshape(-1), tau.reshape(n_tasks, -1), p)
            delta = np_ties(cleaned, recipe.merger["density"])
        elif kind == "matrix":
            m, n = matrix_shape(path, shape)
            cleaned = np_pact_subspace(w0.reshape(m, n), tau.reshape(n_tasks, m, n), p, svd, rng)
            leaf_conds = []
            if recipe.method == "tsv":
                delta = np_tsv(cleaned, leaf_conds)
            else:
                delta = np_iso_cts(cleaned, recipe.merger["common_fraction"], leaf_conds)
            if conds is not None:
                conds[path] = min(leaf_conds)
        else:
            delta = tau.mean(0)
        out[path] = (w0 + np.float32(recipe.alpha) * delta.reshape(shape)).astype(w0.dtype)
    return out


# --------------------------------------------------------------------------
# PyTorch


def torch_top_svd(x, rank, svd, gen, oversample, power_iters):
    import torch

    if svd == "exact":
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    m, n = x.shape
    width = min(rank + oversample, m, n)
    q, _ = torch.linalg.qr(x @ torch.randn(n, width, generator=gen, dtype=x.dtype))
    for _ in range(power_iters):
        w, _ = torch.linalg.qr(x.T @ q)
        q, _ = torch.linalg.qr(x @ w)
    ub, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def torch_pact_subspace(w0, tau, p, svd, gen):
    import torch

    n_tasks, m, n = tau.shape
    k = resolve_rank(p["pretrained_rank"], m, n)
    r = resolve_rank(p["task_rank"], m, n)
    u0k = torch_top_svd(w0, k, svd, gen, p["oversample"], p["power_iters"])[0]
    lbw = []
    for t in range(n_tasks):
        ut = torch_top_svd(tau[t], r, svd, gen, p["oversample"], p["power_iters"])[0]
        a, cosines, _ = torch.linalg.svd(u0k - ut @ (ut.T @ u0k), full_matrices=False)
        lbw.append(a[:, cosines >= p["align_threshold"]])
    out = torch.empty_like(tau)
    for s in range(n_tasks):
        cols = torch.cat([lbw[t] for t in range(n_tasks) if t != s or not p["exclude_self"]], dim=1)
        if cols.shape[1] == 0:
            out[s] = tau[s]
            continue
        b, sv, _ = torch.linalg.svd(cols, full_matrices=False)
        b = b[:, sv > p["span_tol"] * sv[0]]  # relative, as pact_jax
        out[s] = tau[s] - p["strength"] * (b @ (b.T @ tau[s]))
    return out


def torch_pact_scalar(w0, tau, p):
    import torch

    size = w0.numel()
    top = max(1, round(p["weight_fraction"] * size))
    anchor = max(1, round(p["anchor_fraction"] * size))
    mag0 = w0.abs()
    important = (mag0 >= torch.kthvalue(mag0, size - top + 1).values) & (w0 != 0)
    lbw = []
    for t in range(tau.shape[0]):
        mag = tau[t].abs()
        lbw.append(important & (mag <= torch.kthvalue(mag, anchor).values))
    out = torch.empty_like(tau)
    for s in range(tau.shape[0]):
        mask = torch.zeros(size, dtype=torch.bool)
        for t in range(tau.shape[0]):
            if t != s or not p["exclude_self"]:
                mask |= lbw[t]
        out[s] = torch.where(mask, tau[s] * (1.0 - p["strength"]), tau[s])
    return out


def torch_polar(x, conds):
    import torch

    p, s, qt = torch.linalg.svd(x, full_matrices=False)
    conds.append(float(s[-1] / s[0]) if s[0] > 0 else 0.0)
    return (p * torch_significant(s, s[0], max(x.shape))) @ qt  # partial isometry if rank-deficient


def torch_significant(s, scale, size):
    """Singular values above rounding level (the merges drop null-space directions)."""
    import torch

    return s > size * torch.finfo(s.dtype).eps * scale


def torch_tsv(tau, conds):
    import torch

    n_tasks, m, n = tau.shape
    rank = tsv_rank(m, n, n_tasks)
    us, ss, vs = [], [], []
    svds = [torch.linalg.svd(tau[t], full_matrices=False) for t in range(n_tasks)]
    scale = max(float(s[0]) for _, s, _ in svds)
    for u, s, vh in svds:
        keep = torch_significant(s[:rank], scale, max(m, n))
        us.append(u[:, :rank] * keep)
        ss.append(s[:rank])
        vs.append(vh[:rank].T * keep)
    u, v = torch_polar(torch.cat(us, dim=1), conds), torch_polar(torch.cat(vs, dim=1), conds)
    return (u * torch.cat(ss)) @ v.T


def torch_iso_cts(tau, common_fraction, conds):
    import torch

    n_tasks, m, n = tau.shape
    common, per_task = iso_cts_split(m, n, n_tasks, common_fraction)
    u, s, vh = torch.linalg.svd(tau.sum(0), full_matrices=False)
    keep = torch_significant(s[:common], s[0], max(m, n))
    uk = u[:, :common][:, keep]
    us, ss, vs = [uk], [s[:common][keep]], [vh[:common].T[:, keep]]
    for t in range(n_tasks if per_task > 0 else 0):
        ut, st, vht = torch.linalg.svd(tau[t] - uk @ (uk.T @ tau[t]), full_matrices=False)
        keep = torch_significant(st[:per_task], s[0], max(m, n))
        us.append(ut[:, :per_task][:, keep])
        ss.append(st[:per_task][keep])
        vs.append(vht[:per_task].T[:, keep])
    u_all, v_all = torch_polar(torch.cat(us, dim=1), conds), torch_polar(torch.cat(vs, dim=1), conds)
    return torch.cat(ss).mean() * (u_all @ v_all.T)


def torch_ties(tau, density):
    """:func:`np_ties` in PyTorch: exactly ``k`` entries per task, ties at the ``k``-th magnitude by index."""
    import torch

    size = tau.shape[1]
    keep = min(size, max(1, round(density * size)))
    trimmed = torch.zeros_like(tau)
    for t in range(tau.shape[0]):
        mag = tau[t].abs()
        kth = torch.kthvalue(mag, size - keep + 1).values
        mask = mag > kth
        tied = torch.nonzero(mag == kth).flatten()
        mask[tied[: keep - int(mask.sum())]] = True
        trimmed[t] = torch.where(mask, tau[t], 0.0)
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(0)
    total = torch.where(agree, trimmed, 0.0).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def merge_torch(pre, finetuned, recipe: Recipe, *, average, svd="exact", seed=0, conds=None):
    """:func:`merge_numpy` with ``torch.Tensor`` leaves (CPU, float32)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    p = recipe.pact
    out = {}
    with torch.no_grad():
        for path, w0 in pre.items():
            tau = torch.stack([ft[path] - w0 for ft in finetuned])
            n_tasks, shape = tau.shape[0], tuple(w0.shape)
            kind = leaf_kind(path, shape, average)
            if kind == "average":
                delta = tau.mean(0)
            elif recipe.method == "ties":
                cleaned = torch_pact_scalar(w0.reshape(-1), tau.reshape(n_tasks, -1), p)
                delta = torch_ties(cleaned, recipe.merger["density"])
            elif kind == "matrix":
                m, n = matrix_shape(path, shape)
                cleaned = torch_pact_subspace(w0.reshape(m, n), tau.reshape(n_tasks, m, n), p, svd, gen)
                leaf_conds = []
                if recipe.method == "tsv":
                    delta = torch_tsv(cleaned, leaf_conds)
                else:
                    delta = torch_iso_cts(cleaned, recipe.merger["common_fraction"], leaf_conds)
                if conds is not None:
                    conds[path] = min(leaf_conds)
            else:
                delta = tau.mean(0)
            out[path] = w0 + recipe.alpha * delta.reshape(shape)
    return out


MERGES = {"numpy": merge_numpy, "torch": merge_torch}
