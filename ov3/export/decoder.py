"""Export the latent decoder for `decoder_torch.LatentDecoder` (config.json + safetensors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from safetensors.numpy import save_file

from ov3.export import card, layout
from ov3.export.layout import np32
from ov3.models.layers import LN_EPS
from ov3.models.ov3 import ModelSpec

Params = dict[str, Any]
MODULE_NAME = "ov3_latent_decoder.py"


def state_dict(dec: Params) -> dict[str, np.ndarray]:
    sd = {"embed.weight": np32(np.asarray(dec["embed"]["kernel"]).T), "embed.bias": np32(dec["embed"]["bias"]),
          "positional_embedding": np32(dec["positional_embedding"])}
    for i, block in enumerate(layout.blocks_to_torch(dec["transformer"])):
        sd.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    sd["ln_post.weight"], sd["ln_post.bias"] = np32(dec["ln_post"]["scale"]), np32(dec["ln_post"]["bias"])
    sd["head.weight"], sd["head.bias"] = np32(np.asarray(dec["head"]["kernel"]).T), np32(dec["head"]["bias"])
    return sd


def decoder_config(dec: Params, spec: ModelSpec, vae: dict[str, Any]) -> dict[str, Any]:
    in_width, width = (int(d) for d in np.shape(dec["embed"]["kernel"]))
    c_fc = np.shape(dec["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"])
    out = int(np.shape(dec["head"]["kernel"])[1])
    patch = int(round((out // spec.latent_channels) ** 0.5))
    return {"in_width": in_width, "width": width, "depth": int(c_fc[0]),
            "heads": layout.num_heads(dec["transformer"]), "mlp_dim": int(c_fc[2]),
            "grid": int(round(np.shape(dec["positional_embedding"])[0] ** 0.5)), "patch": patch,
            "latent_channels": spec.latent_channels, "layer_norm_eps": LN_EPS,
            # The output normalisation (= the encoder's input): latents = (mean - shift) * scale.
            "scaling_factor": vae["scaling_factor"], "shift_factor": vae["shift_factor"],
            "vae": vae["name"]}


LOAD_DOC = """## Load (plain PyTorch)

`LatentDecoder` is a `torch.nn.Module` with huggingface_hub's `PyTorchModelHubMixin`, so
`from_pretrained` takes this folder or its Hub repo id. The class is `ov3.export.decoder_torch`
in an ov3 checkout (`pip install -e .`; importing it needs torch and huggingface_hub, not JAX);
the same file is copied here as `ov3_latent_decoder.py` for use without ov3.

```python
from ov3.export.decoder_torch import LatentDecoder
from diffusers import AutoencoderKL

decoder = LatentDecoder.from_pretrained("EXPORT_DIR")   # eval mode; every tensor checked (strict)
latents = decoder(tokens)                       # tokens z_u (B, N, W) -> latents (B, 16, h, w)
vae = AutoencoderKL.from_pretrained(VAE_PATH).eval()  # the VAE named in this card
images = vae.decode(decoder.to_vae(latents)).sample.clamp(-1, 1)    # to_vae undoes the normalisation
```

The decoder was trained on z_u + sigma * eps with sigma ~ U[0, noise_tau] per example, so it
tolerates noisy tokens (e.g. from a diffusion model sampling in z_u space, as in RAE).
"""


def export(out: Path, config: ml_collections.ConfigDict, params: Params, spec: ModelSpec) -> None:
    dec = params["decoder"]
    out.mkdir(parents=True, exist_ok=True)
    cfg = decoder_config(dec, spec, card.vae_facts(config))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(state_dict(dec), str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(Path(__file__).with_name("decoder_torch.py"), out / MODULE_NAME)
    card.write(out, "ov3 latent decoder (PyTorch)", config, spec, cfg["grid"] * cfg["patch"],
               LOAD_DOC + f"\nnoise_tau = {spec.noise_tau}\n")
