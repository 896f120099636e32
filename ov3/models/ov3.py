"""The OpenVision 3 network minus the frozen VAE: one encoder, two branches.

    latents --encoder--> pooled, z_u
    z_u + sigma*eps --decoder--> latents_hat                    (reconstruction branch)
    pooled <-> text encoder(alt-text)   ;  caption decoder(z_u) (understanding branch)

The VAE lives outside this module (its params are frozen and kept out of the optimizer);
`ov3/train.py` encodes before and decodes after.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ov3.models import registry
from ov3.models.caption import CaptionDecoder
from ov3.models.decoder import LatentDecoder
from ov3.models.text import TextEncoder
from ov3.models.vit import VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LOGIT_SCALE_INIT = math.log(1 / 0.07)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes the network's shapes; built from the config by `from_config`."""
    encoder: str            # "B/2"
    decoder: str            # "B/1"
    text: str               # "B"
    vocab_size: int
    text_len: int
    caption_len: int
    latent_channels: int    # from the VAE (16 for FLUX)
    noise_tau: float        # sigma ~ U[0, noise_tau] per example, added to z_u before the decoder
    posemb: str = "sincos"
    remat: str = "none"
    dtype: str = "float32"
    attention: str = "xla"  # config.model.attention_impl

    @classmethod
    def from_config(cls, model_cfg: Any, *, vocab_size: int, text_len: int, caption_len: int,
                    latent_channels: int) -> "ModelSpec":
        return cls(encoder=model_cfg.encoder, decoder=model_cfg.decoder, text=model_cfg.text,
                   vocab_size=vocab_size, text_len=text_len, caption_len=caption_len,
                   latent_channels=latent_channels, noise_tau=model_cfg.noise_tau,
                   posemb=model_cfg.posemb, remat=model_cfg.remat, dtype=model_cfg.dtype,
                   attention=model_cfg.attention_impl)


class OV3Model(nn.Module):
    spec: ModelSpec

    def setup(self) -> None:
        s = self.spec
        dtype = DTYPES[s.dtype]
        enc, patch = registry.vit_size(s.encoder, "model.encoder")
        dec, _ = registry.vit_size(s.decoder, "model.decoder")
        txt = registry.text_size(s.text)
        embed_dim = registry.embed_dim(s.encoder.split("/")[0], "model.encoder")
        self.encoder = VisionTransformer(enc.width, enc.depth, enc.mlp_dim, enc.num_heads, patch,
                                         embed_dim, s.posemb, s.remat, dtype, attention=s.attention)
        self.decoder = LatentDecoder(dec.width, dec.depth, dec.mlp_dim, dec.num_heads, patch,
                                     s.latent_channels, s.remat, dtype, attention=s.attention)
        self.text = TextEncoder(s.vocab_size, s.text_len, txt.width, txt.depth, txt.mlp_dim,
                                txt.num_heads, embed_dim, s.remat, dtype, attention=s.attention)
        self.caption = CaptionDecoder(s.vocab_size, s.caption_len, txt.width, txt.depth,
                                      txt.mlp_dim, txt.num_heads, s.remat, dtype, attention=s.attention)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(LOGIT_SCALE_INIT), ()), ())

    def __call__(self, latents: jax.Array, text: jax.Array, caption: jax.Array) -> dict[str, jax.Array]:
        """All training outputs. Needs the rng stream "noise" for the decoder-input noise."""
        pooled, tokens = self.encoder(latents)
        batch = tokens.shape[0]
        sigma = jax.random.uniform(self.make_rng("noise"), (batch, 1, 1), maxval=self.spec.noise_tau)
        noisy = tokens + sigma.astype(tokens.dtype) * jax.random.normal(
            self.make_rng("noise"), tokens.shape, tokens.dtype)
        return {
            "image_emb": pooled.astype(jnp.float32),
            "text_emb": self.text(text).astype(jnp.float32),
            "caption_logits": self.caption(tokens, caption),
            "latents_hat": self.decoder(noisy).astype(jnp.float32),
            "logit_scale": self.logit_scale,
        }

    # Entry points for inference, evaluation and export (`model.apply(..., method=...)`).
    def encode_image(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encoder(latents)

    def encode_text(self, text: jax.Array) -> jax.Array:
        return self.text(text)

    def decode_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.decoder(tokens)

    def caption_logits(self, tokens: jax.Array, caption: jax.Array) -> jax.Array:
        return self.caption(tokens, caption)
