"""NumPy (float64) transcription of PACT as the authors coded it (DESIGN.md §1a), with the fix.

Written from the design text with explicit loops, as the authors' loop runs it
(one task, one matrix at a time, explicit bases), importing nothing from
pact_jax. Torch layout: ``w0 (d_out, d_in)``, ``deltas (T, d_out, d_in)``;
the protected space is the input space (right singular vectors). A Flax
kernel ``(d_in, d_out)`` is its transpose.
"""

from __future__ import annotations

import numpy as np


def np_core_rank(ratio: float, d_out: int, d_in: int) -> int:
    """``K = max(1, floor(ratio * min(d_out, d_in)))``."""
    return max(1, int(np.floor(ratio * min(d_out, d_in) + 1e-9)))


def np_basis(x: np.ndarray, tol: float, *, relative: bool, method: str = "svd") -> np.ndarray:
    """Orthonormal basis of ``range(x)``: SVD with singular values above ``tol``
    (times the largest if ``relative``), or the release's reduced QR."""
    if x.shape[1] == 0:
        return x
    if method == "qr":
        return np.linalg.qr(x)[0]
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    cut = tol * s[0] if relative else tol
    return u[:, s > cut]


def np_pact_torch(
    w0: np.ndarray,
    deltas: np.ndarray,
    *,
    k_ratio: float = 0.8,
    k_per_task: int = 10,
    tol: float = 1e-4,
    method: str = "svd",
    zero_core: bool = False,
    exclude_self: bool = True,
    strength: float = 1.0,
    task_spaces: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, dict]:
    """Steps 1-4 on one torch-layout matrix. Returns the filtered deltas and dims.

    ``method='qr'``: the release (plain QR in steps 3 and 4, an ``R_t`` with
    ``||.||_F < 1e-6`` empty); ``zero_core``: the release's ``W0 = 0`` (core =
    first ``K`` coordinate axes). ``task_spaces``: per task a ``(d_in, k_t)``
    orthonormal basis used as ``V_t`` instead of the top-k SVD of ``delta_t``
    (the LoRA branch, step 9: :func:`np_lora_row_space` of the adapter's ``A``).
    """
    w0 = np.asarray(w0, np.float64)
    deltas = np.asarray(deltas, np.float64)
    n_tasks, d_out, d_in = deltas.shape
    big_k = np_core_rank(k_ratio, d_out, d_in)
    if zero_core:
        v0k = np.eye(d_in)[:, :big_k]
    else:
        v0k = np.linalg.svd(w0, full_matrices=False)[2][:big_k].T  # (d_in, K)
    k = min(k_per_task, d_out, d_in)
    reliance = []
    for t in range(n_tasks):
        if task_spaces is not None:
            v_t = np.asarray(task_spaces[t], np.float64)
        else:
            v_t = np.linalg.svd(deltas[t], full_matrices=False)[2][:k].T  # (d_in, k)
        m_t = v0k - v_t @ (v_t.T @ v0k)
        if method == "qr" and np.linalg.norm(m_t) < 1e-6:
            reliance.append(np.zeros((d_in, 0)))
        else:
            reliance.append(np_basis(m_t, tol, relative=False, method=method))
    out = deltas.copy()
    protect_dims = []
    for j in range(n_tasks):
        others = [reliance[i] for i in range(n_tasks) if not (exclude_self and i == j)]
        cat = np.concatenate(others, axis=1) if others else np.zeros((d_in, 0))
        p_j = np_basis(cat, tol, relative=True, method=method)
        protect_dims.append(p_j.shape[1])
        out[j] = deltas[j] - strength * (deltas[j] @ p_j) @ p_j.T
    dims = {"pretrained_dims": big_k, "reliance_dims": [r.shape[1] for r in reliance],
            "protect_dims": protect_dims}
    return out, dims


def np_sift_torch(w0: np.ndarray, deltas: np.ndarray, *, k_ratio: float = 0.8) -> np.ndarray:
    """SIFT (§1a step 8): ``delta_t - delta_t V0K V0K^T``."""
    w0 = np.asarray(w0, np.float64)
    deltas = np.asarray(deltas, np.float64)
    big_k = np_core_rank(k_ratio, *w0.shape)
    v0k = np.linalg.svd(w0, full_matrices=False)[2][:big_k].T
    return deltas - (deltas @ v0k) @ v0k.T


def np_lora_row_space(a: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    """Step 9: ``V_t`` = an orthonormal basis of the row space of a LoRA ``A (r, d_in)`` -> ``(d_in, rank A)``."""
    _, s, vh = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
    return vh[s > tol * max(s[0], 1e-300)].T if s.size else np.zeros((a.shape[1], 0))


def np_lora_merge(w0: np.ndarray, factors: list[tuple[np.ndarray, np.ndarray, float]], alpha: float,
                  *, transposed: bool = False) -> np.ndarray:
    """``W0 + alpha * sum_t s_t B_t A_t`` for factors ``(A (r, d_in), B (d_out, r), s)``; ``transposed``:
    ``W0`` is stored ``(d_in, d_out)`` (a Flax kernel, a ``fan_in_fan_out`` Conv1D)."""
    w0 = np.asarray(w0, np.float64)
    total = np.zeros(w0.T.shape if transposed else w0.shape)
    for a, b, s in factors:
        total += s * np.asarray(b, np.float64) @ np.asarray(a, np.float64)
    return w0 + alpha * (total.T if transposed else total)
