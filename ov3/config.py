"""Every config key ov3 knows, with its default, and the checks run before anything compiles.

Config files in `configs/` start from `base_config()` and change values; a key that is not
here is a typo and stops the run with the closest known key named.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from ov3.errors import Ov3Error


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "ov3"              # "ov3": the joint objective; "vae": fit the AutoencoderKL itself
    c.seed = 0
    c.image_size = 128
    c.batch_size = 8192         # global, across all processes and devices
    c.total_steps = 1000
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.resume_step = -1          # -1: resume from the latest checkpoint; N: from checkpoint N (later ones
                                # are moved to DIR/discarded_checkpoints), e.g. when the latest is damaged
    c.stop_grace_s = 300        # after SIGTERM: seconds to reach a step boundary and save before exiting unsaved
    c.nonfinite = "stop"        # "stop": end the run at a non-finite loss/grad; "skip": drop that update
    c.recon_grid_every = 0      # also write the PNG grid of held-out reconstructions every N steps (0: only at the end)
    c.init_from = ""            # params from a run dir's latest checkpoint (or DIR/checkpoints/STEP), position
                                # tables resized, or from an open_clip checkpoint file/folder (released
                                # OpenVision 3 weights); fresh optimizer, step 0 (ov3/init_from.py)

    # Where numbers go besides DIR/metrics.jsonl and DIR/tensorboard: Weights & Biases when
    # log.wandb.project is set (pip install -e '.[wandb]'); mode "offline" writes DIR/wandb only
    # (upload later with `wandb sync`).
    c.log = ml_collections.ConfigDict(dict(wandb=dict(project="", entity="", name="", mode="online")))

    # dcn_data: slices (multi-slice TPU) or nodes (multi-node GPU) the data axis spans; fsdp and
    # tensor stay inside a slice/node (ov3.sharding.device_grid). 1: one slice/node, or don't care.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))

    c.model = ml_collections.ConfigDict(dict(
        encoder="B/2", decoder="B/1", text="B",
        noise_tau=0.8,          # sigma ~ U[0, tau] per example on z_u (the RAE paper's 0.8)
        noise_mode="absolute",  # "absolute" (the paper's); "relative": sigma also times RMS(z_u) per example
        input="latents",        # "latents": frozen VAE -> ViT; "pixels": no VAE (the paper's Sec. 5.2
                                # "w/o VAE" ablation): the encoder patchifies pixels, e.g. B/16
        posemb="sincos",        # "sincos" fixed, or "learn"
        remat="none",           # "none" | "full" | "dots"
        dtype="float32",        # compute dtype; params stay float32
        attention_impl="xla",   # jax.nn.dot_product_attention: "xla", or "cudnn" (fused flash attention;
                                # NVIDIA GPUs, bfloat16 only)
    ))

    c.vae = ml_collections.ConfigDict(dict(
        path="",                # diffusers folder (config.json + safetensors) or FLUX ae.safetensors
        hub_id="",              # its Hugging Face Hub id (e.g. "black-forest-labs/FLUX.1-dev"), named in
                                # exported model cards; "": the cards name no source (never a local path)
        latent_norm="scale",    # "scale": mean*scaling_factor (released OV3); "scale_shift"
        dtype="float32",
        remat_decoder=False,
    ))

    c.loss = ml_collections.ConfigDict(dict(
        beta=0.4, alpha=1.0, w_rec=0.5, w_und=1.0,
        lpips=0.0,              # lambda; > 0 needs lpips.vgg_path
        kl=1e-6,                # task="vae" only: KL weight
        # Contrastive positives per image, averaged (OpenVision's two): "alt_text" (data.text_key)
        # and "caption_sentence" (one random sentence of data.caption_key, drawn per example).
        contrastive_texts=("alt_text",),
        # Paper Sec. 5.1 ablations: False = that branch trains on stop_gradient(z_u), so the encoder
        # learns from the other branch only while this branch's heads still train.
        rec_to_encoder=True, und_to_encoder=True,
    ))
    c.lpips = ml_collections.ConfigDict(dict(vgg_path="", heads_path=""))

    c.optim = ml_collections.ConfigDict(dict(
        base_lr=8e-6,           # lr = base_lr * batch_size / 256
        warmup_steps=100,
        b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.2,
        grad_clip=1.0,
        mu_dtype="bfloat16",    # OpenVision keeps Adam's first moment in bf16
    ))

    from ov3.data.pipeline import default_config as data_defaults
    c.data = data_defaults()
    c.evals = ml_collections.ConfigDict()
    return c


def _unknown_keys(cfg: Any, ref: Any, prefix: str = "") -> list[str]:
    errors = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in ref:
            close = difflib.get_close_matches(key, list(ref.keys()), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            errors.append(f"unknown config key {path!r}{hint}")
        elif isinstance(ref[key], ml_collections.ConfigDict) and len(ref[key]) and isinstance(
                cfg[key], ml_collections.ConfigDict):
            errors.extend(_unknown_keys(cfg[key], ref[key], path + "."))
    return errors


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks that need no devices: key names, enumerations, shapes. Raises Ov3Error."""
    errors = _unknown_keys(cfg, base_config())
    choices = {"task": ("ov3", "vae"), "nonfinite": ("stop", "skip"),
               "model.posemb": ("sincos", "learn"), "model.remat": ("none", "full", "dots"),
               "model.dtype": ("float32", "bfloat16"), "model.attention_impl": ("xla", "cudnn"),
               "model.noise_mode": ("absolute", "relative"),
               "model.input": ("latents", "pixels"), "vae.dtype": ("float32", "bfloat16"),
               "vae.latent_norm": ("scale", "scale_shift"), "optim.mu_dtype": ("float32", "bfloat16"),
               "log.wandb.mode": ("online", "offline", "disabled")}
    for key, allowed in choices.items():
        value = cfg
        for part in key.split("."):
            value = value.get(part) if value is not None else None
        if value is not None and value not in allowed:
            errors.append(f"config.{key}={value!r} must be one of {allowed}")
    if cfg.model.get("attention_impl") == "cudnn" and cfg.model.dtype != "bfloat16":
        errors.append("config.model.attention_impl='cudnn' needs config.model.dtype='bfloat16' "
                      "(cuDNN's fused attention takes fp16/bf16 only)")
    if int(cfg.mesh.get("dcn_data", 1)) < 1:
        errors.append(f"config.mesh.dcn_data={cfg.mesh.dcn_data} must be >= 1 (the number of slices or nodes)")
    from ov3.tasks import CONTRASTIVE_TEXTS
    texts = tuple(cfg.loss.get("contrastive_texts", ("alt_text",)))
    if not texts or len(set(texts)) != len(texts) or not set(texts) <= set(CONTRASTIVE_TEXTS):
        errors.append(f"config.loss.contrastive_texts={texts!r}: use ('alt_text',) or "
                      "('alt_text', 'caption_sentence') (OpenVision's two positives)")
    if cfg.image_size % 16:
        errors.append(f"config.image_size={cfg.image_size} must be divisible by 16 "
                      "(VAE x8, then ViT patch 2); e.g. 128, 224 or 256")
    for key in ("batch_size", "total_steps", "log_every", "checkpoint_every"):
        if int(cfg[key]) <= 0:
            errors.append(f"config.{key}={cfg[key]} must be positive")
    if cfg.task == "ov3":
        from ov3.models import registry
        for key, lookup in (("encoder", registry.vit_size), ("decoder", registry.decoder_size),
                            ("text", registry.text_size)):
            try:
                lookup(cfg.model[key], f"model.{key}")
            except Ov3Error as e:
                errors.append(str(e))
    from ov3.evals import evaluators  # each config.evals entry: type, keys, values
    errors.extend(evaluators.config_errors(cfg))
    if errors:
        raise Ov3Error("invalid config:\n  " + "\n  ".join(errors))
