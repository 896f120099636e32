"""A procedural captioned-image set for the CPU demo: coloured shapes on a plain background.

Each image holds 1–3 groups of identical objects (a group is one shape in one colour,
1–3 of them, all small or all large). Every object sits in its own cell of a 3×3 grid
(with some jitter), so positions are words: "top left", "centre", "bottom"…
The attributes are chosen to be easy to tell apart at 64 px, so a small model learns
image↔text retrieval in minutes on a CPU.

    alt_text: "two red circles and a blue square"
    caption:  "a small image on a light gray background. two small red circles at the top
               left and on the right. a large blue square in the centre."
(several sentences, as the LLaVA recaptions are, so that the caption-sentence positive of
the contrastive loss has something to draw from; any one of them describes part of the image)

Example i of a split is drawn from its own RNG, seeded by (seed, split, i): the same
seed gives byte-identical PNGs and texts, and a larger --num-train only appends.

    python -m ov3.data.synthetic --out DIR --num-train 4096 --num-heldout 256 --size 64

writes DIR as described in ov3.data.records (splits "train" and "heldout") plus a
WordPiece vocabulary trained on the train texts, DIR/tokenizer.json. It also writes a
labelled set, DIR/colours (splits "train" and "heldout", --num-labelled), for the zero-shot
and linear-probe evaluators: each image holds one group (one shape in one colour), its int
`label` is the colour's index in COLOURS and the manifest lists the colours as its `classes`,
as `python -m ov3.data.convert imagefolder` writes a classification set. (Colour, not shape:
at the demo's 32 px a small shape is a few pixels across.)
"""

from __future__ import annotations

import argparse
import io
import math
import os
import time
import zlib

import numpy as np
from PIL import Image, ImageDraw

from ov3.data import records
from ov3.data.tokenizer import train_wordpiece

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {  # Far apart in hue or lightness, and all visible on every background.
    "red": (220, 30, 30), "green": (30, 150, 40), "blue": (30, 70, 230),
    "yellow": (235, 200, 0), "purple": (140, 40, 170), "orange": (250, 120, 0),
    "black": (20, 20, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "light gray": (200, 200, 200),
               "beige": (235, 220, 185)}
SIZES = {"small": 0.075, "large": 0.14}  # Radius as a fraction of the image side.
CELLS = (("top left", "at the top left"), ("top", "at the top"),
         ("top right", "at the top right"), ("left", "on the left"),
         ("centre", "in the centre"), ("right", "on the right"),
         ("bottom left", "at the bottom left"), ("bottom", "at the bottom"),
         ("bottom right", "at the bottom right"))
NUMBERS = ("a", "two", "three")
LABELLED_SUBDIR = "colours"  # the labelled set, a records folder of its own inside DIR


def _count(n: int, next_word: str) -> str:
    if n == 1 and next_word[0] in "aeiou":
        return "an"  # "an orange circle"
    return NUMBERS[n - 1]
_SUPERSAMPLE = 4  # Draw large, then downsample: smooth edges at any size.


def _plural(shape: str, n: int) -> str:
    if n == 1:
        return shape
    return shape + ("es" if shape.endswith("s") else "s")  # crosses, circles


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
          fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85  # Same visual area as the circle, roughly.
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8),
                      (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)],
                     fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(shape)


