"""Export to stock `transformers` classes (no custom code, no trust_remote_code).

    OUT/vision/   ViTModel: `hidden_states[-1][:, 1:]` are our tokens z_u
                  + pooling_head.safetensors (`proj`) for the pooled embedding (3 lines, below)
    OUT/text/     SiglipTextModel: `pooler_output` is our text embedding; + the tokenizer.
                  Loaded with SiglipTextModel.from_pretrained: AutoModel has no entry for
                  "siglip_text_model" configs (AutoConfig does)
    OUT/vision_beit/  (--beit) BeitForImageClassification: `logits` are our pooled embedding

Why these classes. ViT: a class token, learned absolute positions (ours are loaded into
them), pre-LN blocks with qkv bias, exact GELU, no LayerNorm before the blocks: the same
function up to the last block. Its final `layernorm` acts per token (we load ln_post there),
and its pooler is tanh(dense(CLS)) (dropped: add_pooling_layer=False), so ViTModel alone does
not give our pooled embedding proj(ln_post(mean(tokens))). BEiT does: with
`use_mean_pooling` its pooler is LayerNorm(mean of patch tokens), its classifier a Linear we
load with `proj` and a zero bias. BEiT has no key bias, which is harmless: q.b_k is the same
for every key, and softmax ignores a constant shift. SigLIP's text tower is ours exactly:
bidirectional, final LayerNorm, last position, linear head (zero bias).

Weights are written under the checkpoint names transformers has always used (v4 layout); v5
renames them on load. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from safetensors.numpy import save_file

from ov3.export import card, layout, tokenizer_files
from ov3.export.layout import np32
from ov3.models.layers import LN_EPS
from ov3.models.ov3 import ModelSpec

Params = dict[str, Any]
WEIGHTS_NAME = "model.safetensors"
POOLING_HEAD_NAME = "pooling_head.safetensors"


def _vit_dims(enc: Params) -> dict[str, int]:
    c_fc = np.shape(enc["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"])
    patch, _, channels, width = np.shape(enc["conv1"]["kernel"])
    grid = int(round((np.shape(enc["positional_embedding"])[0] - 1) ** 0.5))
    return {"hidden_size": int(width), "num_hidden_layers": int(c_fc[0]), "intermediate_size": int(c_fc[2]),
            "num_attention_heads": layout.num_heads(enc["transformer"]),
            "image_size": grid * int(patch), "patch_size": int(patch), "num_channels": int(channels)}


def _vit_like_layers(enc: Params, prefix: str, key_bias: bool) -> dict[str, np.ndarray]:
    """ViT/BEiT encoder layers (they share names; BEiT's key projection has no bias)."""
    sd = {}
    for i, b in enumerate(layout.blocks_to_torch(enc["transformer"])):
        p = f"{prefix}encoder.layer.{i}."
        (wq, wk, wv), (bq, bk, bv) = layout.split_qkv(b)
        sd.update({
            p + "layernorm_before.weight": b["ln_1.weight"], p + "layernorm_before.bias": b["ln_1.bias"],
            p + "attention.attention.query.weight": np32(wq), p + "attention.attention.query.bias": np32(bq),
            p + "attention.attention.key.weight": np32(wk),
            p + "attention.attention.value.weight": np32(wv), p + "attention.attention.value.bias": np32(bv),
            p + "attention.output.dense.weight": b["attn.out_proj.weight"],
            p + "attention.output.dense.bias": b["attn.out_proj.bias"],
            p + "layernorm_after.weight": b["ln_2.weight"], p + "layernorm_after.bias": b["ln_2.bias"],
            p + "intermediate.dense.weight": b["mlp.c_fc.weight"], p + "intermediate.dense.bias": b["mlp.c_fc.bias"],
            p + "output.dense.weight": b["mlp.c_proj.weight"], p + "output.dense.bias": b["mlp.c_proj.bias"],
        })
        if key_bias:
            sd[p + "attention.attention.key.bias"] = np32(bk)
    return sd


def _embeddings(enc: Params, prefix: str) -> dict[str, np.ndarray]:
    kernel = np.asarray(enc["conv1"]["kernel"])
    width = kernel.shape[-1]
    return {
        prefix + "embeddings.cls_token": np32(enc["class_embedding"]).reshape(1, 1, width),
        prefix + "embeddings.position_embeddings": np32(enc["positional_embedding"])[None],
        prefix + "embeddings.patch_embeddings.projection.weight": np32(kernel.transpose(3, 2, 0, 1)),
        prefix + "embeddings.patch_embeddings.projection.bias": np.zeros(width, np.float32),
    }


def vit_state_dict(enc: Params) -> dict[str, np.ndarray]:
    sd = _embeddings(enc, "")
    sd.update(_vit_like_layers(enc, "", key_bias=True))
    # ViTModel always normalises last_hidden_state per token; ln_post is the natural choice.
    sd["layernorm.weight"], sd["layernorm.bias"] = np32(enc["ln_post"]["scale"]), np32(enc["ln_post"]["bias"])
    return sd


def vit_config(enc: Params) -> dict[str, Any]:
    dims = _vit_dims(enc)
    return {"model_type": "vit", "architectures": ["ViTModel"], **dims,
            "hidden_act": "gelu", "layer_norm_eps": LN_EPS, "qkv_bias": True,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "encoder_stride": dims["patch_size"]}


def beit_state_dict(enc: Params) -> dict[str, np.ndarray]:
    sd = _embeddings(enc, "beit.")
    sd.update(_vit_like_layers(enc, "beit.", key_bias=False))
    sd["beit.pooler.layernorm.weight"] = np32(enc["ln_post"]["scale"])
    sd["beit.pooler.layernorm.bias"] = np32(enc["ln_post"]["bias"])
    proj = np32(enc["proj"]["kernel"])
    sd["classifier.weight"], sd["classifier.bias"] = np32(proj.T), np.zeros(proj.shape[1], np.float32)
    return sd


def beit_config(enc: Params) -> dict[str, Any]:
    embed_dim = int(np.shape(enc["proj"]["kernel"])[1])
    return {"model_type": "beit", "architectures": ["BeitForImageClassification"], **_vit_dims(enc),
            "hidden_act": "gelu", "layer_norm_eps": LN_EPS,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0,
            "use_absolute_position_embeddings": True, "use_relative_position_bias": False,
            "use_shared_relative_position_bias": False, "layer_scale_init_value": 0.0,
            "use_mean_pooling": True, "use_mask_token": False,
            # "Labels" are the embedding dimensions: logits = proj(ln_post(mean(tokens))).
            "id2label": {str(i): f"dim_{i}" for i in range(embed_dim)},
            "label2id": {f"dim_{i}": i for i in range(embed_dim)}}


def siglip_text_state_dict(txt: Params) -> dict[str, np.ndarray]:
    p = "text_model."
    sd = {p + "embeddings.token_embedding.weight": np32(txt["token_embedding"]["embedding"]),
          p + "embeddings.position_embedding.weight": np32(txt["positional_embedding"])}
    for i, b in enumerate(layout.blocks_to_torch(txt["transformer"])):
        q = f"{p}encoder.layers.{i}."
        (wq, wk, wv), (bq, bk, bv) = layout.split_qkv(b)
        sd.update({
            q + "layer_norm1.weight": b["ln_1.weight"], q + "layer_norm1.bias": b["ln_1.bias"],
            q + "self_attn.q_proj.weight": np32(wq), q + "self_attn.q_proj.bias": np32(bq),
            q + "self_attn.k_proj.weight": np32(wk), q + "self_attn.k_proj.bias": np32(bk),
            q + "self_attn.v_proj.weight": np32(wv), q + "self_attn.v_proj.bias": np32(bv),
            q + "self_attn.out_proj.weight": b["attn.out_proj.weight"],
            q + "self_attn.out_proj.bias": b["attn.out_proj.bias"],
            q + "layer_norm2.weight": b["ln_2.weight"], q + "layer_norm2.bias": b["ln_2.bias"],
            q + "mlp.fc1.weight": b["mlp.c_fc.weight"], q + "mlp.fc1.bias": b["mlp.c_fc.bias"],
            q + "mlp.fc2.weight": b["mlp.c_proj.weight"], q + "mlp.fc2.bias": b["mlp.c_proj.bias"],
        })
    sd[p + "final_layer_norm.weight"] = np32(txt["ln_final"]["scale"])
    sd[p + "final_layer_norm.bias"] = np32(txt["ln_final"]["bias"])
    proj = np32(txt["text_projection"]["kernel"])
    sd[p + "head.weight"], sd[p + "head.bias"] = np32(proj.T), np.zeros(proj.shape[1], np.float32)
    return sd


def siglip_text_config(txt: Params, bos_id: int = 2, eos_id: int = 3) -> dict[str, Any]:
    vocab, width = (int(d) for d in np.shape(txt["token_embedding"]["embedding"]))
    c_fc = np.shape(txt["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"])
    return {"model_type": "siglip_text_model", "architectures": ["SiglipTextModel"],
            "vocab_size": vocab, "hidden_size": width, "intermediate_size": int(c_fc[2]),
            "num_hidden_layers": int(c_fc[0]), "num_attention_heads": layout.num_heads(txt["transformer"]),
            "max_position_embeddings": int(np.shape(txt["positional_embedding"])[0]),
            "projection_size": int(np.shape(txt["text_projection"]["kernel"])[1]),
            "hidden_act": "gelu", "layer_norm_eps": LN_EPS, "attention_dropout": 0.0,
            "pad_token_id": 0, "bos_token_id": bos_id, "eos_token_id": eos_id}


def _write_model(folder: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


BEIT_DOC = """
### Pooled embedding from a stock class: vision_beit/

`BeitForImageClassification` (mean pooling + LayerNorm + a Linear "classifier" holding `proj`
with zero bias) computes the pooled embedding itself; its key projection has no bias, which
changes nothing (a per-query constant under softmax).

```python
from transformers import AutoModelForImageClassification
beit = AutoModelForImageClassification.from_pretrained("EXPORT_DIR/vision_beit").eval()
o = beit(pixel_values=latents, output_hidden_states=True)
pooled, tokens = o.logits, o.hidden_states[-1][:, 1:]         # logits (B, E) = pooled embedding
```
"""

LOAD_DOC = """## Load with transformers (stock classes, no custom code)

```python
import torch, safetensors.torch
from transformers import AutoModel, AutoTokenizer, SiglipTextModel

vit = AutoModel.from_pretrained("EXPORT_DIR/vision", add_pooling_layer=False).eval()   # ViTModel
out = vit(pixel_values=latents, output_hidden_states=True)     # latents (B, 16, h, w) as above
tokens = out.hidden_states[-1][:, 1:]                          # z_u (B, N, W): last block, no final norm
# pooled image embedding, proj(ln_post(mean(tokens))): ViTModel's `layernorm` holds ln_post
proj = safetensors.torch.load_file("EXPORT_DIR/vision/pooling_head.safetensors")["proj"]
pooled = vit.layernorm(tokens.mean(1)) @ proj

text_model = SiglipTextModel.from_pretrained("EXPORT_DIR/text").eval()   # AutoModel has no entry for it
tok = AutoTokenizer.from_pretrained("EXPORT_DIR/text")
ids = tok(["a photo of a cat"], padding="max_length", truncation=True, return_tensors="pt")
text_emb = text_model(**ids).pooler_output                    # no attention_mask: trained without one
```

`vision/preprocessor_config.json` makes the *pixels for the VAE*: RGB resized to the training
resolution and mapped to [-1, 1] (it squashes; centre-crop first to match training's eval).

`out.last_hidden_state` is ln_post applied to every token (ViTModel always ends with a
LayerNorm); `out.pooler_output` is None (no pooler). Cosine similarity: L2-normalise both
embeddings.
"""


def export(out: Path, config: ml_collections.ConfigDict, params: Params, spec: ModelSpec,
           tokenizer: Path | None, beit: bool = False) -> None:
    enc = params["encoder"]
    _write_model(out / "vision", vit_config(enc), vit_state_dict(enc))
    save_file({"proj": np32(enc["proj"]["kernel"])}, str(out / "vision" / POOLING_HEAD_NAME))
    # Pixels for the VAE (not for ViTModel itself): RGB -> [-1, 1] at the training resolution.
    pixels = _vit_dims(enc)["image_size"] * card.vae_facts(config)["downsample"]
    (out / "vision" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": pixels, "width": pixels}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
    }, indent=2) + "\n")
    bos, eos = 2, 3
    if tokenizer is not None:
        tok = tokenizer_files.write(tokenizer, out / "text", spec.text_len)
        bos, eos = tok.bos_id, tok.eos_id
    _write_model(out / "text", siglip_text_config(params["text"], bos, eos), siglip_text_state_dict(params["text"]))
    if beit:
        _write_model(out / "vision_beit", beit_config(enc), beit_state_dict(enc))
    grid = _vit_dims(enc)["image_size"]
    card.write(out, "ov3 encoder (transformers format)", config, spec, grid, LOAD_DOC + (BEIT_DOC if beit else ""))
