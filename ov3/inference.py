"""Using a trained ov3 encoder from Python (JAX), straight from its training workdir.

    enc = Encoder.from_workdir("runs/b2")                  # latest checkpoint
    pooled, tokens = enc.encode_images(images)             # NHWC pixels in [-1, 1]
    pooled, tokens = enc.encode_latents(latents)           # normalised VAE latents, NHWC
    text_emb = enc.encode_text(["a photo of a cat"])
    latents_hat = enc.decode_tokens(tokens)                # the latent decoder: z_u -> normalised latents

`pooled` (B, E) is the contrastive embedding (not normalised: L2-normalise for cosine
similarity); `tokens` (B, N, W) are the unified tokens z_u, the last block's patch tokens
before any LayerNorm. Images go through the frozen VAE named by config.vae.path (posterior
mean, then config.vae.latent_norm), exactly as in training; a model.input="pixels" run (no
VAE) takes the pixels themselves. The VAE and the tokenizer are
loaded on first use, so `encode_latents` needs neither.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ov3.errors import Ov3Error
from ov3.export import load
from ov3.models.ov3 import ModelSpec, OV3Model


class Encoder:
    def __init__(self, config: ml_collections.ConfigDict, params: dict[str, Any], *,
                 vae_path: str | None = None, tokenizer_path: str | os.PathLike | None = None):
        self.config = config
        self.spec: ModelSpec = load.model_spec(config, params)
        self.latent_grid = load.latent_grid(params)
        # Only the towers used here stay in memory (the decoder and caption head can be large).
        self.params = jax.device_put({k: params[k] for k in ("encoder", "text", "logit_scale")})
        self._host_decoder = params.get("decoder")  # to the device on first decode_tokens
        self.vae_path = vae_path or config.get("vae", {}).get("path", "")
        self.tokenizer_path = tokenizer_path
        model = OV3Model(self.spec)
        self._encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=OV3Model.encode_image))
        self._text = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=OV3Model.encode_text))

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike, step: int | None = None, *, vae_path: str | None = None) -> "Encoder":
        """`vae_path` overrides config.vae.path (e.g. the VAE lives elsewhere on this machine)."""
        config, params = load.load_params(workdir, step)
        return cls(config, params, vae_path=vae_path, tokenizer_path=load.tokenizer_file(workdir, config))

    @property
    def image_size(self) -> int:
        return self.latent_grid * self.vae.config.downsample_factor

    def encode_latents(self, latents: Any) -> tuple[jax.Array, jax.Array]:
        """Normalised latents (B, h, w, C) -> (pooled (B, E), tokens (B, N, W))."""
        latents = jnp.asarray(latents, jnp.float32)
        want = (self.latent_grid, self.latent_grid, self.spec.latent_channels)
        if latents.ndim != 4 or latents.shape[1:] != want:
            raise Ov3Error(f"latents of shape {tuple(latents.shape)}; this encoder takes (B, {want[0]}, "
                           f"{want[1]}, {want[2]}) NHWC (its position embedding covers a {want[0]}x{want[1]} grid).")
        return self._encode(self.params, latents)

    def encode_images(self, images: Any) -> tuple[jax.Array, jax.Array]:
        """NHWC RGB images in [-1, 1] at the training resolution -> (pooled, tokens)."""
        images = jnp.asarray(images, jnp.float32)
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise Ov3Error(f"images of shape {tuple(images.shape)}; this encoder takes (B, {size}, {size}, 3) "
                           f"NHWC RGB (the training resolution; centre-crop and resize first, e.g. with "
                           f"ov3.data.shapes.center_crop).")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.01 or hi > 1.01:
            raise Ov3Error(f"pixel values span [{lo:g}, {hi:g}]; encode_images takes [-1, 1] "
                           "(uint8 pixels: x / 127.5 - 1).")
        return self._encode_images(self.vae.params, self.params, images)

    def encode_text(self, texts: Sequence[str]) -> jax.Array:
        """Texts -> (B, E) contrastive embeddings (tokenised as in training: BOS text EOS, padded)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer.encode_batch(list(texts), self.spec.text_len)
        return self._text(self.params, jnp.asarray(ids))

    def decode_tokens(self, tokens: Any) -> jax.Array:
        """Unified tokens z_u (B, N, W), noisy or not -> normalised VAE latents (B, h, w, C), NHWC:
        the reconstruction branch's decoder (the frozen VAE decoder turns them into pixels)."""
        if self._host_decoder is None:
            raise Ov3Error("this Encoder was built without the decoder's params; use Encoder.from_workdir.")
        # OV3Model.setup declares logit_scale, so apply needs it beside the decoder's params.
        params = {"decoder": self._decoder_params, "logit_scale": self.params["logit_scale"]}
        return self._decode(params, jnp.asarray(tokens, jnp.float32))

    # Loaded on first use.
    @functools.cached_property
    def _decoder_params(self) -> Any:
        return jax.device_put(self._host_decoder)

    @functools.cached_property
    def _decode(self):
        model = OV3Model(self.spec)
        return jax.jit(lambda p, t: model.apply({"params": p}, t, method=OV3Model.decode_tokens))

    @functools.cached_property
    def vae(self) -> Any:
        from ov3.models import vae as vae_lib
        from ov3.models import vae_weights
        if self.config.model.get("input", "latents") == "pixels":  # trained without a VAE
            return vae_lib.Identity()
        if not self.vae_path:
            raise Ov3Error("config.vae.path is empty, so there is no VAE to encode images with; pass "
                           "vae_path= to Encoder.from_workdir (the diffusers folder or FLUX ae.safetensors "
                           "the run was trained with), or use encode_latents.")
        vae = vae_weights.from_pretrained(self.vae_path, jnp.float32, self.config.vae.get("latent_norm", "scale"))
        if vae.config.latent_channels != self.spec.latent_channels:
            raise Ov3Error(f"the VAE at {self.vae_path} has {vae.config.latent_channels} latent channels; "
                           f"this encoder was trained on {self.spec.latent_channels}. Pass the run's VAE.")
        return vae

    @functools.cached_property
    def _encode_images(self):
        vae, model = self.vae, OV3Model(self.spec)
        return jax.jit(lambda vp, p, x: model.apply({"params": p}, vae.encode_fn(vp, x), method=OV3Model.encode_image))

    @functools.cached_property
    def tokenizer(self) -> Any:
        from ov3.data.tokenizer import Tokenizer
        if self.tokenizer_path is None:
            raise Ov3Error("no tokenizer: the workdir has no tokenizer.json and config.data.tokenizer does "
                           "not exist here; copy the run's tokenizer.json into the workdir.")
        return Tokenizer.from_file(str(self.tokenizer_path))


def l2_normalize(x: Any) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