def make_example(seed: int, split: str, index: int, size: int = 64, one_group: bool = False) -> dict:
    """Example `index` of `split`: {key, image (PNG bytes), alt_text, caption}; with
    `one_group`, a single group, and its colour's index in COLOURS as `label`."""
    # crc32, not hash(): str hashes change between Python processes.
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    n_groups = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    if one_group:
        n_groups = 1
    kinds = rng.choice(len(SHAPES) * len(COLOURS), size=n_groups, replace=False)
    counts = [int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15])) for _ in range(n_groups)]
    cells = list(rng.permutation(len(CELLS))[:sum(counts)])
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]

    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    alt_parts, caption_parts = [], []
    cell_side = big / 3
    for kind, count in zip(kinds, counts):
        shape = SHAPES[int(kind) % len(SHAPES)]
        colour = list(COLOURS)[int(kind) // len(SHAPES)]
        size_word = list(SIZES)[int(rng.integers(len(SIZES)))]
        r = SIZES[size_word] * big
        where = sorted(cells[:count])  # Reading order: top left first.
        cells = cells[count:]
        for c in where:
            # Jitter inside the cell, keeping the whole object in it.
            slack = max(cell_side / 2 - r * 1.05, 0)
            cx = (c % 3 + 0.5) * cell_side + rng.uniform(-slack, slack)
            cy = (c // 3 + 0.5) * cell_side + rng.uniform(-slack, slack)
            _draw(draw, shape, cx, cy, r, COLOURS[colour])
        alt_parts.append(f"{_count(count, colour)} {colour} {_plural(shape, count)}")
        caption_parts.append(f"{_count(count, size_word)} {size_word} {colour} "
                             f"{_plural(shape, count)} {_join([CELLS[c][1] for c in where])}")
    img = img.reduce(_SUPERSAMPLE)  # Box-average 4x4 blocks: antialiased edges, fast.
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    example = {
        "key": f"{split}-{index:07d}",
        "image": buf.getvalue(),
        "alt_text": _join(alt_parts),
        "caption": ". ".join([f"a small image on a {background} background", *caption_parts]) + ".",
    }
    if one_group:
        example["label"] = int(kinds[0]) // len(SHAPES)
    return example


def _write_splits(out: str, sizes: dict[str, int], seed: int, size: int, one_group: bool,
                  examples_per_shard: int) -> tuple[dict, list[str]]:
    """-> (manifest entry of each split, the train split's texts)."""
    splits, texts = {}, []
    for split, n in sizes.items():
        writer = records.SplitWriter(out, split, max(1, math.ceil(n / examples_per_shard)))
        for i in range(n):
            ex = make_example(seed, split, i, size, one_group)
            writer.write(ex["key"], ex["image"], ex["alt_text"], ex["caption"],
                         {"label": ex["label"]} if one_group else None)
            if split == "train":
                texts += [ex["alt_text"], ex["caption"]]
        splits[split] = writer.close()
    return splits, texts


def write_dataset(out: str, num_train: int, num_heldout: int, size: int = 64,
                  seed: int = 0, vocab_size: int = 512, num_labelled: tuple[int, int] = (256, 128),
                  examples_per_shard: int = 2048) -> dict:
    """Writes the train and heldout splits, the manifest and DIR/tokenizer.json, and the
    labelled set DIR/colours with `num_labelled` (train, heldout) examples (none if both are 0).
    Returns the manifest entry of each split, the labelled set's as "colours/<split>"."""
    extra = {"source": "ov3.data.synthetic", "seed": seed, "image_size": size}
    splits, texts = _write_splits(out, {"train": num_train, "heldout": num_heldout}, seed, size,
                                  False, examples_per_shard)
    tok = train_wordpiece(texts, vocab_size, os.path.join(out, "tokenizer.json"))
    records.write_metadata(
        out, splits, name="ov3_synthetic_shapes",
        description="Procedural coloured shapes with alt texts and captions "
                    "(ov3.data.synthetic).",
        extra={**extra, "tokenizer": "tokenizer.json", "vocab_size": tok.vocab_size})
    if any(num_labelled):
        folder = os.path.join(out, LABELLED_SUBDIR)
        labelled, _ = _write_splits(folder, dict(zip(("train", "heldout"), num_labelled)), seed + 1, size,
                                    True, examples_per_shard)
        records.write_metadata(
            folder, labelled, name="ov3_synthetic_shapes_by_colour",
            description="One group of shapes per image, labelled by colour (ov3.data.synthetic).",
            extra={**extra, "seed": seed + 1, "classes": list(COLOURS), "label_key": "label"})
        records.add_class_label(folder, list(COLOURS))
        splits.update({f"{LABELLED_SUBDIR}/{k}": v for k, v in labelled.items()})
    return splits


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-train", type=int, default=4096)
    p.add_argument("--num-heldout", type=int, default=256)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--num-labelled", type=int, nargs=2, default=[256, 128], metavar=("TRAIN", "HELDOUT"),
                   help="examples of the labelled set DIR/colours (0 0: none)")
    args = p.parse_args(argv)
    t0 = time.time()
    splits = write_dataset(args.out, args.num_train, args.num_heldout, args.size,
                           args.seed, args.vocab_size, tuple(args.num_labelled))
    for name, info in splits.items():
        print(f"{name}: {info['num_examples']} examples, {info['num_bytes']} bytes, "
              f"{len(info['shards'])} shards")
    print(f"wrote {args.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
