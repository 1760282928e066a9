"""Path helpers shared by the NumPy reference implementations in the tests.

They restate the default :class:`pact_jax.LeafRules` independently (no import
from the library) so a reference cannot inherit a library bug.
"""

from __future__ import annotations


def np_path(keypath) -> str:
    """``(DictKey('params'), DictKey('dense'), ...)`` -> ``'params/dense/...'``."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def np_is_matrix(path: str, shape) -> bool:
    """Default rules: >= 2-D leaves are matrices, except leaves named ``bias``."""
    return len(shape) >= 2 and not path.split("/")[-1] == "bias"


def np_matrix_shape(path: str, shape) -> tuple[int, int]:
    """Dense (in, out) as is; Conv (kh, kw, cin, cout) -> (kh*kw*cin, cout);
    attention output kernel '.../out/kernel' (heads, head_dim, d) -> (heads*head_dim, d);
    other 3-D (d, heads, head_dim) -> (d, heads*head_dim)."""
    shape = tuple(shape)
    if len(shape) == 2:
        return shape
    if len(shape) == 3:
        if path == "out/kernel" or path.endswith("/out/kernel"):
            return shape[0] * shape[1], shape[2]
        return shape[0], shape[1] * shape[2]
    if len(shape) == 4:
        return shape[0] * shape[1] * shape[2], shape[3]
    raise AssertionError(f"no reference view for {shape}")
