"""ViT encoder over VAE latents (patch 2 -> one token per 16x16 pixels).

Structure = open_clip `VisionTransformer` with `no_ln_pre=True, pool_type="avg",
final_ln_after_pool=True` (what OpenVision exports): bias-free patch conv `conv1`, a class
token, `positional_embedding` of (1 + tokens, width) whose class row is zero, pre-LN blocks,
average pooling over the patch tokens, `ln_post` on the pooled vector, bias-free `proj`.
The per-token features z_u are the last block's patch tokens *before* any final norm; that is
also `hidden_states[-1][:, 1:]` of a stock `transformers.ViTModel` (no pre-LN either), which is
the export path for LLaVA-style consumers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ov3.models.layers import Dtype, LayerNorm, Transformer, dense_init, sincos_2d


def cls_and_sincos(grid: int, width: int) -> jax.Array:
    """Position embedding with a zero row for the class token, then the fixed 2-D sin-cos."""
    return jnp.concatenate([jnp.zeros((1, width)), jnp.asarray(sincos_2d(grid, width))], axis=0)


class VisionTransformer(nn.Module):
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch: int
    embed_dim: int
    posemb: str = "sincos"  # "sincos": fixed (no gradient), "learn": trained from the sin-cos init.
    remat: str = "none"
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" | "cudnn"

    @nn.compact
    def __call__(self, latents: jax.Array, detach_pool: bool = False) -> tuple[jax.Array, jax.Array]:
        """latents (B, h, w, C) -> pooled (B, embed_dim), tokens (B, h/p * w/p, width).
        `detach_pool`: the pooling head (ln_post, proj) trains on stop_gradient(tokens)."""
        p = self.patch
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    dtype=self.dtype, name="conv1",
                    kernel_init=dense_init((None, None, None, "embed")))(latents)
        batch, gh, gw, _ = x.shape
        if gh != gw:
            raise ValueError(f"square latent grids only (sin-cos position embedding), got {gh}x{gw}")
        x = x.reshape(batch, gh * gw, self.width)
        cls = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(self.width ** -0.5), ("embed",)), (self.width,))
        pos = self.param("positional_embedding", nn.with_logical_partitioning(
            lambda _, shape: cls_and_sincos(gh, shape[1]), (None, "embed")), (gh * gw + 1, self.width))
        if self.posemb == "sincos":
            pos = jax.lax.stop_gradient(pos)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width)), x], axis=1)
        x = x + pos.astype(x.dtype)
        x = Transformer(self.depth, self.num_heads, self.mlp_dim, self.remat, self.dtype, self.attention,
                        name="transformer")(x)
        tokens = x[:, 1:]
        head_in = jax.lax.stop_gradient(tokens) if detach_pool else tokens
        # The contrastive head in float32 whatever the compute dtype (as OpenVision's heads).
        pooled = LayerNorm(jnp.float32, name="ln_post")(head_in.mean(axis=1))
        pooled = nn.Dense(self.embed_dim, use_bias=False, dtype=jnp.float32, name="proj",
                          kernel_init=dense_init(("embed", None)))(pooled)
        return pooled, tokens
