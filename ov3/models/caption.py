"""Autoregressive caption decoder conditioned on the unified image tokens.

Conditioning is an image-token *prefix* (prefix-LM, as OpenVision 2): the projected image
tokens come first and attend to each other; caption tokens attend to every image token and
causally to earlier caption tokens. One block type serves all towers, and the caption gradient
reaches every image token through plain self-attention (CoCa's cross-attention would add a
second block type and a second set of K/V projections for the same effect).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ov3.models.layers import Dtype, LayerNorm, Transformer, dense_init, zeros_init
from ov3.models.text import learned_positions, token_embedding


def prefix_lm_mask(num_prefix: int, num_text: int) -> jax.Array:
    """(1, 1, T, T) boolean mask; True = may attend."""
    total = num_prefix + num_text
    q = jnp.arange(total)[:, None]
    k = jnp.arange(total)[None, :]
    return ((k < num_prefix) | (q >= k))[None, None]


class CaptionDecoder(nn.Module):
    vocab_size: int
    context_length: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    remat: str = "none"
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" | "cudnn"

    @nn.compact
    def __call__(self, image_tokens: jax.Array, ids: jax.Array) -> jax.Array:
        """image_tokens (B, N, W_img), ids (B, L) teacher-forced input -> logits (B, L, vocab)."""
        num_image = image_tokens.shape[1]
        img = LayerNorm(self.dtype, name="ln_image")(image_tokens)
        img = nn.Dense(self.width, dtype=self.dtype, name="image_proj",
                       kernel_init=dense_init((None, "embed")), bias_init=zeros_init(("embed",)))(img)
        txt = token_embedding(self.vocab_size, self.width, self.dtype, "token_embedding")(ids)
        txt = txt + learned_positions(self, self.context_length, self.width).astype(txt.dtype)
        x = jnp.concatenate([img, txt.astype(img.dtype)], axis=1)
        x = Transformer(self.depth, self.num_heads, self.mlp_dim, self.remat, self.dtype, self.attention,
                        name="transformer")(x, prefix_lm_mask(num_image, ids.shape[1]))
        x = LayerNorm(self.dtype, name="ln_final")(x[:, num_image:])
        # In the compute dtype (bf16 for the paper's configs): the largest matmul of the tower. The
        # loss takes the logits to float32 before the softmax (ov3.losses.caption).
        return nn.Dense(self.vocab_size, dtype=self.dtype, name="head",
                        kernel_init=dense_init(("embed", "vocab")), bias_init=zeros_init(("vocab",)))(x)
