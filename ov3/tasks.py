"""What is trained: the OpenVision 3 objective, or the AutoencoderKL itself.

A task owns its network(s), knows how to initialise the trainable params, which params are
frozen, and the loss. `ov3/train.py` is the same loop and the same jitted step for both.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ov3 import losses
from ov3.errors import Ov3Error
from ov3.models import registry
from ov3.models import vae as vae_lib
from ov3.models import vae_weights
from ov3.models.ov3 import OV3Model, ModelSpec

Batch = dict[str, jax.Array]


def load_lpips(cfg: ml_collections.ConfigDict) -> tuple[Any, Any] | None:
    """(lpips_fn, params) when the config asks for an LPIPS term, else None."""
    if cfg.loss.lpips <= 0:
        return None
    from ov3.models import lpips as lpips_lib
    if not cfg.lpips.vgg_path:
        raise Ov3Error("config.loss.lpips > 0 needs config.lpips.vgg_path: torchvision's VGG16 state dict "
                       "(vgg16-397923af.pth, downloadable on a machine with internet via "
                       "torchvision.models.vgg16(weights='IMAGENET1K_V1')).")
    _, params = lpips_lib.load_lpips(cfg.lpips.vgg_path, cfg.lpips.heads_path or None)
    return lpips_lib.lpips_fn, params


# config.loss.contrastive_texts entries -> the batch key holding those ids (ov3.data.pipeline).
CONTRASTIVE_TEXTS = {"alt_text": "text", "caption_sentence": "caption_sentence"}


class OV3Task:
    """The joint objective: L = w_rec*(L1(x,x^) + beta*L1(z,z^) + lambda*LPIPS) + w_und*(L_cap + alpha*L_con).

    With model.input="pixels" (the paper's "w/o VAE" ablation) the VAE is the identity: the
    encoder patchifies pixels, the decoder predicts pixel patches and the latent term is dropped."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, vae: "vae_lib.VAE", vocab_size: int, pad_id: int):
        self.cfg = cfg
        self.vae = vae
        self.pad_id = pad_id
        self.spec = ModelSpec.from_config(cfg.model, vocab_size=vocab_size, text_len=cfg.data.text_len,
                                          caption_len=cfg.data.caption_len,
                                          latent_channels=vae.config.latent_channels)
        self.model = OV3Model(self.spec)
        self.lpips = load_lpips(cfg)
        factor = vae.config.downsample_factor
        _, patch = registry.vit_size(cfg.model.encoder, "model.encoder")
        if cfg.image_size % (factor * patch):
            raise Ov3Error(f"config.image_size={cfg.image_size} must be a multiple of {factor * patch}: the VAE "
                           f"downsamples x{factor} and model.encoder={cfg.model.encoder!r} has patch {patch}.")
        self.latent_size = cfg.image_size // factor
        self.pixels = cfg.model.input == "pixels"

    def frozen_params(self) -> dict[str, Any]:
        frozen = {"vae": self.vae.params}
        if self.lpips is not None:
            frozen["lpips"] = self.lpips[1]
        return frozen

    def init(self, rng: jax.Array) -> Any:
        """Boxed (logically annotated) params; call under `jax.eval_shape` or `jit`."""
        latents = jnp.zeros((1, self.latent_size, self.latent_size, self.spec.latent_channels))
        text = jnp.zeros((1, self.spec.text_len), jnp.int32)
        caption = jnp.zeros((1, self.spec.caption_len), jnp.int32)
        return self.model.init({"params": rng, "noise": rng}, latents, text, caption)["params"]

    def encode(self, frozen: dict[str, Any], batch: Batch) -> jax.Array:
        if "latent" in batch:  # from the latent cache: the VAE encoder is skipped altogether
            return batch["latent"].astype(jnp.float32)
        return jax.lax.stop_gradient(self.vae.encode_fn(frozen["vae"], batch["image"]))

    def loss(self, params: Any, frozen: dict[str, Any], batch: Batch, rng: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        c = self.cfg.loss
        x = batch["image"]
        z = self.encode(frozen, batch)
        # (B, K, L): every contrastive positive of an example, encoded in one text-tower call.
        texts = jnp.stack([batch[CONTRASTIVE_TEXTS[k]] for k in c.contrastive_texts], axis=1)
        out = self.model.apply({"params": params}, z, texts, batch["caption"], rngs={"noise": rng},
                               rec_to_encoder=c.rec_to_encoder, und_to_encoder=c.und_to_encoder)
        x_hat = self.vae.decode_fn(frozen["vae"], out["latents_hat"])
        terms = {
            "loss/rec_pixel_l1": losses.l1(x, x_hat),
            "loss/contrastive": losses.contrastive(out["image_emb"], out["text_emb"], out["logit_scale"]),
            "loss/caption": losses.caption(out["caption_logits"], batch["caption"], self.pad_id),
            "stats/z_u_rms": out["z_u_rms"],
            "stats/noise_rel": out["noise_rel"],
        }
        rec = terms["loss/rec_pixel_l1"]
        if not self.pixels:  # on pixels the latent term would be the pixel term again
            terms["loss/rec_latent_l1"] = losses.l1(z, out["latents_hat"])
            rec = rec + c.beta * terms["loss/rec_latent_l1"]
        if self.lpips is not None:
            terms["loss/lpips"] = jnp.mean(self.lpips[0](frozen["lpips"], x, x_hat))
            rec = rec + c.lpips * terms["loss/lpips"]
        und = terms["loss/caption"] + c.alpha * terms["loss/contrastive"]
        terms["loss/rec"], terms["loss/und"] = rec, und
        scale = jnp.exp(out["logit_scale"])
        terms["logit_scale"] = scale
        terms["temperature"] = 1.0 / scale
        return c.w_rec * rec + c.w_und * und, terms

    def constrain(self, params: Any) -> Any:
        """Applied to the params after every update: exp(logit_scale) kept in [1, 100] as open_clip
        clamps it (a clamp on the parameter, so the loss can always pull it back)."""
        return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, losses.MAX_LOGIT_SCALE)}

    def reconstruct(self, params: Any, frozen: dict[str, Any], images: jax.Array) -> jax.Array:
        """Noise-free image -> VAE -> encoder -> decoder -> VAE decoder, for grids and evals."""
        z = jax.lax.stop_gradient(self.vae.encode_fn(frozen["vae"], images))
        _, tokens = self.model.apply({"params": params}, z, method=OV3Model.encode_image)
        z_hat = self.model.apply({"params": params}, tokens, method=OV3Model.decode_tokens)
        return self.vae.decode_fn(frozen["vae"], z_hat)


