"""A small Flax Vision Transformer: the encoder that the quality benchmark merges.

``ViTEncoder``: patch embedding (a strided ``Conv``), a learned ``cls`` token
and position embedding, ``depth`` pre-norm transformer blocks (Flax
``MultiHeadDotProductAttention`` + a GELU MLP), a final ``LayerNorm``; it
returns the ``cls`` feature. Each task has its own linear head
(:func:`head_logits`), which is never merged, as in the CLIP-ViT protocol.

Leaf paths (under ``params/``): ``patch_embed/kernel`` ``(p, p, 3, d)``,
``cls`` ``(1, 1, d)``, ``pos_emb`` ``(1, N + 1, d)``,
``block_i/{ln_1, ln_2}/{scale, bias}``, ``block_i/attn/{query, key, value}/kernel``
``(d, heads, d/heads)``, ``block_i/attn/out/kernel`` ``(heads, d/heads, d)``,
``block_i/mlp_{in, out}/kernel``, ``ln_final``.
:data:`MERGE_RULES` makes every kernel a matrix and treats ``cls`` / ``pos_emb``
like biases (merged by each method's non-matrix rule).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

import pact_jax

# Kernels are matrices (DenseGeneral / attention-out / Conv views by the default
# rules); biases, LayerNorm and the cls / position embeddings are not.
MERGE_RULES = pact_jax.LeafRules(not_matrix=r"(^|/)(bias|cls|pos_emb)$")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image: int = 16
    patch: int = 4
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp: int = 256

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1


class Block(nn.Module):
    width: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.LayerNorm(name="ln_1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h)
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.gelu(nn.Dense(self.mlp, name="mlp_in")(h))
        return x + nn.Dense(self.width, name="mlp_out")(h)


class ViTEncoder(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """``images (B, H, W, 3)`` in ``[0, 1]`` -> ``cls`` features ``(B, width)``."""
        c = self.cfg
        x = nn.Conv(c.width, (c.patch, c.patch), strides=(c.patch, c.patch), padding="VALID", name="patch_embed")(
            images - 0.5
        )
        b = x.shape[0]
        x = x.reshape(b, -1, c.width)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.width)), x], axis=1)
        x = x + self.param("pos_emb", nn.initializers.normal(0.02), (1, c.tokens, c.width))
        for i in range(c.depth):
            x = Block(c.width, c.heads, c.mlp, name=f"block_{i}")(x)
        return nn.LayerNorm(name="ln_final")(x[:, 0])


def init_encoder(key: jax.Array, cfg: ViTConfig):
    return ViTEncoder(cfg).init(key, jnp.zeros((1, cfg.image, cfg.image, 3)))


def init_head(key: jax.Array, width: int, classes: int):
    """A linear head ``{'kernel' (width, classes), 'bias' (classes,)}``, zero-initialised bias."""
    return {"kernel": jax.random.normal(key, (width, classes)) / jnp.sqrt(width), "bias": jnp.zeros((classes,))}


def head_logits(head, feats: jax.Array, num_classes: jax.Array | int | None = None) -> jax.Array:
    """Logits ``(B, classes)``; columns at or past ``num_classes`` (padding) are masked to ``-inf``."""
    logits = feats @ head["kernel"] + head["bias"]
    if num_classes is not None:
        valid = jnp.arange(logits.shape[-1]) < num_classes
        logits = jnp.where(valid, logits, -jnp.inf)
    return logits


def encode(cfg: ViTConfig, params, images: jax.Array) -> jax.Array:
    return ViTEncoder(cfg).apply(params, images)


def param_count(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
