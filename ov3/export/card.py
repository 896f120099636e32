"""The model card (README.md) every export writes: what goes in, what comes out, how to load.

The one fact a consumer cannot recover from the weights is the latent normalisation, so it is
stated with numbers: the VAE, its posterior *mean* (not a sample), the scaling factor and
whether a shift is subtracted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

from ov3 import paths
from ov3.models.ov3 import ModelSpec

# FLUX.1-dev's vae/config.json values, used when the run's VAE config cannot be read here.
FLUX1_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16}


def vae_facts(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """VAE path, latent_norm, scaling/shift factors (from its config.json when readable)."""
    vae = config.get("vae", {})
    path, norm = vae.get("path", ""), vae.get("latent_norm", "scale")
    raw = dict(FLUX1_VAE)
    for candidate in (paths.path(path) / "config.json", paths.path(path) / "vae" / "config.json") if path else ():
        if candidate.is_file():
            raw.update(json.loads(candidate.read_text()))
            break
    scale, shift = float(raw["scaling_factor"]), float(raw.get("shift_factor") or 0.0)
    used_shift = shift if norm == "scale_shift" else 0.0
    formula = (f"latents = (posterior.mean - {used_shift}) * {scale}" if used_shift
               else f"latents = posterior.mean * {scale}   (no shift_factor subtracted)")
    return {"path": path or "(not set in config.vae.path)", "latent_norm": norm,
            "scaling_factor": scale, "shift_factor": used_shift, "formula": formula,
            "latent_channels": int(raw["latent_channels"])}


def write(out: Path, title: str, config: ml_collections.ConfigDict, spec: ModelSpec, grid: int,
          body: str) -> None:
    vae = vae_facts(config)
    pixels = grid * 8
    card = f"""# {title}

OpenVision 3-style unified vision encoder trained with ov3 (encoder {spec.encoder}, text tower
{spec.text}, decoder {spec.decoder}). The vision tower does not read pixels: it reads the
latents of a frozen VAE.

## Input: VAE latents, normalised exactly like this

- VAE: `{vae['path']}` (FLUX.1 `AutoencoderKL`, {vae['latent_channels']} latent channels, 8x down-sampling).
- Images: RGB in **[-1, 1]**, {pixels}x{pixels} (the training resolution; the ViT position
  embedding covers a {grid}x{grid} latent grid).
- Latents: the posterior **mean** (not a sample), then
  `{vae['formula']}` (config `vae.latent_norm="{vae['latent_norm']}"`).

```python
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained("{vae['path']}").eval()        # the same VAE
latents = vae.encode(images).latent_dist.mean                       # images: (B, 3, H, W) in [-1, 1]
latents = {'(latents - vae.config.shift_factor) * vae.config.scaling_factor' if vae['shift_factor']
           else 'latents * vae.config.scaling_factor              # no shift'}
```

{body.strip()}

(`EXPORT_DIR` above is this folder.)
"""
    (out / "README.md").write_text(card)
