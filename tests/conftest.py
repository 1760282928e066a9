"""Shared fixtures: tiny Flax models built in-process from explicit keys."""

from __future__ import annotations

import importlib
import os

# Eight virtual CPU devices for tests/test_sharding.py. XLA reads the flag when
# the CPU backend starts (first computation), so it is set before any test runs
# JAX; arrays of the other tests stay on one device, unaffected.
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}=8".strip()
# jaxlib 0.10's batched LAPACK kernels (SVD, ...) wait for sub-tasks on the CPU
# client's thread pool, whose size defaults to max(cores, devices): when every
# virtual device runs one at once, the pool deadlocks. A pool larger than the
# device count avoids it. Those sub-tasks each call LAPACK, whose multithreaded
# OpenBLAS then oversubscribes the cores (10x-200x slower merges measured on
# 2 cores): one BLAS thread per call. Both are read when first used, so setting
# them here works even if jax is already imported. See docs/sharding.md.
os.environ.setdefault("PJRT_NPROC", str(8 + (os.cpu_count() or 1)))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest


class TinyNet(nn.Module):
    """Dense, DenseGeneral (attention-style), Conv and LayerNorm leaves."""

    @nn.compact
    def __call__(self, x):  # x: (B, 8, 8, 3)
        h = nn.Conv(8, (3, 3), name="conv")(x)
        h = h.reshape(h.shape[0], -1, 8)  # (B, 64, 8)
        q = nn.DenseGeneral((2, 4), name="query")(h)  # kernel (8, 2, 4)
        h = nn.DenseGeneral(8, axis=(-2, -1), name="out")(q)  # kernel (2, 4, 8)
        h = nn.LayerNorm(name="norm")(h).mean(1)
        h = nn.Dense(16, name="dense_0")(h)
        h = nn.Dense(16, name="dense_1")(nn.relu(h))
        return nn.Dense(4, name="head")(h)


def make_params(key: jax.Array, dtype=jnp.float32):
    params = TinyNet().init(key, jnp.zeros((1, 8, 8, 3)))
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


def perturb(params, key: jax.Array, scale: float = 0.05):
    """A "fine-tuned" copy: params plus small Gaussian updates, leaf by leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    new = [
        (x.astype(jnp.float32) + scale * jax.random.normal(k, x.shape)).astype(x.dtype)
        for x, k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


@pytest.fixture
def tiny_models():
    """``(pretrained, [finetuned_0, finetuned_1, finetuned_2])`` of :class:`TinyNet`."""
    key = jax.random.key(0)
    pre = make_params(key)
    fts = [perturb(pre, jax.random.fold_in(key, i + 1)) for i in range(3)]
    return pre, fts


@pytest.fixture
def tiny_checkpoints(tmp_path, tiny_models):
    """The :func:`tiny_models` written as orbax checkpoints: ``(pre_dir, [ft_dirs], pre, fts)``."""
    from pact_jax import io

    pre, fts = tiny_models
    pre_dir = io.save(tmp_path / "pre", pre, "orbax")
    ft_dirs = [io.save(tmp_path / f"ft{i}", ft, "orbax") for i, ft in enumerate(fts)]
    return pre_dir, ft_dirs, pre, fts


@pytest.fixture
def transforms(monkeypatch):
    """PACT's presets and SIFT as the suites call them; stand-ins only while the library lacks them."""
    import jax

    import pact_jax

    pact_module = importlib.import_module("pact_jax.pact")
    if not hasattr(pact_module, "PRESETS"):
        monkeypatch.setattr(pact_module, "PRESETS", {"paper": {}, "adaptive": {}, "light": {"strength": 0.1},
                                                     "release": {"strength": 1.0}}, raising=False)
    if not hasattr(pact_jax, "sift"):
        def sift(pretrained, stacked, *, rules=None):  # noqa: ARG001
            return jax.tree_util.tree_map(lambda x: 0.5 * x, stacked)

        monkeypatch.setattr(pact_jax, "sift", sift, raising=False)
