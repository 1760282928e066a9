"""LoRA factors: task vectors ``s · B A`` without the dense stack (issue 16).

A LoRA adapter changes a linear layer's torch weight ``W (d_out, d_in)`` by
``delta = s · B A`` with ``A (r, d_in)``, ``B (d_out, r)`` and the scale
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA): PEFT's
convention, kept here as :class:`LoraFactors`. A checkpoint that stores the
layer as a Flax kernel ``(d_in, d_out)`` (or a PEFT ``fan_in_fan_out`` GPT-2
``Conv1D``) holds the transpose; ``layout="flax"`` below means "stored as
``(d_in, d_out)``".

What is here (all per leaf path, ``T`` tasks stacked on a leading axis):

* :func:`stack_factors`: the tasks' factors of one leaf on a task axis, ranks
  padded with zeros (a task without an adapter on that leaf has zero factors:
  its task vector there is zero);
* :func:`row_space`: PACT's LoRA variant (DESIGN §1a step 9): task t's explicit
  space is the row space of its ``A`` (k = r), in place of the top-k SVD of
  the dense ``delta_t``; :func:`column_space` is the same for ``B`` (the output
  side);
* factor-aware mergers :func:`task_arithmetic` (``sum_t s_t B_t A_t``),
  :func:`average` and :func:`tsv` (TSV-M from a QR of ``B`` and of ``A^T`` and an
  ``r x r`` core SVD per task, never a ``(T, d_out, d_in)`` stack);
* :func:`truncate`: a merged delta back to a rank-``r`` adapter.

Reading and writing PEFT folders is :mod:`pact_jax.io.peft`; merging adapters
into their base on disk is :func:`pact_jax.io.peft.merge_adapters`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pact_jax import linalg
from pact_jax.merges import tsv_ranks
from pact_jax.tree import PactInputError

Layout = Literal["torch", "flax"]

__all__ = [
    "LoraFactors",
    "average",
    "column_space",
    "dense_delta",
    "row_space",
    "stack_factors",
    "task_arithmetic",
    "truncate",
    "tsv",
]


class LoraFactors(NamedTuple):
    """One LoRA update ``delta = scale * b @ a`` of a torch weight ``(d_out, d_in)``.

    Unstacked: ``a (r, d_in)``, ``b (d_out, r)``, ``scale`` a float. Stacked
    (:func:`stack_factors`): ``a (T, r, d_in)``, ``b (T, d_out, r)``, ``scale (T,)``.
    """

    a: Any
    b: Any
    scale: Any


def _check_layout(layout: str) -> None:
    if layout not in ("torch", "flax"):
        raise ValueError(f"layout must be 'torch' (stored (d_out, d_in)) or 'flax' (stored (d_in, d_out)), got {layout!r}.")


def dense_delta(f: LoraFactors, *, layout: Layout = "torch", dtype: Any = jnp.float32) -> jax.Array:
    """``scale * b @ a``: ``(d_out, d_in)`` for ``layout='torch'``, its transpose for ``'flax'``.

    Stacked factors give ``(T, d_out, d_in)`` (resp. ``(T, d_in, d_out)``).
    Computed in ``dtype`` (float32 by default, also for bf16 factors).
    """
    _check_layout(layout)
    a, b = jnp.asarray(f.a, dtype), jnp.asarray(f.b, dtype)
    scale = jnp.asarray(f.scale, dtype)
    if a.ndim == 3:
        out = scale[:, None, None] * jnp.einsum("tor,tri->toi", b, a)
    else:
        out = scale * (b @ a)
    return jnp.swapaxes(out, -1, -2) if layout == "flax" else out


def stack_factors(adapters: Sequence[Mapping[str, LoraFactors]]) -> dict[str, LoraFactors]:
    """Per leaf path, the ``T`` tasks' factors on a leading task axis (float32 NumPy arrays).

    ``a (T, r, d_in)``, ``b (T, d_out, r)``, ``scale (T,)`` with ``r`` the largest
    rank at that path; smaller ranks are padded with zero rows of ``a`` and
    zero columns of ``b``; a task without factors at that path gets zeros
    (its task vector there is zero). Every path of any adapter appears.

    Raises:
      PactInputError: the tasks disagree on a path's ``(d_out, d_in)``.
    """
    if not adapters:
        raise PactInputError("stack_factors needs at least one adapter.")
    paths = list(dict.fromkeys(p for ad in adapters for p in ad))
    out = {}
    for path in paths:
        present = [(t, ad[path]) for t, ad in enumerate(adapters) if path in ad]
        shapes = {(np.shape(f.b)[0], np.shape(f.a)[1]) for _, f in present}
        if len(shapes) > 1:
            raise PactInputError(f"leaf '{path}': the adapters disagree on its (d_out, d_in): {sorted(shapes)}.")
        (d_out, d_in), = shapes
        r = max(np.shape(f.a)[0] for _, f in present)
        a = np.zeros((len(adapters), r, d_in), np.float32)
        b = np.zeros((len(adapters), d_out, r), np.float32)
        scale = np.zeros((len(adapters),), np.float32)
        for t, f in present:
            rt = np.shape(f.a)[0]
            a[t, :rt] = np.asarray(f.a, np.float32)
            b[t, :, :rt] = np.asarray(f.b, np.float32)
            scale[t] = float(f.scale)
        out[path] = LoraFactors(a, b, scale)
    return out


@jax.jit
def row_space(a: jax.Array) -> jax.Array:
    """Orthonormal bases of the row spaces of ``a (T, r, d_in) -> (T, d_in, r)``.

    Right singular vectors of each ``A_t``; a direction whose singular value is
    at rounding level (:func:`pact_jax.linalg.significant`, relative to that
    task's largest) is a zero column, so rank-deficient, zero-padded or absent
    (all-zero) factors give zero columns, as PACT's kernels expect.
    """
    a = jnp.asarray(a, jnp.promote_types(a.dtype, jnp.float32))
    _, s, vh = linalg.svd(a)  # (T, min(r, d)), (T, min(r, d), d)
    keep = linalg.significant(s, s[:, :1], max(a.shape[-2:]))
    v = jnp.swapaxes(vh, -1, -2) * keep[:, None, :].astype(a.dtype)
    r = a.shape[-2]
    if v.shape[-1] < r:  # r > d_in: pad to r columns
        v = jnp.pad(v, ((0, 0), (0, 0), (0, r - v.shape[-1])))
    return v


def column_space(b: jax.Array) -> jax.Array:
    """Orthonormal bases of the column spaces of ``b (T, d_out, r) -> (T, d_out, r)`` (see :func:`row_space`)."""
    return row_space(jnp.swapaxes(b, -1, -2))


def _tasks_svd(f: LoraFactors) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD of every ``s_t B_t A_t`` from its factors: ``U (T, d_out, r)``, ``S (T, r)``, ``V (T, d_in, r)``.

    ``B = Q_b R_b``, ``A^T = Q_a R_a`` (reduced QR), ``s R_b R_a^T = U_c S V_c^T``
    (an ``r x r`` SVD), so ``s B A = (Q_b U_c) S (Q_a V_c)^T``. Assumes
    ``r <= min(d_out, d_in)``.
    """
    qb, rb = jnp.linalg.qr(f.b)  # (T, d_out, r), (T, r, r)
    qa, ra = jnp.linalg.qr(jnp.swapaxes(f.a, -1, -2))  # (T, d_in, r), (T, r, r)
    core = f.scale[:, None, None] * (rb @ jnp.swapaxes(ra, -1, -2))
    uc, s, vch = linalg.svd(core)
    return qb @ uc, s, qa @ jnp.swapaxes(vch, -1, -2)


def _orient(x: jax.Array, layout: Layout) -> jax.Array:
    return x.T if layout == "flax" else x


@jax.jit
def _sum_kernel(a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    # sum_t s_t B_t A_t = [B_1 .. B_T] diag(s) [A_1; ..; A_T]: one (d_out, T r) x (T r, d_in) product.
    t, d_out, r = b.shape
    b_cat = jnp.moveaxis(b * scale[:, None, None], 0, 1).reshape(d_out, t * r)
    return b_cat @ a.reshape(t * r, -1)


def _as_f32(f: LoraFactors) -> LoraFactors:
    return LoraFactors(*(jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32)) for x in f))


