"""Tiny real setups the training tests share: a procedural dataset on disk, a random-init
AutoencoderKL saved in diffusers layout, and a config that trains in seconds."""

from __future__ import annotations

import pathlib
import socket

import ml_collections

from ov3.config import base_config

# Two-level AutoencoderKL (x2 downsampling): the real architecture at the smallest size that
# compiles fast; 16 px images -> 8x8 latents -> 16 tokens with patch 2.
TINY_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "block_out_channels": [8, 8], "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "act_fn": "silu", "norm_num_groups": 4, "sample_size": 16, "scaling_factor": 1.0,
    "shift_factor": None, "use_quant_conv": False, "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}


def make_assets(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(dataset dir, vae dir) under root, created once."""
    from ov3.data import synthetic
    from ov3.models import vae as vae_lib
    from ov3.models import vae_weights
    data, vae = root / "data", root / "vae"
    if not (data / "manifest.json").exists():
        synthetic.write_dataset(str(data), num_train=64, num_heldout=16, size=16, vocab_size=128)
    if not (vae / "config.json").exists():
        vae_weights.save_pretrained(vae_lib.init_random(TINY_VAE, seed=0), vae)
    return data, vae


def tiny_config(data: pathlib.Path, vae: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
    c = base_config()
    c.image_size = 16
    c.batch_size = 16
    c.total_steps = 4
    c.log_every = 1
    c.checkpoint_every = 2
    c.model.update(encoder="mu/2", decoder="mu/1", text="mu")
    c.vae.path = str(vae)
    c.optim.update(base_lr=0.02, warmup_steps=1, mu_dtype="float32")
    c.data.update(path=str(data), text_len=16, caption_len=24, augment="rrc")
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def write_karpathy(root: pathlib.Path, captions: list[list[str]], splits: list[str],
                   missing: frozenset[int] = frozenset()) -> pathlib.Path:
    """Karpathy's dataset_coco.json layout under root, with image i (a flat colour, PNG bytes
    under COCO's .jpg name) in root/val2014/ unless i is in `missing`; returns the json path."""
    import io
    import json

    from PIL import Image
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    images = []
    for i, (sentences, split) in enumerate(zip(captions, splits, strict=True)):
        name = f"COCO_val2014_{i:012d}.jpg"
        if i not in missing:
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (20 * i, 255 - 20 * i, 128)).save(buf, format="PNG")
            (root / "val2014" / name).write_bytes(buf.getvalue())
        images.append({"filepath": "val2014", "filename": name, "imgid": i, "cocoid": 1000 + i, "split": split,
                       "sentences": [{"raw": s, "tokens": s.lower().split(), "imgid": i} for s in sentences]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for coordinators and stand-in servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
