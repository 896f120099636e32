"""ViT decoder: unified tokens -> VAE latents (patch 1 over z_u, then a linear layer that
emits the encoder patch's p*p*C latent values per token, unpatchified to (h, w, C))."""

from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from ov3.models.layers import Dtype, LayerNorm, Transformer, dense_init, sincos_2d, zeros_init


class LatentDecoder(nn.Module):
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    out_patch: int        # the encoder's patch size: each token becomes out_patch^2 latent pixels
    latent_channels: int
    remat: str = "none"
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" | "cudnn"

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens (B, N, W_enc) -> latents (B, g*p, g*p, C) with g = sqrt(N)."""
        grid = int(round(tokens.shape[1] ** 0.5))
        if grid * grid != tokens.shape[1]:
            raise ValueError(f"the decoder needs a square token grid, got {tokens.shape[1]} tokens")
        # Patch size 1 over the token grid is a per-token linear map.
        x = nn.Dense(self.width, dtype=self.dtype, name="embed",
                     kernel_init=dense_init((None, "embed")), bias_init=zeros_init(("embed",)))(tokens)
        pos = self.param("positional_embedding", nn.with_logical_partitioning(
            lambda _, shape: jnp.asarray(sincos_2d(grid, shape[1])), (None, "embed")),
            (grid * grid, self.width))
        x = x + jax.lax.stop_gradient(pos).astype(x.dtype)
        x = Transformer(self.depth, self.num_heads, self.mlp_dim, self.remat, self.dtype, self.attention,
                        name="transformer")(x)
        # The output layer in float32 whatever the compute dtype: it sets the reconstruction's precision.
        x = LayerNorm(jnp.float32, name="ln_post")(x)
        p, c = self.out_patch, self.latent_channels
        x = nn.Dense(p * p * c, dtype=jnp.float32, name="head",
                     kernel_init=dense_init(("embed", None)), bias_init=zeros_init((None,)))(x)
        return einops.rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=grid, p=p, q=p, c=c)
