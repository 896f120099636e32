"""Export to open_clip: `CLIP` state dict (safetensors) + open_clip_config.json + loader.

Key layout (open_clip `VisionTransformer` / `TextTransformer` inside `CLIP`):
  visual.conv1.weight (W, 16, 2, 2)   visual.class_embedding   visual.positional_embedding
  visual.transformer.resblocks.i.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}
  visual.ln_post   visual.proj (W, E)
  token_embedding.weight   positional_embedding   transformer.resblocks.i...   ln_final
  text_projection (W, E)   logit_scale
The config reproduces our forward pass: no ln_pre, average pooling over patch tokens,
ln_post after pooling, bidirectional text tower pooling the last position, exact GELU and
LayerNorm eps 1e-6 (`norm_kwargs`). What the config cannot say (16 input channels) the
loader (`open_clip_loader.py`, copied next to the weights) does.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from ov3.export import card, layout, tokenizer_files
from ov3.export.layout import np32
from ov3.models.layers import LN_EPS
from ov3.models.ov3 import ModelSpec

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
LOADER_NAME = "load_ov3_open_clip.py"

Params = dict[str, Any]


def visual_state_dict(enc: Params) -> dict[str, np.ndarray]:
    """Flax `encoder` subtree -> open_clip `VisionTransformer` state dict (no prefix)."""
    sd = {
        # Flax conv kernel (p, p, C, W) -> torch (W, C, p, p); both are cross-correlations.
        "conv1.weight": np32(np.asarray(enc["conv1"]["kernel"]).transpose(3, 2, 0, 1)),
        "class_embedding": np32(enc["class_embedding"]),
        "positional_embedding": np32(enc["positional_embedding"]),
    }
    for i, block in enumerate(layout.blocks_to_torch(enc["transformer"])):
        sd.update({f"transformer.resblocks.{i}.{k}": v for k, v in block.items()})
    sd["ln_post.weight"] = np32(enc["ln_post"]["scale"])
    sd["ln_post.bias"] = np32(enc["ln_post"]["bias"])
    sd["proj"] = np32(enc["proj"]["kernel"])
    return sd


def text_state_dict(txt: Params) -> dict[str, np.ndarray]:
    """Flax `text` subtree -> open_clip `TextTransformer` state dict (no prefix)."""
    sd = {
        "token_embedding.weight": np32(txt["token_embedding"]["embedding"]),
        "positional_embedding": np32(txt["positional_embedding"]),
    }
    for i, block in enumerate(layout.blocks_to_torch(txt["transformer"])):
        sd.update({f"transformer.resblocks.{i}.{k}": v for k, v in block.items()})
    sd["ln_final.weight"] = np32(txt["ln_final"]["scale"])
    sd["ln_final.bias"] = np32(txt["ln_final"]["bias"])
    sd["text_projection"] = np32(txt["text_projection"]["kernel"])
    return sd


def state_dict(params: Params) -> dict[str, np.ndarray]:
    """The whole `open_clip.CLIP` state dict (its text tower sits at the top level)."""
    sd = {f"visual.{k}": v for k, v in visual_state_dict(params["encoder"]).items()}
    sd.update(text_state_dict(params["text"]))
    sd["logit_scale"] = np32(params["logit_scale"]).reshape(())
    return sd


def vision_cfg(enc: Params, posemb: str) -> dict[str, Any]:
    width = int(np.shape(enc["class_embedding"])[0])
    patch = int(np.shape(enc["conv1"]["kernel"])[0])
    heads = layout.num_heads(enc["transformer"])
    depth, _, mlp_dim = np.shape(enc["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"])
    grid = int(round((np.shape(enc["positional_embedding"])[0] - 1) ** 0.5))
    return {
        "image_size": grid * patch,          # open_clip's "image" is the latent grid
        "patch_size": patch,
        "width": width,
        "layers": int(depth),
        "head_width": width // heads,
        "mlp_ratio": layout.mlp_ratio(width, int(mlp_dim)),
        "no_ln_pre": True,
        "pool_type": "avg",
        "final_ln_after_pool": True,
        # Values are loaded from the state dict either way; the type only decides whether
        # open_clip trains them (ov3's model.posemb).
        "pos_embed_type": "sin_cos_2d" if posemb == "sincos" else "learnable",
        "output_tokens": False,              # True breaks CLIP.encode_image; see the loader
        "norm_kwargs": {"eps": LN_EPS},
    }


def text_cfg(txt: Params, tokenizer_source: str) -> dict[str, Any]:
    vocab, width = (int(d) for d in np.shape(txt["token_embedding"]["embedding"]))
    depth, _, mlp_dim = np.shape(txt["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"])
    return {
        "context_length": int(np.shape(txt["positional_embedding"])[0]),
        "vocab_size": vocab,
        "width": width,
        "heads": layout.num_heads(txt["transformer"]),
        "layers": int(depth),
        "mlp_ratio": layout.mlp_ratio(width, int(mlp_dim)),
        "no_causal_mask": True,
        "pool_type": "last",
        "proj_bias": False,
        "pad_id": 0,
        "norm_kwargs": {"eps": LN_EPS},
        # With `local-dir:` open_clip reads the tokenizer from the folder itself; for `hf-hub:`
        # set this to the hub repository id.
        "hf_tokenizer_name": tokenizer_source,
    }


def open_clip_config(params: Params, spec: ModelSpec, config: ml_collections.ConfigDict) -> dict[str, Any]:
    vcfg = vision_cfg(params["encoder"], spec.posemb)
    return {
        "model_cfg": {
            "embed_dim": int(np.shape(params["encoder"]["proj"]["kernel"])[1]),
            "quick_gelu": False,
            "vision_cfg": vcfg,
            "text_cfg": text_cfg(params["text"], "./"),
        },
        # Pixels -> [-1, 1] for the VAE (mean = std = 0.5); the VAE itself is not part of CLIP.
        "preprocess_cfg": {"size": vcfg["image_size"] * card.vae_facts(config)["downsample"], "mean": [0.5] * 3, "std": [0.5] * 3,
                           "interpolation": "bicubic", "resize_mode": "shortest"},
        # Not open_clip keys (its dataclasses reject unknown fields), read by the loader.
        "ov3": {
            "in_chans": spec.latent_channels,
            "note": "visual.conv1 has in_chans input channels; open_clip hard-codes 3, so build "
                    "the model, replace visual.conv1, then load_state_dict (load_ov3_open_clip.py).",
            "vae": card.vae_facts(config),
        },
    }


LOAD_DOC = """## Load with open_clip

