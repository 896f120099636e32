"""Text encoder for the contrastive loss.

Bidirectional (no causal or padding mask) with the *last* position pooled, as SigLIP and
big_vision's text tower: every sequence is padded to the fixed context length, so the last
position is a pad slot that attends to the whole caption. The same computation is open_clip's
`TextTransformer(no_causal_mask=True, pool_type="last")` and transformers' `SiglipTextModel`,
so it exports without custom code.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ov3.models.layers import Dtype, LayerNorm, Transformer, dense_init


def token_embedding(vocab_size: int, width: int, dtype: Dtype, name: str) -> nn.Embed:
    return nn.Embed(vocab_size, width, dtype=dtype, name=name, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")))


def learned_positions(module: nn.Module, length: int, width: int) -> jax.Array:
    return module.param("positional_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), (None, "embed")), (length, width))


class TextEncoder(nn.Module):
    vocab_size: int
    context_length: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    embed_dim: int
    remat: str = "none"
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" | "cudnn"

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids (B, context_length) int32 -> (B, embed_dim), not normalised."""
        x = token_embedding(self.vocab_size, self.width, self.dtype, "token_embedding")(ids)
        x = x + learned_positions(self, self.context_length, self.width).astype(x.dtype)
        x = Transformer(self.depth, self.num_heads, self.mlp_dim, self.remat, self.dtype, self.attention,
                        name="transformer")(x)
        # The contrastive head in float32 whatever the compute dtype (as OpenVision's heads).
        pooled = LayerNorm(jnp.float32, name="ln_final")(x[:, -1])
        return nn.Dense(self.embed_dim, use_bias=False, dtype=jnp.float32, name="text_projection",
                        kernel_init=dense_init(("embed", None)))(pooled)
