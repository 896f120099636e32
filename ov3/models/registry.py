"""Model sizes by name: the one table every config, test and export reads.

Vision towers are named "<size>/<patch>" ("B/2" = ViT-B over the latents with patch 2,
"B/1" = the ViT-B decoder with patch 1). Text towers are named by size ("B"). Widths, depths,
MLP sizes and heads are those used across OpenVision (see the notes); "mu" is a tiny size for
the CPU demo and the tests.
"""

from __future__ import annotations

import dataclasses

from ov3.errors import Ov3Error


@dataclasses.dataclass(frozen=True)
class Size:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int


VIT_SIZES: dict[str, Size] = {
    "mu": Size(64, 2, 256, 4),
    "S": Size(384, 12, 1536, 6),
    "M": Size(512, 12, 2048, 8),
    "B": Size(768, 12, 3072, 12),
    "L": Size(1024, 24, 4096, 16),
    "So400m": Size(1152, 27, 4304, 16),
    "H": Size(1280, 32, 5120, 16),
}

# Text encoder / caption decoder size used with each vision size, and the contrastive
# embedding width (notes: "Text encoder sizes used with them", "Contrastive embedding dim").
TEXT_SIZES: dict[str, Size] = {
    "mu": Size(64, 2, 256, 4),
    "S": Size(384, 12, 1536, 6),
    "B": Size(512, 12, 2048, 8),
    "L": Size(768, 12, 3072, 12),
    "So400m": Size(1152, 27, 4304, 16),
    "H": Size(1024, 24, 4096, 16),
}
EMBED_DIMS: dict[str, int] = {"mu": 64, "S": 384, "B": 512, "L": 768, "So400m": 1152, "H": 1024}


def vit_size(name: str, key: str = "model") -> tuple[Size, int]:
    """"B/2" -> (Size, patch). `key` names the config entry in the error message."""
    size, sep, patch = name.partition("/")
    if not sep or size not in VIT_SIZES or not patch.isdigit():
        raise Ov3Error(
            f"{key}={name!r} is not a known ViT name; use '<size>/<patch>' with size one of "
            f"{sorted(VIT_SIZES)} (e.g. 'B/2' for the encoder, 'B/1' for the decoder).")
    return VIT_SIZES[size], int(patch)


def decoder_size(name: str, key: str = "model.decoder") -> Size:
    """"B/1" -> Size. The decoder works on the encoder's token grid (patch 1); its output layer
    emits the encoder patch's pixels, so any other patch is a mistake, not a variant."""
    size, patch = vit_size(name, key)
    if patch != 1:
        raise Ov3Error(f"{key}={name!r}: the decoder has patch 1 over the encoder's tokens (its output "
                       f"layer un-patchifies the encoder's patch); use '{name.partition('/')[0]}/1'.")
    return size


def text_size(name: str, key: str = "model.text") -> Size:
    if name not in TEXT_SIZES:
        raise Ov3Error(f"{key}={name!r} is not a known text size; use one of {sorted(TEXT_SIZES)}.")
    return TEXT_SIZES[name]


def embed_dim(name: str, key: str = "model.embed_dim") -> int:
    if name not in EMBED_DIMS:
        raise Ov3Error(f"{key}={name!r} has no contrastive width; use one of {sorted(EMBED_DIMS)}.")
    return EMBED_DIMS[name]
