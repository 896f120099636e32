"""The model card (README.md) every export writes: what goes in, what comes out, how to load.

The one fact a consumer cannot recover from the weights is the latent normalisation, so it is
stated with numbers: the VAE, its posterior *mean* (not a sample), the scaling factor and
whether a shift is subtracted. They come from the VAE config training copied into the workdir
(vae_config.json, copied on into the export), never from a default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

from ov3.errors import Ov3Error
from ov3.models.ov3 import ModelSpec

VAE_CONFIG_NAME = "vae_config.json"  # in the workdir (written by ov3.train) and in every export


def vae_facts(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The VAE as training used it: its source name, latent_norm, scaling/shift factors,
    channels and down-sampling, from `config.vae_config` (the workdir's vae_config.json, which
    `ov3.export.load.read_config` adds). Raises rather than guess: a wrong scaling factor baked
    into an export silently shifts every latent."""
    vae = config.get("vae", {})
    raw, norm = config.get("vae_config"), vae.get("latent_norm", "scale")
    if not raw:
        raise Ov3Error(f"the run's VAE facts are missing: WORKDIR/{VAE_CONFIG_NAME} (written by ov3.train "
                       "when a run starts) is not there. Export will not guess the scaling factor: copy the "
                       f"config.json of the VAE the run trained with (config.vae.path) to WORKDIR/{VAE_CONFIG_NAME}.")
    raw = dict(raw)
    scale, shift = float(raw["scaling_factor"]), float(raw.get("shift_factor") or 0.0)
    used_shift = shift if norm == "scale_shift" else 0.0
    formula = (f"latents = (posterior.mean - {used_shift}) * {scale}" if used_shift
               else f"latents = posterior.mean * {scale}   (no shift_factor subtracted)")
    return {"name": vae.get("hub_id", ""), "latent_norm": norm,
            "scaling_factor": scale, "shift_factor": used_shift, "formula": formula,
            "latent_channels": int(raw["latent_channels"]),
            "downsample": 2 ** (len(raw["block_out_channels"]) - 1), "config": raw}


def write(out: Path, title: str, config: ml_collections.ConfigDict, spec: ModelSpec, grid: int,
          body: str) -> None:
    vae = vae_facts(config)
    pixels = grid * vae["downsample"]
    (out / VAE_CONFIG_NAME).write_text(json.dumps(vae["config"], indent=2) + "\n")
    # Named by its Hub id when training was given one (config.vae.hub_id), never by a local path.
    source = (f'"{vae["name"]}"' if vae["name"] else
              f'VAE_PATH  # the VAE of this folder\'s {VAE_CONFIG_NAME} (no config.vae.hub_id was given)')
    named = (f"`{vae['name']}`" if vae["name"] else
             f"the one the model was trained with; its diffusers config is `{VAE_CONFIG_NAME}` in this folder")
    card = f"""# {title}

OpenVision 3-style unified vision encoder trained with ov3 (encoder {spec.encoder}, text tower
{spec.text}, decoder {spec.decoder}). The vision tower does not read pixels: it reads the
latents of a frozen VAE.

## Input: VAE latents, normalised exactly like this

- VAE: {named} (`AutoencoderKL`, {vae['latent_channels']} latent channels, {vae['downsample']}x down-sampling).
- Images: RGB in **[-1, 1]**, {pixels}x{pixels} (the training resolution; the ViT position
  embedding covers a {grid}x{grid} latent grid).
- Latents: the posterior **mean** (not a sample), then
  `{vae['formula']}` (config `vae.latent_norm="{vae['latent_norm']}"`).

```python
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained({source}).eval()
latents = vae.encode(images).latent_dist.mean                       # images: (B, 3, H, W) in [-1, 1]
latents = {'(latents - vae.config.shift_factor) * vae.config.scaling_factor' if vae['shift_factor']
           else 'latents * vae.config.scaling_factor              # no shift'}
```

{body.strip()}

(`EXPORT_DIR` above is this folder.)
"""
    (out / "README.md").write_text(card)