class VAETask:
    """Fit the AutoencoderKL itself: L1(x, x^) + kl * KL(q(z|x) || N(0, I)) (+ lambda * LPIPS).

    Starts from `config.vae.path` weights when that folder has them, else from random init of
    its `config.json` architecture.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, vae: "vae_lib.VAE"):
        self.cfg = cfg
        self.vae = vae
        self.lpips = load_lpips(cfg)

    def frozen_params(self) -> dict[str, Any]:
        return {} if self.lpips is None else {"lpips": self.lpips[1]}

    def constrain(self, params: Any) -> Any:
        return params

    def init(self, rng: jax.Array) -> Any:
        del rng  # the VAE object already holds its (loaded or randomly initialised) params
        return self.vae.params

    def loss(self, params: Any, frozen: dict[str, Any], batch: Batch, rng: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = batch["image"]
        mean, logvar = self.vae.posterior(params, x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        x_hat = self.vae.decode_raw_fn(params, z)
        terms = {"loss/rec_pixel_l1": losses.l1(x, x_hat), "loss/kl": losses.kl_to_standard_normal(mean, logvar)}
        total = terms["loss/rec_pixel_l1"] + self.cfg.loss.kl * terms["loss/kl"]
        if self.lpips is not None:
            terms["loss/lpips"] = jnp.mean(self.lpips[0](frozen["lpips"], x, x_hat))
            total = total + self.cfg.loss.lpips * terms["loss/lpips"]
        return total, terms

    def reconstruct(self, params: Any, frozen: dict[str, Any], images: jax.Array) -> jax.Array:
        mean, _ = self.vae.posterior(params, images)
        return self.vae.decode_raw_fn(params, mean)

    def save_vae(self, params: Any, images: jax.Array, out_dir: os.PathLike) -> os.PathLike:
        """Write the fitted VAE in diffusers layout (loadable by diffusers and `vae_weights.from_pretrained`),
        with `scaling_factor` = 1 / std of the posterior means on `images`, the same recipe that
        gave SD its 0.18215, so the ViT sees unit-variance latents."""
        mean, _ = self.vae.posterior(params, images)
        config = dataclasses.replace(self.vae.config, scaling_factor=float(1.0 / jnp.std(mean)))
        vae_weights.save_pretrained(vae_lib.VAE(self.vae.module, jax.device_get(params), config), out_dir)
        return out_dir