def task_arithmetic(
    stacked: Mapping[str, LoraFactors], *, layout: Layout | Mapping[str, Layout] = "torch"
) -> dict[str, jax.Array]:
    """Task Arithmetic from factors: per path ``delta = sum_t s_t B_t A_t`` (``(d_out, d_in)``,
    transposed where ``layout`` says ``'flax'``), equal to :func:`pact_jax.merges.task_arithmetic`
    of the dense task vectors, without building them."""
    return {p: _orient(_sum_kernel(*_as_f32(f)), _layout_of(layout, p)) for p, f in stacked.items()}


def average(
    stacked: Mapping[str, LoraFactors], *, layout: Layout | Mapping[str, Layout] = "torch"
) -> dict[str, jax.Array]:
    """Weight averaging from factors: ``delta = (1/T) sum_t s_t B_t A_t``."""
    return {p: d / stacked[p].a.shape[0] for p, d in task_arithmetic(stacked, layout=layout).items()}


def _layout_of(layout: Layout | Mapping[str, Layout], path: str) -> Layout:
    out = layout if isinstance(layout, str) else layout.get(path, "torch")
    _check_layout(out)
    return out


@functools.partial(jax.jit, static_argnames=("ranks",))
def _tsv_kernel(a: jax.Array, b: jax.Array, scale: jax.Array, *, ranks: tuple[int, ...]) -> jax.Array:
    """TSV-M of ``s_t B_t A_t`` (see :func:`tsv`): ``(d_out, d_in)``."""
    t, d_out, r = b.shape
    d_in = a.shape[-1]
    u, s, v = _tasks_svd(LoraFactors(a, b, scale))  # (T, d_out, r), (T, r), (T, d_in, r)
    k = min(max(ranks), r)
    u, s, v = u[..., :k], s[:, :k], v[..., :k]
    keep = linalg.significant(s, s.max(), max(d_out, d_in))
    keep = keep & (jnp.arange(k)[None, :] < jnp.asarray(ranks)[:, None])
    keep = keep.astype(u.dtype)
    u_cat = jnp.moveaxis(u * keep[:, None, :], 0, 1).reshape(d_out, t * k)
    v_cat = jnp.moveaxis(v * keep[:, None, :], 0, 1).reshape(d_in, t * k)
    return (linalg.polar(u_cat) * (s * keep).reshape(t * k)) @ linalg.polar(v_cat).T


