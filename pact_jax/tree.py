"""Parameter pytrees: validation, task vectors, leaf rules and matrix views.

Everything here is about *which* leaf is what and *how* it is seen; the math of
each method lives in :mod:`pact_jax.merges` and :mod:`pact_jax.pact`.

Conventions
-----------
* A *stacked* pytree has the structure of the parameters and every leaf carries
  a leading task axis: ``(T, *leaf.shape)``.
* Leaf paths are written ``"params/Dense_0/kernel"`` (``/``-joined key path);
  the regular expressions of :class:`LeafRules` are matched against them with
  :func:`re.search`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from pact_jax import layout as _layout
from pact_jax.layout import Layout

PyTree = Any
LeafKind = Literal["freeze", "average", "matrix", "other"]


class PactInputError(ValueError):
    """Bad input to a merge: the message names the leaf path and the problem."""


# --------------------------------------------------------------------------
# Paths


def path_str(keypath: tuple) -> str:
    """``(DictKey('params'), DictKey('Dense_0'), ...)`` -> ``'params/Dense_0/...'``."""
    return jax.tree_util.keystr(keypath, simple=True, separator="/") or "<root>"


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """Flattened ``[(path, leaf), ...]`` in the tree's canonical leaf order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in flat]


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """The PRNG key of the leaf at ``path``: ``fold_in(key, crc32(path))``.

    Derived from the path, not the leaf's position, so merging a sub-tree (a
    streamed bucket, a filtered model) draws the same randomness per leaf as
    merging the whole tree.
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


# --------------------------------------------------------------------------
# Validation


def check_finite(tree: PyTree, what: str) -> None:
    """Raise :class:`PactInputError` naming the first leaf holding NaN or Inf.

    Skipped for leaves that are tracers (inside ``jax.jit``), where values are
    not known; call the merge eagerly once, or this function, to validate.
    Concrete leaves closed over by a jitted function (``jax.jit(partial(merge,
    pretrained))``) are checked at trace time.
    """
    for path, leaf in leaves_with_paths(tree):
        if not _is_concrete(leaf):
            continue
        arr = jnp.asarray(leaf)
        if not jnp.issubdtype(arr.dtype, jnp.inexact):
            continue
        with jax.ensure_compile_time_eval():  # inside a trace, jnp on a constant would stage a tracer
            finite = bool(jnp.isfinite(arr).all())
            n_nan, n_inf = (0, 0) if finite else (int(jnp.isnan(arr).sum()), int(jnp.isinf(arr).sum()))
        if not finite:
            raise PactInputError(
                f"{what}: leaf '{path}' holds non-finite values "
                f"({n_nan} NaN, {n_inf} Inf of {arr.size} entries)."
            )


def check_floating(tree: PyTree, what: str) -> None:
    for path, leaf in leaves_with_paths(tree):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise PactInputError(
                f"{what}: leaf '{path}' has dtype {jnp.result_type(leaf)}; only floating "
                "point parameters can be merged (pact_jax.chain and recipes.make_merge keep integer leaves at "
                "their pre-trained value; drop them before calling this function)."
            )


def check_same_structure(reference: PyTree, other: PyTree, ref_name: str, name: str) -> None:
    """Same tree structure; on mismatch the error names the paths that differ."""
    ref_struct = jax.tree_util.tree_structure(reference)
    struct = jax.tree_util.tree_structure(other)
    if ref_struct == struct:
        return
    ref_paths = {p for p, _ in leaves_with_paths(reference)}
    paths = {p for p, _ in leaves_with_paths(other)}
    missing = sorted(ref_paths - paths)
    extra = sorted(paths - ref_paths)
    detail = []
    if missing:
        detail.append(f"missing leaves {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    if extra:
        detail.append(f"unexpected leaves {extra[:5]}" + (" ..." if len(extra) > 5 else ""))
    if not detail:
        detail.append(f"containers differ: {ref_struct} vs {struct}")
    raise PactInputError(f"{name} does not match the tree structure of {ref_name}: " + "; ".join(detail))


def check_same_leaves(reference: PyTree, other: PyTree, ref_name: str, name: str) -> None:
    """Same structure, and every leaf of the same shape and dtype."""
    check_same_structure(reference, other, ref_name, name)
    for (path, a), (_, b) in zip(leaves_with_paths(reference), leaves_with_paths(other)):
        if jnp.shape(a) != jnp.shape(b):
            raise PactInputError(
                f"{name}: leaf '{path}' has shape {jnp.shape(b)} but {ref_name} has {jnp.shape(a)}."
            )
        if jnp.result_type(a) != jnp.result_type(b):
            raise PactInputError(
                f"{name}: leaf '{path}' has dtype {jnp.result_type(b)} but {ref_name} has "
                f"{jnp.result_type(a)}; cast the checkpoints to one dtype before merging."
            )


def num_tasks(stacked: PyTree, what: str = "stacked task vectors") -> int:
    """The common leading axis ``T`` of a stacked pytree (validated)."""
    leaves = leaves_with_paths(stacked)
    if not leaves:
        raise PactInputError(f"{what}: the tree has no leaves.")
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise PactInputError(f"{what}: leaf '{path}' is a scalar; expected a leading task axis (T, ...).")
        sizes.setdefault(shape[0], path)
    if len(sizes) > 1:
        raise PactInputError(
            f"{what}: leaves disagree on the number of tasks (leading axis): "
            + ", ".join(f"'{p}' has T={t}" for t, p in sizes.items())
        )
    (t,) = sizes
    if t == 0:
        raise PactInputError(f"{what}: the task axis is empty (T=0); pass at least one task.")
    return int(t)


def validate_stacked(stacked: PyTree, what: str = "stacked task vectors") -> int:
    """Checks a stacked pytree (floating, common ``T >= 1``, finite) and returns ``T``."""
    check_floating(stacked, what)
    t = num_tasks(stacked, what)
    check_finite(stacked, what)
    return t


MAX_ALPHA = 1e6  # |alpha| beyond this is not a merge; float32 overflows near 3e38 / |delta|


def check_alpha(alpha: Any, name: str = "alpha") -> None:
    """A concrete ``alpha`` must be a finite real number with ``|alpha| <= MAX_ALPHA`` (a traced one,
    e.g. in a jitted sweep over alpha, is not known here and is not checked)."""
    if isinstance(alpha, jax.core.Tracer):
        return
    try:
        if isinstance(alpha, (str, bytes, bool)):
            raise TypeError
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {alpha!r}.") from None
    if not math.isfinite(value) or abs(value) > MAX_ALPHA:
        raise ValueError(f"{name} must be a finite number with |{name}| <= {MAX_ALPHA:g}, got {alpha!r}.")


def check_fraction(value: float, name: str, *, allow_zero: bool = False) -> float:
    """``value`` must lie in ``(0, 1]`` (or ``[0, 1]`` with ``allow_zero``)."""
    is_number = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    lo_ok = is_number and (value >= 0 if allow_zero else value > 0)
    if not (lo_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")
    return float(value)


# --------------------------------------------------------------------------
# Task vectors


def check_task_list(pretrained: PyTree, finetuned: Sequence[PyTree], *, finite: bool = True) -> None:
    """The checks of :func:`task_vectors`: a non-empty sequence of fine-tuned
    pytrees with ``pretrained``'s structure, shapes and float dtypes, all
    finite (``finite=False``: every check but that pass over the values)."""
    if isinstance(finetuned, dict) or not isinstance(finetuned, Sequence) or isinstance(finetuned, str):
        raise PactInputError(
            "finetuned must be a sequence (list or tuple) of parameter pytrees, one per task; "
            f"got {type(finetuned).__name__}."
        )
    if len(finetuned) == 0:
        raise PactInputError("finetuned is empty: pass at least one fine-tuned checkpoint.")
    check_floating(pretrained, "pretrained")
    if finite:
        check_finite(pretrained, "pretrained")
    for i, ft in enumerate(finetuned):
        check_same_leaves(pretrained, ft, "pretrained", f"finetuned[{i}]")
        if finite:
            check_finite(ft, f"finetuned[{i}]")


def task_vectors(
    pretrained: PyTree,
    finetuned: Sequence[PyTree],
    *,
    dtype: Any = jnp.float32,
) -> PyTree:
    """Stacked task vectors ``tau_t = W_t - W0``.

    Args:
      pretrained: parameter pytree ``W0``.
      finetuned: ``T >= 1`` pytrees with the structure, shapes and dtypes of
        ``pretrained``.
      dtype: dtype of the task vectors. The difference is taken in this dtype
        (float32 by default, also for bfloat16 checkpoints, so small updates
        are not rounded away).

    Returns:
      One pytree whose leaves are ``(T, *leaf.shape)`` arrays of ``dtype``.

    Raises:
      PactInputError: empty task list, structure/shape/dtype mismatch, a
        non-floating leaf, or NaN/Inf in any input (names the leaf path).
    """
    check_task_list(pretrained, finetuned)

    def diff(w0, *wts):
        w0 = jnp.asarray(w0, dtype)
        return jnp.stack([jnp.asarray(w, dtype) - w0 for w in wts])

    return jax.tree_util.tree_map(diff, pretrained, *finetuned)


def apply_delta(pretrained: PyTree, delta: PyTree, alpha: float | jax.Array = 1.0) -> PyTree:
    """``W0 + alpha * delta``, computed in float32 and returned in each leaf's dtype.

    Args:
      pretrained: parameter pytree ``W0``.
      delta: merged update with the structure and shapes of ``pretrained``.
      alpha: scaling coefficient (Python or traced scalar).
    """
    check_alpha(alpha)
    check_same_structure(pretrained, delta, "pretrained", "delta")
    for (path, w0), (_, d) in zip(leaves_with_paths(pretrained), leaves_with_paths(delta)):
        if jnp.shape(w0) != jnp.shape(d):
            raise PactInputError(f"delta: leaf '{path}' has shape {jnp.shape(d)}, pretrained has {jnp.shape(w0)}.")

    def add(w0, d):
        w0 = jnp.asarray(w0)
        compute = jnp.promote_types(w0.dtype, jnp.float32)
        out = w0.astype(compute) + jnp.asarray(alpha, compute) * jnp.asarray(d).astype(compute)
        return out.astype(w0.dtype)

    return jax.tree_util.tree_map(add, pretrained, delta)


# --------------------------------------------------------------------------
# Leaf rules and matrix views


@dataclasses.dataclass(frozen=True)
class LeafRules:
    """Which leaves are matrices, which are averaged, which are left untouched.

    Regular expressions are matched with :func:`re.search` against leaf paths
    such as ``"params/encoder/block_0/attn/query/kernel"``; a rule matches
    a Flax NNX leaf ``.../kernel/value`` if it matches the path or the path
    without its variable suffix (:func:`pact_jax.layout.rule_path`), so
    ``(^|/)bias$`` matches ``attn/out/bias/value``. Precedence:
    ``freeze`` > ``average`` > ``matrix``.

    Attributes:
      matrix: leaves with at least two dimensions whose path matches are seen
        as matrices by the SVD-based methods and PACT's subspace perspective.
        Other leaves follow each method's documented non-matrix rule.
      not_matrix: leaves whose path matches are never matrices, even when
        ``matrix`` matches; by default biases (DenseGeneral biases are 2-D).
      average: leaves merged by the plain task mean (delta = mean_t tau_t)
        whatever the method; transforms leave them unchanged. E.g.
        ``r"embedding|pos_emb"`` for embeddings.
      freeze: leaves kept at the pre-trained value (delta = 0).
      row_axes: ``((regex, k), ...)``: for a matching leaf of shape ``s`` the
        matrix view is ``(prod(s[:k]), prod(s[k:]))``. An entry applies only
        to leaves with more than ``k`` dimensions; the first that applies
        wins; without one, :func:`pact_jax.layout.default_row_axes`: Flax
        Dense ``(in, out)`` and DenseGeneral ``(d, heads, head_dim)`` use
        ``k = 1``, Flax Conv ``(kh, kw, cin, cout)`` (and a conv-named
        module's 1-D ``(k, cin, cout)``) ``k = ndim - 1``; torch weights
        ``(out, in)`` and ``(out, in, kh, kw)`` ``k = 1``.
        The default entry maps Flax attention output kernels
        ``(heads, head_dim, d)`` to ``(heads*head_dim, d)`` and leaves a 2-D
        ``out/kernel`` (T5X's ``(d, d)``) as it is.
      layout: how the checkpoint stores a linear map (:mod:`pact_jax.layout`):
        ``"flax"`` (kernel ``(d_in, d_out)``: the matrix view's rows are the
        input space) or ``"torch"`` (weight ``(d_out, d_in)``: its columns
        are; embedding tables keep their rows). Every side-dependent step
        asks :meth:`input_side` (PACT's and SIFT's protected input space,
        Iso-CTS's output-side common subspace), never a fixed side;
        :func:`pact_jax.layout.detect_layout` reads it from a checkpoint.
    """

    matrix: str = r".*"
    not_matrix: str | None = r"(^|/)bias$"
    average: str | None = None
    freeze: str | None = None
    row_axes: tuple[tuple[str, int], ...] = ((r"(^|/)out/kernel$", 2),)
    layout: Layout = "flax"

    def __post_init__(self) -> None:
        _layout.check_layout(self.layout, what="LeafRules.layout")

    @staticmethod
    def _match(pattern: str, path: str) -> bool:
        if re.search(pattern, path):
            return True
        bare = _layout.rule_path(path)  # a Flax NNX leaf without its '/value'
        return bare != path and bool(re.search(pattern, bare))

    def input_side(self, path: str) -> Literal["left", "right"]:
        """Which side of the ``(m, n)`` matrix view of ``path`` is the layer's input space:
        ``"left"`` (rows, left singular vectors) for Flax kernels, ``"right"`` for torch weights
        (:func:`pact_jax.layout.input_side`)."""
        return _layout.input_side(path, self.layout)

    def flax_axes(self, path: str, shape: Sequence[int]) -> tuple[int, ...]:
        """Axes that put a leaf of ``shape`` in Flax order (:func:`pact_jax.layout.to_flax_axes`)."""
        return _layout.to_flax_axes(path, shape, self.layout)

    def output_side(self, path: str) -> Literal["left", "right"]:
        """The other side of :meth:`input_side`."""
        return "right" if self.input_side(path) == "left" else "left"

    def kind(self, path: str, shape: Sequence[int]) -> LeafKind:
        """``'freeze' | 'average' | 'matrix' | 'other'`` for a leaf of per-task ``shape``."""
        if self.freeze is not None and self._match(self.freeze, path):
            return "freeze"
        if self.average is not None and self._match(self.average, path):
            return "average"
        if (
            len(shape) >= 2
            and self._match(self.matrix, path)
            and not (self.not_matrix is not None and self._match(self.not_matrix, path))
        ):
            return "matrix"
        return "other"

    def matrix_shape(self, path: str, shape: Sequence[int]) -> tuple[int, int]:
        """``(m, n)`` view of a leaf of shape ``shape`` (at least 2-D)."""
        k = _layout.default_row_axes(path, shape, self.layout)
        for pattern, rows in self.row_axes:
            if rows < len(shape) and self._match(pattern, path):
                k = rows
                break
        if not 1 <= k < len(shape):
            raise PactInputError(
                f"leaf '{path}' of shape {tuple(shape)}: row_axes={k} leaves no column axis."
            )
        return math.prod(shape[:k]), math.prod(shape[k:])


DEFAULT_RULES = LeafRules()
