"""NumPy references of mergekit 0.1.5's merge rules, restated from its source.

Read from mergekit 0.1.5's ``merge_methods/generalized_task_arithmetic.py``
(``merge_group``, ``get_mask``), ``sparsify.py`` (``magnitude``, ``bernoulli``,
``rescaled_masked_tensor``), ``merge_methods/linear.py`` and
``merge_methods/registry.py`` (the defaults per method); written here in float64
NumPy with explicit loops, importing nothing from pact_jax or mergekit.

Per tensor, with ``base`` the base model's tensor and ``theta_t`` the others':

* sparsify each ``delta_t = theta_t - base`` (``magnitude`` for ties: keep the
  ``max(1, int(density * N))`` largest ``|delta_t|``, all of them for
  ``density >= 1``; ``bernoulli`` for dare_*: keep each entry with probability
  ``density``), then for ``rescale`` multiply by ``||delta_t||_1 / ||kept||_1``
  unless either norm is below 1e-7;
* ``x_t = weight_t * delta_t``;
* ties / dare_ties (consensus ``sum``): ``majority = +1 where sum_t x_t >= 0,
  else -1``; ``mask_t = sign(x_t) == majority`` (a zero ``x_t`` never agrees);
  ``mixed = sum_t mask_t x_t``; ``divisor = sum_t mask_t weight_t`` (0 -> 1);
* task_arithmetic / dare_linear: ``mixed = sum_t x_t``; ``divisor = sum_t
  weight_t`` (``|divisor| < 1e-8`` -> 1);
* ``normalize``: ``mixed /= divisor``; ``mixed *= lambda``; result
  ``base + mixed``.
* linear: ``sum_i w_i theta_i / sum_i w_i`` over all its inputs (with
  ``normalize``; else the plain weighted sum).

Defaults (registry.py): normalize true for ties and linear, false for
task_arithmetic, dare_ties, dare_linear; rescale true for dare_ties and
dare_linear, false otherwise; lambda 1; density 1.
"""

from __future__ import annotations

import numpy as np

L1_EPS = 1e-7


def mk_keep_count(n: int, density: float) -> int:
    """Entries mergekit's ``magnitude`` keeps of an ``n``-entry tensor."""
    return n if density >= 1 else max(1, int(density * n))


def mk_magnitude(delta: np.ndarray, density: float) -> np.ndarray:
    """The ``k`` largest-magnitude entries of ``delta`` (any shape), zeros elsewhere.

    mergekit orders by ``torch.argsort(|x|, descending=True)``, whose order among
    equal magnitudes is unspecified; here the lower flat index comes first (as in
    pact_jax), which matters only where magnitudes tie at the k-th place.
    """
    flat = delta.reshape(-1)
    k = mk_keep_count(flat.size, density)
    kept = sorted(range(flat.size), key=lambda j: (-abs(flat[j]), j))[:k]
    out = np.zeros_like(flat)
    out[kept] = flat[kept]
    return out.reshape(delta.shape)


def mk_rescaled(delta: np.ndarray, mask: np.ndarray, rescale: bool) -> np.ndarray:
    """``delta * mask``, times ``||delta||_1 / ||delta * mask||_1`` for ``rescale`` (unless either is < 1e-7)."""
    masked = delta * mask
    if not rescale:
        return masked
    before, after = np.abs(delta).sum(), np.abs(masked).sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)


def mk_consensus_mask(x: np.ndarray) -> np.ndarray:
    """``get_mask(method='sum')`` on ``x (T, ...)``: agreement with the sign of the sum, 0 counted +."""
    majority = np.where(x.sum(0) >= 0, 1.0, -1.0)
    return np.sign(x) == majority


def mk_combine(deltas: np.ndarray, weights, *, consensus: bool, normalize: bool, lam: float) -> np.ndarray:
    """The merged update ``lambda * mixed`` of already sparsified ``deltas (T, ...)``."""
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (deltas.ndim - 1))
    x = deltas * w
    if consensus:
        mask = mk_consensus_mask(x)
        mixed = (x * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = x.sum(0)
        divisor = w.sum()
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if normalize:
        mixed = mixed / divisor
    return lam * mixed


def mk_ties(deltas: np.ndarray, weights, densities, *, normalize: bool = True, lam: float = 1.0) -> np.ndarray:
    """mergekit's ``ties`` update of ``deltas (T, ...)`` (one tensor)."""
    trimmed = np.stack([mk_magnitude(d, dens) for d, dens in zip(deltas, densities)])
    return mk_combine(trimmed, weights, consensus=True, normalize=normalize, lam=lam)


def mk_task_arithmetic(deltas: np.ndarray, weights, *, normalize: bool = False, lam: float = 1.0) -> np.ndarray:
    return mk_combine(deltas, weights, consensus=False, normalize=normalize, lam=lam)


def mk_dare(deltas: np.ndarray, masks: np.ndarray, weights, *, consensus: bool, normalize: bool = False,
            rescale: bool = True, lam: float = 1.0) -> np.ndarray:  # fmt: skip
    """mergekit's ``dare_ties`` (``consensus``) / ``dare_linear`` update, given the Bernoulli keep ``masks``."""
    kept = np.stack([mk_rescaled(d, m, rescale) for d, m in zip(deltas, masks)])
    return mk_combine(kept, weights, consensus=consensus, normalize=normalize, lam=lam)


def mk_linear(models: list[np.ndarray], weights, *, normalize: bool = True) -> np.ndarray:
    """mergekit's ``linear``: ``sum_i w_i theta_i (/ sum_i w_i)`` over every input."""
    total = sum(w * m for w, m in zip(weights, models))
    return total / sum(weights) if normalize else total