`load_ov3_open_clip.py` (in this folder; needs only torch, open_clip and safetensors) builds
`open_clip.CLIP` from `open_clip_config.json`, swaps `visual.conv1` for a 16-channel Conv2d
(open_clip hard-codes 3 input channels) and loads `open_clip_model.safetensors` strictly:

```python
import sys; sys.path.insert(0, "EXPORT_DIR")
import load_ov3_open_clip as ov3
model = ov3.load("EXPORT_DIR")
pooled = model.encode_image(latents)                       # (B, E); latents (B, 16, h, w) as above
pooled, tokens = ov3.encode_image_tokens(model, latents)   # tokens (B, h/2*w/2, W): z_u, no final norm
text = model.encode_text(ov3.tokenizer("EXPORT_DIR")(["a photo of a cat"]))
```

Not `open_clip.create_model("hf-hub:ORG/NAME")` (or `local-dir:`): open_clip builds
`visual.conv1` with 3 input channels from the config, and loading these 16-channel weights into
it fails with a size mismatch for `visual.conv1.weight`. From the Hub, download the folder first:
`EXPORT_DIR = huggingface_hub.snapshot_download("ORG/NAME")`, then load as above. To fine-tune
from it with ov3: `--config.init_from=EXPORT_DIR/open_clip_model.safetensors`.

LayerNorm eps is 1e-6 in both towers via `norm_kwargs` in the config; building the towers with
open_clip's default eps (1e-5) instead gives slightly different outputs.
Text: `BOS tokens EOS` padded with 0 to the context length, no padding mask, the *last*
position pooled (like SigLIP); `tokenizer.json` here reproduces the training ids.
"""


def export(out: Path, config: ml_collections.ConfigDict, params: Params, spec: ModelSpec,
           tokenizer: Path | None) -> None:
    import json

    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(params), str(out / WEIGHTS_NAME))
    oc_config = open_clip_config(params, spec, config)
    # Without tokenizer files `ov3.tokenizer(folder)` fails loudly (hf_tokenizer_name stays set),
    # rather than falling back to open_clip's CLIP BPE and producing wrong ids.
    if tokenizer is not None:
        tokenizer_files.write(tokenizer, out, spec.text_len)
    (out / CONFIG_NAME).write_text(json.dumps(oc_config, indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name("open_clip_loader.py"), out / LOADER_NAME)
    grid = oc_config["model_cfg"]["vision_cfg"]["image_size"]
    card.write(out, "ov3 encoder (open_clip format)", config, spec, grid, LOAD_DOC)
