"""The OpenVision 3 network minus the frozen VAE: one encoder, two branches.

    latents --encoder--> pooled, z_u
    z_u + sigma*eps --decoder--> latents_hat                    (reconstruction branch)
    pooled <-> text encoder(texts)      ;  caption decoder(z_u) (understanding branch)

The paper's Sec. 5.1 ablations cut one branch's gradient into the encoder at z_u
(`rec_to_encoder` / `und_to_encoder`) while that branch's own heads keep training.

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

from ov3.errors import Ov3Error
from ov3.models import registry
from ov3.models.caption import CaptionDecoder
from ov3.models.decoder import LatentDecoder
from ov3.models.text import TextEncoder
from ov3.models.vit import VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NOISE_MODES = ("absolute", "relative")
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
    noise_mode: str = "absolute"  # "relative": sigma also times the (stop-gradient) RMS of z_u per example
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
                   noise_mode=model_cfg.noise_mode, posemb=model_cfg.posemb, remat=model_cfg.remat,
                   dtype=model_cfg.dtype, attention=model_cfg.attention_impl)


class OV3Model(nn.Module):
    spec: ModelSpec

    def setup(self) -> None:
        s = self.spec
        dtype = DTYPES[s.dtype]
        enc, patch = registry.vit_size(s.encoder, "model.encoder")
        dec = registry.decoder_size(s.decoder, "model.decoder")
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

    def __call__(self, latents: jax.Array, text: jax.Array, caption: jax.Array, *,
                 rec_to_encoder: bool = True, und_to_encoder: bool = True) -> dict[str, jax.Array]:
        """All training outputs. Needs the rng stream "noise" for the decoder-input noise.

        text: (B, L) or (B, K, L), K texts per image (alt-text, a caption sentence), encoded in
        one text-tower call; text_emb is (B, E) or (B, K, E) to match. `rec_to_encoder=False` /
        `und_to_encoder=False`: that branch sees stop_gradient(z_u), so it still trains but the
        encoder gets no gradient from it (the contrastive pooling head included)."""
        pooled, tokens = self.encoder(latents, detach_pool=not und_to_encoder)
        und_tokens = tokens if und_to_encoder else jax.lax.stop_gradient(tokens)
        rec_tokens = tokens if rec_to_encoder else jax.lax.stop_gradient(tokens)
        noise, sigma, rms = decoder_noise(self.make_rng("noise"), tokens, self.spec.noise_tau, self.spec.noise_mode)
        noisy = (rec_tokens.astype(jnp.float32) + noise).astype(tokens.dtype)
        return {
            "image_emb": pooled.astype(jnp.float32),
            "text_emb": self.encode_text(text).astype(jnp.float32),
            "caption_logits": self.caption(und_tokens, caption),
            "latents_hat": self.decoder(noisy).astype(jnp.float32),
            "logit_scale": self.logit_scale,
            "z_u_rms": jnp.mean(rms),
            "noise_rel": jnp.mean(sigma) / jnp.mean(rms),  # E[sigma] / RMS(z_u): how much the noise matters
        }

    # Entry points for inference, evaluation and export (`model.apply(..., method=...)`).
    def encode_image(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encoder(latents)

    def encode_text(self, text: jax.Array) -> jax.Array:
        """(..., L) ids -> (..., E): any number of texts per example through one tower call."""
        return self.text(text.reshape(-1, text.shape[-1])).reshape(*text.shape[:-1], -1)

    def decode_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.decoder(tokens)

    def caption_logits(self, tokens: jax.Array, caption: jax.Array) -> jax.Array:
        return self.caption(tokens, caption)


def decoder_noise(rng: jax.Array, tokens: jax.Array, tau: float, mode: str
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sigma * eps in float32 shaped like tokens, sigma (B,), RMS of z_u (B,)).

    sigma ~ U[0, tau] per example ("absolute", the paper's), times the example's RMS of z_u
    under stop_gradient ("relative": the noise keeps its weight if the encoder grows z_u). eps
    is drawn in float32 whatever the compute dtype: a bf16 normal has ~128 levels and tails cut
    near +-3."""
    if mode not in NOISE_MODES:
        raise Ov3Error(f"model.noise_mode={mode!r}; use one of {NOISE_MODES}.")
    k_sigma, k_eps = jax.random.split(rng)
    batch = tokens.shape[0]
    rms = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(tokens.astype(jnp.float32)),
                                                  axis=tuple(range(1, tokens.ndim)))))
    sigma = jax.random.uniform(k_sigma, (batch,), jnp.float32, maxval=tau)
    if mode == "relative":
        sigma = sigma * rms
    eps = jax.random.normal(k_eps, tokens.shape, jnp.float32)
    return sigma.reshape((batch,) + (1,) * (tokens.ndim - 1)) * eps, sigma, rms
