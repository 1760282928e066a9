"""pact_jax: merge fine-tuned JAX/Flax checkpoints, with PACT pre-processing.

Pure functions over parameter pytrees. Task vectors are one stacked pytree
(leaves ``(T, ...)``); transforms map stacked -> stacked, mergers map
stacked -> delta, and :func:`chain` composes them into a merge function.
"""

from pact_jax import runtime

# Before any JAX computation starts the CPU backend: jaxlib 0.10 deadlocks on a
# small CPU thread pool, and nested OpenBLAS threads make CPU SVDs 10-100x
# slower (see pact_jax/runtime.py).
runtime.configure_cpu_runtime()

from pact_jax import alpha, layout, linalg, lora, merges, mergekit, scope
from pact_jax.alpha import AlphaSearch, alpha_grid, search_alpha
from pact_jax.chain import chain
from pact_jax.linalg import randomized_svd
from pact_jax.pact import PRESETS as PACT_PRESETS
from pact_jax.pact import lbw_statistics, pact, pact_preset
from pact_jax.sift import sift
from pact_jax.tree import (
    DEFAULT_RULES,
    LeafRules,
    PactInputError,
    apply_delta,
    check_finite,
    task_vectors,
)

__version__ = "0.1.0"

__all__ = [
    "AlphaSearch",
    "DEFAULT_RULES",
    "LeafRules",
    "PactInputError",
    "alpha_grid",
    "apply_delta",
    "chain",
    "check_finite",
    "layout",
    "lbw_statistics",
    "linalg",
    "lora",
    "merges",
    "mergekit",
    "PACT_PRESETS",
    "pact",
    "pact_preset",
    "sift",
    "randomized_svd",
    "scope",
    "search_alpha",
    "task_vectors",
]
