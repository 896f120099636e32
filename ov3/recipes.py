"""The paper's recipe (OpenVision 3, Table 1) for the `configs/ov3_*.py` family.

Schedules are written as the paper writes them, in ImageNet-equivalent epochs; steps are
derived from the batch size lazily (ml_collections FieldReferences), so `--config.batch_size=N`
keeps the sample budget and the warmup in samples, while the learning rate follows the batch
(lr = base_lr * batch / 256, `ov3.train.learning_rate`). `--config.total_steps=N` still wins
for smoke runs.

A config argument picks the stage and variants (`configs/ov3_b.py:finetune,res=224,decoder=L/1`):
  stage    first word: "pretrain" (128 px) or "finetune" (256 px)   [pretrain]
  res      image size, e.g. 224 for the paper's other fine-tuning resolution
  encoder  "<size>/2": S/2, B/2, L/2, So400m/2, H/2 (the file's default is the family's)
  decoder  M/1, B/1 (the paper's choice), L/1
  text     text-tower size; default: the registry's tower for the encoder size
  ablation "no_vae": the paper's Sec. 5.2 "w/o VAE" baseline (Tables 6-8): the encoder is
           the same size with patch 16 on pixels (B/16: as many tokens as VAE x8 + B/2), the
           decoder predicts pixel patches, the losses are the same minus the latent L1
This module lives in the package (not in configs/, which is not importable) so configs load
from any working directory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from ov3.config import base_config
from ov3.errors import Ov3Error
from ov3.models import registry

# One ImageNet-equivalent epoch = the ImageNet-1k train split (the notes round it to 1.3M).
EPOCH_SAMPLES = 1_281_167


@dataclasses.dataclass(frozen=True)
class Stage:
    image_size: int
    batch_size: int
    base_lr: float          # lr = base_lr * batch / 256, cosine to zero
    epochs: float
    warmup_epochs: float
    lpips: float            # lambda


# Table 1. Shared by both stages: beta 0.4, alpha 1, w_rec 0.5, w_und 1 (`base_config`'s loss).
STAGES: dict[str, Stage] = {
    "pretrain": Stage(image_size=128, batch_size=8192, base_lr=8e-6, epochs=4000, warmup_epochs=40, lpips=0.0),
    "finetune": Stage(image_size=256, batch_size=4096, base_lr=4e-7, epochs=400, warmup_epochs=20, lpips=0.5),
}

# Placeholders for files the paper runs need. Each is a path that does not exist, so the loader
# that opens it stops the run (before anything compiles) with a message that shows this text
# and how to obtain the file.
VAE_PLACEHOLDER = "<set --config.vae.path to FLUX.1-dev ae.safetensors>"
DATA_PLACEHOLDER = "<set --config.data.path to Recap-DataComp-1B written by ov3.data.records>"
TOKENIZER_PLACEHOLDER = "<set --config.data.tokenizer to bert-base-uncased vocab.txt>"
VGG_PLACEHOLDER = "<set --config.lpips.vgg_path to torchvision vgg16-397923af.pth>"


def steps(epochs: float, batch_size: int) -> int:
    """ceil(epochs * EPOCH_SAMPLES / batch): a run covers at least the stated samples."""
    return -(-round(epochs * EPOCH_SAMPLES) // batch_size)


def set_schedule(c: ml_collections.ConfigDict, epochs: float, warmup_epochs: float) -> None:
    """total_steps and optim.warmup_steps as lazy functions of c.batch_size (same `steps` rule)."""
    batch = c.get_ref("batch_size")
    c.total_steps = -(-round(epochs * EPOCH_SAMPLES) // batch)
    c.optim.warmup_steps = -(-round(warmup_epochs * EPOCH_SAMPLES) // batch)


_ARG_KEYS = ("res", "encoder", "decoder", "text", "ablation")
ABLATIONS = ("no_vae",)


def parse_arg(arg: str | None) -> dict[str, str]:
    """"finetune,res=224,encoder=H/2" -> {"stage": "finetune", "res": "224", "encoder": "H/2"}."""
    out: dict[str, str] = {"stage": "pretrain"}
    for i, part in enumerate(p.strip() for p in (arg or "").split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep and i == 0:
            key, value = "stage", key
        elif key not in _ARG_KEYS:
            raise Ov3Error(f"config argument {part!r} in {arg!r}: use 'STAGE[,key=value...]' with STAGE one of "
                           f"{sorted(STAGES)} and keys {_ARG_KEYS}, e.g. 'finetune,res=224,encoder=So400m/2'.")
        out[key] = value
    if out["stage"] not in STAGES:
        raise Ov3Error(f"config argument {arg!r}: stage {out['stage']!r} is not one of {sorted(STAGES)}.")
    return out


def ov3_config(arg: str | None, *, encoder: str) -> ml_collections.ConfigDict:
    """The OV3 config of one stage for an encoder (e.g. "B/2"), with the variants in `arg`."""
    a = parse_arg(arg)
    stage = STAGES[a["stage"]]
    enc = a.get("encoder", encoder)
    ablation = a.get("ablation")
    if ablation is not None and ablation not in ABLATIONS:
        raise Ov3Error(f"config argument ablation={ablation!r}: use one of {ABLATIONS}.")
    registry.vit_size(enc, "config argument encoder")
    text = a.get("text", enc.split("/")[0])
    registry.text_size(text, "config argument text")

    c = base_config()
    c.image_size = int(a.get("res", stage.image_size))
    c.batch_size = stage.batch_size
    set_schedule(c, stage.epochs, stage.warmup_epochs)
    c.log_every = 100
    c.checkpoint_every = 2000
    c.keep_checkpoints = 2

    # bf16 compute for the towers and the frozen VAE, params and optimizer state in fp32 (the
    # first moment in bf16, as OpenVision). Towers remat "dots" (keep matmul outputs, recompute
    # the rest) at every size: compiled for a TPU v4 chip (32 examples, fwd + bwd, `summary
    # --component`) it is faster than keeping every activation, not only smaller: the B/2
    # encoder 5.93 -> 4.53 ms, the B/1 decoder 5.86 -> 4.34, the B text tower (two texts)
    # 7.34 -> 5.48, the B caption decoder 12.56 -> 8.83 (the recomputed LayerNorms, GELUs and
    # softmaxes fuse into the matmuls around them; keeping them wrote and re-read fp32
    # intermediates). The frozen VAE decoder is not
    # rematerialised, at 256 px either: OV3-B fine-tuning (16/chip on 256 v4 chips) needs
    # 12.0 GiB per chip without it (8.9 with it) and bounds at 154.8 ms per step against
    # 179.9 (remat recomputes the decoder's forward: +50% of its FLOPs).
    c.model.update(encoder=enc, decoder=a.get("decoder", "B/1"), text=text, dtype="bfloat16",
                   remat="dots", posemb="sincos")
    c.vae.update(path=VAE_PLACEHOLDER, dtype="bfloat16", latent_norm="scale", remat_decoder=False)
    c.optim.base_lr = stage.base_lr
    c.loss.lpips = stage.lpips
    if stage.lpips > 0:
        c.lpips.vgg_path = VGG_PLACEHOLDER

    # TPU pods: parameters and optimizer state sharded over every chip (FSDP on `embed`), batch
    # over every chip; tensor parallelism is not needed at these sizes.
    c.mesh.update(data=1, fsdp=-1, tensor=1)

    # Recap-DataComp-1B converted with ov3.data.records: `alt_text` for the contrastive tower,
    # the LLaVA-Llama-3 recaption as `caption` for the caption decoder; OpenVision's lengths.
    # Input per host: 8 grain workers x ~245 img/s per core at 128 px (measured on a CPU) is
    # ~2,000 img/s, 5x the paper run's 376 img/s per v4 host; their 8 x 32 read threads keep
    # enough bucket reads in flight to hide ~30 ms each (ov3.tools.bench_data).
    c.data.update(path=DATA_PLACEHOLDER, tokenizer=TOKENIZER_PLACEHOLDER, text_key="alt_text",
                  caption_key="caption", text_len=80, caption_len=128, augment="rrc",
                  worker_count=8)
    # OpenVision's two contrastive positives: the alt-text and one sentence of the recaption.
    c.loss.contrastive_texts = ("alt_text", "caption_sentence")

    if ablation == "no_vae":
        c.model.update(input="pixels", encoder=enc.split("/")[0] + "/16")
        c.vae.path = ""
    return c


def describe(c: Any) -> str:
    """One line with the schedule in steps and samples (for tools and logs)."""
    samples = c.total_steps * c.batch_size
    return (f"{c.image_size}px batch {c.batch_size}: {c.total_steps} steps "
            f"({samples / EPOCH_SAMPLES:.1f} epochs of {EPOCH_SAMPLES}), warmup {c.optim.warmup_steps} steps, "
            f"peak lr {c.optim.base_lr * c.batch_size / 256:.3g}")
