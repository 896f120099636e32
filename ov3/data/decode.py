"""Robust decoding of stored examples: image bytes → RGB uint8, text bytes → str.

Web-scale data is dirty. Nothing here raises on bad data: a bad example is *skipped*
with one of the reason strings in `SKIP_REASONS`, and the pipeline counts skips per
reason (logged as `data/skipped/<reason>`). Images that are merely unusual are
converted rather than skipped:

- grayscale, palette, CMYK, YCbCr, LAB → RGB (PIL's conversions);
- alpha (RGBA, LA, palette with transparency) → composited onto white, because the
  colour under fully transparent pixels is arbitrary (often black) and web images
  with transparency are meant to be seen on a light page;
- 16-bit / 32-bit integer and float images → scaled to 8 bit (PIL's own conversion
  would clip them to 255 instead);
- EXIF orientation is applied (phone JPEGs are often stored rotated);
- animated images: the first frame.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

SKIP_REASONS = (
    "bad_record",         # the record is not an ov3 example (unparseable, field missing)
    "empty_image",        # zero image bytes
    "corrupt_image",      # not an image PIL can identify or decode
    "truncated_image",    # the file ends early
    "image_too_large",    # more pixels than max_pixels: decompression-bomb guard
    "image_too_small",    # a side shorter than min_side
    "empty_text",         # alt text or caption empty after stripping whitespace
    "text_not_utf8",      # alt text or caption bytes are not valid UTF-8
)
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192; real photos are far smaller.


class Skip(Exception):
    """Raised inside decoding to skip an example; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int = 1, draft_side: int = 0) -> Image.Image:
    """Encoded bytes → a loaded RGB PIL image, or raises `Skip`.

    `draft_side` > 0 lets JPEGs decode at 1/2, 1/4 or 1/8 scale (libjpeg scales in the
    DCT, several times faster than decoding in full and resizing) as long as the shorter
    side stays >= draft_side. Other formats decode in full.
    """
    if not data:
        raise Skip("empty_image")
    # PIL has its own bomb guard (a global): warn above MAX_IMAGE_PIXELS, raise above
    # twice that. We check the header size against our own cap before decoding, so
    # silence its warning and still treat its error as "too large".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise Skip("image_too_large", str(e)) from e
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError…).
            raise Skip(_broken_reason(e), f"{type(e).__name__}: {e}") from e
        w, h = img.size
        if w * h > max_pixels:
            raise Skip("image_too_large", f"{w}x{h} > max_pixels={max_pixels}")
        if min(w, h) < min_side:
            raise Skip("image_too_small", f"{w}x{h}, min_side={min_side}")
        try:
            if draft_side and img.format == "JPEG":
                img.draft(None, (draft_side, draft_side))
            img.load()
        except Image.DecompressionBombError as e:
            raise Skip("image_too_large", str(e)) from e
        except Exception as e:
            raise Skip(_broken_reason(e), f"{type(e).__name__}: {e}") from e
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # A malformed EXIF block must not cost us the image.
        pass
    return to_rgb(img)


def _broken_reason(e: Exception) -> str:
    """PIL reports a short file as EOFError or an OSError saying "truncated"."""
    msg = str(e).lower()
    if isinstance(e, EOFError) or "truncated" in msg or "end of file" in msg:
        return "truncated_image"
    return "corrupt_image"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB (see the module docstring for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            a = a / 257.0  # 65535 → 255
        elif img.mode == "I" and a.max(initial=0) > 255:
            a = a / 257.0  # PIL opens 16-bit grayscale PNGs as mode I.
        elif img.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0  # Float images are usually in [0, 1].
        g = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([g] * 3, axis=-1))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_text(data: bytes | str) -> str:
    """UTF-8 bytes → stripped str, or raises `Skip` (empty or not UTF-8)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Skip("text_not_utf8", str(e)) from e
    text = data.strip()
    if not text:
        raise Skip("empty_text")
    return text
