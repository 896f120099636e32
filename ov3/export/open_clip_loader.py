"""Load an ov3 open_clip export with stock open_clip (no ov3, no JAX needed).

`python -m ov3.export --format open_clip` copies this file into the export folder as
`load_ov3_open_clip.py`; the ov3 tests run this very file against open_clip's real classes.

Two things stock open_clip cannot express in its config, done here:
  * `VisionTransformer.conv1` is hard-coded to 3 input channels; ov3 encodes 16-channel VAE
    latents, so conv1 is replaced by a 16-channel, bias-free Conv2d *before* loading weights;
  * LayerNorm eps is 1e-6 (open_clip's default is 1e-5): the config carries
    `norm_kwargs: {"eps": 1e-6}` for both towers, which open_clip >= 2.24 honours.

    import load_ov3_open_clip as ov3
    model = ov3.load("path/to/export")                  # open_clip.CLIP, eval mode
    pooled = model.encode_image(latents)                # latents: (B, 16, h, w), see README
    pooled, tokens = ov3.encode_image_tokens(model, latents)
    text = model.encode_text(ov3.tokenizer("path/to/export")(["a photo of a cat"]))
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import safetensors.torch
import torch

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def load(folder: str | Path, device: str | torch.device = "cpu") -> open_clip.CLIP:
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    model = open_clip.CLIP(**config["model_cfg"])
    old = model.visual.conv1
    model.visual.conv1 = torch.nn.Conv2d(config["ov3"]["in_chans"], old.out_channels,
                                         kernel_size=old.kernel_size, stride=old.stride, bias=False)
    model.load_state_dict(safetensors.torch.load_file(str(folder / WEIGHTS_NAME)), strict=True)
    return model.to(device).eval()


@torch.no_grad()
def encode_image_tokens(model: open_clip.CLIP, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled embedding (B, E), patch tokens (B, N, W)): the tokens are the last block's output
    before any LayerNorm, the features ov3 calls z_u (what LLaVA / RAE consume)."""
    visual = model.visual
    saved, visual.output_tokens = visual.output_tokens, True
    try:
        return visual(latents)
    finally:
        visual.output_tokens = saved


def tokenizer(folder: str | Path):
    """open_clip's HFTokenizer over the exported tokenizer.json (BOS text EOS, padded with 0)."""
    return open_clip.get_tokenizer(f"local-dir:{Path(folder)}")
