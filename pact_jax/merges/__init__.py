"""Merging methods: functions of stacked task vectors ``(T, ...)``.

A *merger* maps ``stacked -> delta`` (the merged update before ``alpha``; see
:func:`pact_jax.apply_delta`). A *transform* maps ``stacked -> stacked``
(:func:`dare` here, :func:`pact_jax.pact`). Every function takes
``rules: LeafRules``: leaves matched by ``rules.freeze`` get ``delta = 0``,
leaves matched by ``rules.average`` get the task mean, and transforms leave
both untouched.

Non-matrix leaves (biases, norms, and 1-D leaves in general) in the SVD-based
methods (:func:`tsv`, :func:`iso_c`, :func:`iso_cts`) are merged by the task
mean, as in the reference implementations of those papers.

The entry-wise methods (:func:`average`, :func:`task_arithmetic`, :func:`ties`,
:func:`dare`) take per-task weights and a ``convention``: ``'pact_jax'`` (the
default) or ``'mergekit'`` (mergekit 0.1.5's rules, so that a mergekit config
gives mergekit's numbers); docs/mergekit.md sets the two side by side.

The methods live one idea per file: :mod:`pact_jax.merges._common` (the
shared traversal and argument checks), :mod:`pact_jax.merges.entrywise`
(average, Task Arithmetic, TIES, DARE), :mod:`pact_jax.merges.tsv_m` (TSV-M)
and :mod:`pact_jax.merges.iso` (Iso-C, Iso-CTS); every name is re-exported
here, so ``pact_jax.merges.<name>`` is the API.
"""

from __future__ import annotations

from collections.abc import Callable

from pact_jax.merges._common import CONVENTIONS, Convention, _elementwise, _merge_by_kind
from pact_jax.merges.entrywise import (
    DareRescale,
    _dare_kernel,
    _ties_kernel,
    average,
    dare,
    task_arithmetic,
    ties,
    ties_keep_count,
    top_k_mask,
)
from pact_jax.merges.iso import (
    PolarMethod,
    _iso_c_kernel,
    _iso_cts_kernel,
    iso_c,
    iso_cts,
    iso_cts_split,
    newton_schulz_polar,
)
from pact_jax.merges.tsv_m import _tsv_kernel, tsv, tsv_rank, tsv_ranks
from pact_jax.tree import PyTree

__all__ = [
    "CONVENTIONS",
    "average",
    "task_arithmetic",
    "ties",
    "ties_keep_count",
    "top_k_mask",
    "dare",
    "tsv",
    "tsv_ranks",
    "iso_c",
    "iso_cts",
    "newton_schulz_polar",
    "tsv_rank",
    "iso_cts_split",
    "MERGERS",
    "Convention",
    "DareRescale",
    "PolarMethod",
]

# Private names other modules and tests reach as ``pact_jax.merges._name``: the shared
# traversal, and the kernels, whose identity keys the compiled-kernel caches
# (:func:`pact_jax.buckets.compile_count`). Listed so the imports count as used.
_REEXPORTED = (_merge_by_kind, _elementwise, _ties_kernel, _dare_kernel, _tsv_kernel, _iso_c_kernel, _iso_cts_kernel)


MERGERS: dict[str, Callable[..., PyTree]] = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "tsv": tsv,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
}
