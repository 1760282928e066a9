"""Nominal floating-point work of the benchmarked merges (SVD + matmul only).

Conventions (one multiply-add = 2 flops), for a matrix ``(m, n)`` with
``p = min(m, n)``, ``q = max(m, n)``:

* matmul ``(a, b) @ (b, c)``: ``2 a b c``;
* thin SVD with ``U`` and ``V`` (LAPACK gesdd): ``6 q p^2 + 20 p^3``, the
  R-SVD count of Golub & Van Loan (Matrix Computations, 4th ed., §8.6);
* thin Householder QR with ``Q`` formed (``m >= n``): ``4 m n^2 - 4 n^3 / 3``;
* symmetric eigendecomposition with vectors of ``(p, p)``: ``9 p^3``
  (symmetric QR algorithm, Golub & Van Loan §8.3);
* element-wise work (TIES, PACT's scalar perspective, subtractions, the
  k-th-largest bisection) is not counted: those recipes have no SVD/matmul
  GFLOP/s.

The counts follow the algorithm each implementation runs (``pact_jax.pact``
docstring, steps 1-5; ``pact_jax.merges``): with ``exclude_self`` one span
basis per receiving task from ``T k'`` columns (the own task's columns
zeroed); the exact path's truncated SVDs are full thin SVDs, then truncated,
in the NumPy / PyTorch loops, and in pact_jax the Gram path of
:func:`pact_jax.linalg.exact_svd` where it applies (``gram=True``: ``x x^T``,
its eigendecomposition, a Rayleigh-Ritz SVD of ``rank + 16`` rows). Achieved
GFLOP/s of an implementation is its own count divided by its time.
"""

from __future__ import annotations

from pact_jax import linalg

from benchmarks.baselines import Recipe, iso_cts_split, resolve_rank, tsv_rank
from benchmarks.models import ModelSpec, matrix_views


def matmul(a: int, b: int, c: int) -> float:
    return 2.0 * a * b * c


def svd(m: int, n: int) -> float:
    p, q = min(m, n), max(m, n)
    return 6.0 * q * p * p + 20.0 * p**3


def qr(m: int, n: int) -> float:
    m, n = max(m, n), min(m, n)
    return 4.0 * m * n * n - 4.0 * n**3 / 3.0


def eigh(p: int) -> float:
    return 9.0 * p**3


def polar(m: int, c: int) -> float:
    """``P Q^T`` from the thin SVD of ``(m, c)``."""
    return svd(m, c) + matmul(m, min(m, c), c)


def gram_svd(m: int, n: int, rank: int) -> float:
    """:func:`pact_jax.linalg.exact_svd`'s Gram path: ``x x^T``, eigh, ``Q^T x``, its SVD, ``Q Ub``."""
    p, q = min(m, n), max(m, n)
    width = rank + linalg.GRAM_OVERSAMPLE
    return matmul(p, q, p) + eigh(p) + matmul(width, p, q) + svd(width, q) + matmul(p, width, width)


def exact_svd(m: int, n: int, rank: int, gram: bool) -> float:
    """Top ``rank`` triplets, exact: pact_jax's Gram path where it applies (``gram``), else a full thin SVD."""
    return gram_svd(m, n, rank) if gram and linalg.uses_gram((m, n), rank) else svd(m, n)


def truncated_svd(
    m: int, n: int, rank: int, method: str, oversample: int, power_iters: int, gram: bool = False
) -> float:
    if method == "exact":
        return exact_svd(m, n, rank, gram)
    width = min(rank + oversample, m, n)
    work = matmul(m, n, width) + qr(m, width)
    work += power_iters * (2 * matmul(m, n, width) + qr(n, width) + qr(m, width))
    return work + matmul(width, m, n) + svd(width, n) + matmul(m, width, width)


def pact_subspace(m: int, n: int, t: int, p: dict, method: str, gram: bool = False) -> float:
    """PACT subspace perspective, ``side='left'``, on one ``(m, n)`` matrix with ``T = t``."""
    k = resolve_rank(p["pretrained_rank"], m, n)
    r = resolve_rank(p["task_rank"], m, n)
    kk = min(m, k)
    opts = (p["oversample"], p["power_iters"])
    work = truncated_svd(m, n, k, method, *opts, gram) + t * truncated_svd(m, n, r, method, *opts, gram)
    work += t * (matmul(r, m, kk) + matmul(m, r, kk) + svd(m, kk))
    bases = t if p["exclude_self"] else 1
    cols = t * kk
    work += bases * svd(m, cols)
    c = min(m, cols)
    return work + t * (matmul(c, m, n) + matmul(m, c, n))


def tsv(
    m: int, n: int, t: int, method: str = "exact", oversample: int = 10, power_iters: int = 2, gram: bool = False
) -> float:
    k = tsv_rank(m, n, t)
    c = t * k
    work = t * truncated_svd(m, n, k, method, oversample, power_iters, gram)
    return work + polar(m, c) + polar(n, c) + matmul(m, c, n)


def iso_cts(m: int, n: int, t: int, common_fraction: float, gram: bool = False) -> float:
    common, per_task = iso_cts_split(m, n, t, common_fraction)
    work = svd(m, n)
    if per_task > 0:
        work += t * (matmul(common, m, n) + matmul(m, common, n) + exact_svd(m, n, per_task, gram))
    c = common + t * per_task
    return work + polar(m, c) + polar(n, c) + matmul(m, c, n)


def merge_flops(spec: ModelSpec, tasks: int, recipe: Recipe, method: str, impl: str = "pact_jax") -> float:
    """Nominal SVD + matmul flops of one merge of ``tasks`` checkpoints of ``spec`` by ``impl``
    (``'pact_jax'``, or a plain loop: ``'numpy'`` / ``'torch'``); 0 for TIES."""
    if not recipe.uses_svd:
        return 0.0
    gram = impl == "pact_jax"
    total = 0.0
    for _, m, n in matrix_views(spec):
        total += pact_subspace(m, n, tasks, recipe.pact, method, gram)
        if recipe.method == "tsv":
            total += tsv(m, n, tasks, method, recipe.pact["oversample"], recipe.pact["power_iters"], gram)
        else:
            total += iso_cts(m, n, tasks, recipe.merger["common_fraction"], gram)
    return total