def tsv(
    stacked: Mapping[str, LoraFactors],
    *,
    spread_remainder: bool = False,
    layout: Layout | Mapping[str, Layout] = "torch",
) -> dict[str, jax.Array]:
    """TSV-M (:func:`pact_jax.merges.tsv`, exact SVD) from factors.

    Per path: each task's SVD ``s_t B_t A_t = U_t S_t V_t^T`` from a QR of
    ``B_t`` and of ``A_t^T`` and an ``r x r`` core SVD; its top
    ``floor(min(d_out, d_in) / T)`` triplets (at most ``r`` are non-zero;
    :func:`pact_jax.merges.tsv_ranks`); ``delta = polar([U_t]) diag([S_t])
    polar([V_t])^T`` from ``(d, T r)`` concatenations. Triplets at rounding level
    are dropped as in the dense merger, so the result equals it up to rounding.
    TSV-M commutes with transposition, so the stored orientation only
    transposes the result (``layout``).
    """
    out = {}
    for p, f in stacked.items():
        f = _as_f32(f)
        t, d_out, r = f.b.shape
        d_in = f.a.shape[-1]
        if r > min(d_out, d_in):
            raise PactInputError(f"leaf '{p}': LoRA rank {r} exceeds min(d_out, d_in) = {min(d_out, d_in)}.")
        ranks = tsv_ranks(d_out, d_in, t, spread_remainder)
        out[p] = _orient(_tsv_kernel(f.a, f.b, f.scale, ranks=ranks), _layout_of(layout, p))
    return out


def truncate(
    delta: jax.Array, rank: int, *, lora_alpha: float | None = None, layout: Layout = "torch"
) -> LoraFactors:
    """The rank-``rank`` adapter closest to ``delta`` in Frobenius norm (truncated SVD).

    ``delta`` is ``(d_out, d_in)`` (``layout='torch'``) or stored transposed
    (``'flax'``). With ``delta = U S V^T``: ``b = U_r sqrt(S_r) / scale``,
    ``a = sqrt(S_r) V_r^T`` (balanced factors), ``scale = lora_alpha / rank``
    (1 when ``lora_alpha`` is ``None``), so ``scale * b @ a`` is the truncation.
    Returns float32 factors; ``rank`` is capped at ``min(d_out, d_in)``.
    """
    _check_layout(layout)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    d = jnp.asarray(delta, jnp.float32)
    d = d.T if layout == "flax" else d
    rank = int(min(rank, *d.shape))
    f = linalg.exact_svd(d, rank)
    root = jnp.sqrt(f.s)
    scale = 1.0 if lora_alpha is None else float(lora_alpha) / rank
    return LoraFactors(a=root[:, None] * f.vh, b=f.u * (root / scale)[None, :], scale=scale)
