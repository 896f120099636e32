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


# Hub metadata per export format. library_name drives the Hub's "Use this model" snippet: the
# open_clip export says "ov3", not "open_clip", because open_clip's `hf-hub:` loader builds a
# 3-channel stem that these 16-channel weights do not load into (the card says how to load them).
HUB_METADATA = {
    "open_clip": {"library_name": "ov3", "pipeline_tag": "image-feature-extraction",
                  "tags": ["ov3", "openvision3", "open_clip", "vision-encoder", "vae-latents"]},
    "hf": {"library_name": "transformers", "pipeline_tag": "image-feature-extraction",
           "tags": ["ov3", "openvision3", "vit", "vision-encoder", "vae-latents"]},
    # No Hub pipeline maps tokens to VAE latents, so the decoder has no pipeline_tag.
    "decoder": {"library_name": "ov3", "tags": ["ov3", "openvision3", "latent-decoder",
                                                "pytorch_model_hub_mixin"]},
}


def add_hub_metadata(readme: Path, fmt: str, license: str, base_model: str | None) -> None:
    """Prepend the YAML front matter the Hub reads (license, library_name, pipeline_tag, tags,
    base_model) to the card. Values are written as JSON, which is valid YAML."""
    meta: dict[str, Any] = {"license": license, **HUB_METADATA[fmt]}
    if base_model:
        meta["base_model"] = base_model
    header = "".join(f"{k}: {json.dumps(v)}\n" for k, v in meta.items())
    readme.write_text(f"---\n{header}---\n\n{readme.read_text()}")


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    """Create (or reuse) the Hub model repo and upload the export folder as one commit; the URL
    of the commit. Uses huggingface_hub's login (`hf auth login` or HF_TOKEN) and HF_ENDPOINT."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        from ov3.errors import Ov3Error
        raise Ov3Error("--push-to-hub needs huggingface_hub: pip install -e '.[hub]'.") from None
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=f"ov3 export ({folder.name})")
    return commit.commit_url
