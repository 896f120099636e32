"""What the input pipeline and the latent cache must agree on: the crops, and the facts a
latent cache records about itself (image size, latent shape, the VAE and its normalisation).

Both `ov3.data.pipeline` and `ov3.data.cache_latents` import this module, never each other;
nothing here imports JAX.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image

from ov3 import paths
from ov3.data import records
from ov3.errors import Ov3Error


# --- crops ---------------------------------------------------------------------------

def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        area: tuple[float, float], ratio: tuple[float, float]) -> Image.Image:
    """Inception-style crop: random area fraction and aspect ratio, resized to size²."""
    w, h = img.size
    for _ in range(10):
        target = w * h * rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    return center_crop(img, size)  # Extreme aspect ratios: fall back, as torchvision does.


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Largest centred square, resized to size² (same as resize-shorter-side + crop)."""
    w, h = img.size
    s = min(w, h)
    x0, y0 = (w - s) // 2, (h - s) // 2
    return img.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + s, y0 + s))


# --- the latent cache's facts ----------------------------------------------------------

FORMAT = "ov3.latent_cache/1"


def latent_shape(path: str, image_size: int) -> tuple[int, int, int]:
    """The (h, w, c) of the latents cached in `path` at `image_size`; Ov3Error if not one."""
    info = records.read_manifest(path).get("latent_cache")
    if not info or info.get("format") != FORMAT:
        raise Ov3Error(f"config.data.use_cached_latents=True but {path} is not a latent cache "
                       f"({FORMAT}); make one with python -m ov3.data.cache_latents --data "
                       f"{path} --vae VAE --image-size {image_size} --out OUT and set "
                       "config.data.path=OUT.")
    if info["image_size"] != image_size:
        raise Ov3Error(f"The latent cache {path} holds {info['image_size']} px crops but "
                       f"config.image_size={image_size}; set config.image_size="
                       f"{info['image_size']} or cache again with --image-size {image_size}.")
    return tuple(info["latent_shape"])


def check_vae(path: str, vae_path: str, latent_norm: str) -> None:
    """Ov3Error unless the cache in `path` was made with this VAE and normalisation."""
    info = records.read_manifest(path).get("latent_cache") or {}
    if info.get("vae_sha256") != vae_fingerprint(vae_path) or info.get("latent_norm") != latent_norm:
        raise Ov3Error(f"the latent cache {path} was made with the VAE {info.get('vae')} "
                       f"(latent_norm={info.get('latent_norm')!r}), not config.vae.path={vae_path} "
                       f"(config.vae.latent_norm={latent_norm!r}): its latents would train against another "
                       "VAE's decoder. Set those two to the cache's, or cache again with "
                       "python -m ov3.data.cache_latents --vae <config.vae.path> --latent-norm <latent_norm>.")


def vae_fingerprint(vae_path: str) -> str:
    """sha256 over the VAE's config and weight files (what from_pretrained reads)."""
    root = paths.path(vae_path)
    if root.is_file():
        files = [root]
    else:
        # As glob("**/...") picked them: hidden folders (e.g. huggingface-cli's .cache/) skipped.
        files = sorted((f for f in paths.files_under(root) if f.name == "config.json" or f.suffix == ".safetensors"
                        if not any(p.startswith(".") for p in f.relative_to(root).parts)),
                       key=str) if root.is_dir() else []
    if not files:
        raise Ov3Error(f"--vae {vae_path}: no config.json / *.safetensors found.")
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() if f != root else b"")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()
