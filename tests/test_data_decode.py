"""ov3.data.decode: unusual images are converted, broken ones skipped with a reason."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ov3.data import decode


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_claiming_size(w: int, h: int) -> bytes:
    """A 1x1 PNG whose header says w x h (CRC fixed): a decompression bomb's shape."""
    data = bytearray(_encode(Image.new("RGB", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", w, h)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def _reason(fn, *args, **kw) -> str:
    with pytest.raises(decode.Skip) as e:
        fn(*args, **kw)
    return e.value.reason


def test_broken_images_are_skipped_with_reasons():
    good = _encode(Image.new("RGB", (40, 30), (10, 20, 30)), "JPEG")
    assert _reason(decode.decode_image, b"") == "empty_image"
    assert _reason(decode.decode_image, b"not an image at all") == "corrupt_image"
    assert _reason(decode.decode_image, good[:len(good) // 2]) == "truncated_image"
    png = _encode(Image.fromarray(np.random.default_rng(0).integers(
        0, 255, (32, 32, 3), dtype=np.uint8)))
    assert _reason(decode.decode_image, png[:len(png) - 200]) == "truncated_image"
    assert _reason(decode.decode_image, _png_claiming_size(30000, 30000)) == "image_too_large"
    assert _reason(decode.decode_image, _png_claiming_size(9000, 9000)) == "image_too_large"
    assert _reason(decode.decode_image, _png_claiming_size(3000, 3000)) == "truncated_image"
    assert _reason(decode.decode_image, good, max_pixels=40 * 30 - 1) == "image_too_large"
    assert _reason(decode.decode_image, good, min_side=31) == "image_too_small"
    assert decode.decode_image(good, max_pixels=40 * 30, min_side=30).size == (40, 30)


def test_modes_convert_to_rgb_uint8():
    gray = Image.fromarray(np.full((4, 6), 77, np.uint8))
    out = np.asarray(decode.decode_image(_encode(gray)))
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8 and (out == 77).all()

    g16 = Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16))  # 16-bit PNG
    out = np.asarray(decode.decode_image(_encode(g16)))
    assert (out == 127).all()

    rgba = Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 255, 0]]], np.uint8))
    out = np.asarray(decode.decode_image(_encode(rgba)))
    np.testing.assert_array_equal(out, [[[255, 0, 0], [255, 255, 255]]])  # on white

    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red ink
    out = np.asarray(decode.decode_image(_encode(cmyk, "JPEG", quality=100)))
    assert out.shape == (3, 3, 3) and out[..., 0].min() > 200 and out[..., 1:].max() < 60

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 255, 0, 9, 9, 9] + [0] * 762)
    pal.putpixel((1, 0), 1)
    out = np.asarray(decode.decode_image(_encode(pal, transparency=1)))
    np.testing.assert_array_equal(out, [[[0, 255, 0], [255, 255, 255]]])


def test_text():
    assert decode.decode_text(b"  a red circle \n") == "a red circle"
    assert decode.decode_text("caf\u00e9") == "caf\u00e9"
    assert _reason(decode.decode_text, b" \t\n") == "empty_text"
    assert _reason(decode.decode_text, b"") == "empty_text"
    assert _reason(decode.decode_text, b"caf\xe9") == "text_not_utf8"


def test_jpeg_draft_decodes_smaller_but_big_enough():
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), np.uint8))
    jpeg, png = _encode(photo, "JPEG"), _encode(photo)
    assert decode.decode_image(jpeg).size == (400, 300)
    assert decode.decode_image(jpeg, draft_side=140).size == (200, 150)  # 1/2 scale
    assert decode.decode_image(jpeg, draft_side=151).size == (400, 300)  # 1/2 too small
    assert decode.decode_image(jpeg, draft_side=60).size == (100, 75)    # 1/4 scale
    assert decode.decode_image(jpeg, draft_side=30).size == (50, 38)     # 1/8 scale
    assert decode.decode_image(png, draft_side=30).size == (400, 300)
