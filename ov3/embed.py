"""CLI: python -m ov3.embed --workdir DIR --images FOLDER --out OUT.npy [--step N] [--tokens]

Embeds every image under FOLDER (recursively; jpg/png/webp/...) with the run's encoder:
decoded and centre-cropped as the training pipeline's eval split does, VAE-encoded, ViT.
Writes OUT.npy (N, E) float32 pooled embeddings (L2-normalised with --normalize), OUT.txt
with the N image paths (relative to FOLDER) in row order, and with --tokens OUT.tokens.npy
(N, tokens, width) holding z_u. Unreadable images are skipped and listed on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ov3 import paths
from ov3.errors import Ov3Error

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(folder: paths.Path) -> list[paths.Path]:
    if not folder.is_dir():
        raise Ov3Error(f"--images {folder} is not a folder.")
    found = [p for p in paths.files_under(folder) if p.suffix.lower() in EXTENSIONS]
    if not found:
        raise Ov3Error(f"--images {folder} holds no image files ({', '.join(sorted(EXTENSIONS))}).")
    return found


def load_image(path: paths.Path, size: int) -> np.ndarray:
    """File -> (size, size, 3) float32 in [-1, 1], like the eval pipeline (raises decode.Skip)."""
    from ov3.data import decode, shapes
    img = shapes.center_crop(decode.decode_image(path.read_bytes()), size)
    return np.asarray(img, np.float32) * np.float32(2 / 255) - 1


def embed(workdir: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
          batch_size: int = 32, tokens: bool = False, normalize: bool = False,
          vae_path: str | None = None) -> int:
    from ov3.data import decode
    from ov3.inference import Encoder, l2_normalize

    folder, out = paths.path(images), paths.path(out)
    if out.suffix != ".npy":
        raise Ov3Error(f"--out {out} must end in .npy.")
    files = list_images(folder)
    encoder = Encoder.from_workdir(workdir, step, vae_path=vae_path)
    size = encoder.image_size
    kept: list[paths.Path] = []
    pooled_rows, token_rows = [], []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            n = len(batch)  # pad the last batch: one compiled shape for the whole folder
            x = np.stack(batch + [np.zeros_like(batch[0])] * (batch_size - n))
            pooled, toks = encoder.encode_images(x)
            pooled_rows.append(np.asarray(pooled)[:n])
            if tokens:
                token_rows.append(np.asarray(toks)[:n])
            batch.clear()

    for path in files:
        try:
            batch.append(load_image(path, size))
        except decode.Skip as s:
            print(f"ov3.embed: skipped {path}: {s}", file=sys.stderr)
            continue
        kept.append(path)
        if len(batch) == batch_size:
            flush()
    flush()
    if not kept:
        raise Ov3Error(f"none of the {len(files)} files under {folder} could be decoded.")
    pooled = np.concatenate(pooled_rows)
    paths.makedirs(out.parent)
    save_npy(out, l2_normalize(pooled) if normalize else pooled)
    out.with_suffix(".txt").write_text("".join(f"{p.relative_to(folder)}\n" for p in kept))
    if tokens:
        save_npy(out.with_suffix(".tokens.npy"), np.concatenate(token_rows))
    return len(kept)


def save_npy(path: paths.Path, array: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, array)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ov3.embed", description=__doc__.split("\n\n")[1])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True, help="OUT.npy")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", action="store_true", help="also write OUT.tokens.npy (z_u)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the pooled embeddings")
    parser.add_argument("--vae", default=None, help="VAE path, if not config.vae.path")
    args = parser.parse_args(argv)
    try:
        n = embed(args.workdir, args.images, args.out, args.step, args.batch_size, args.tokens,
                  args.normalize, args.vae)
    except Ov3Error as e:
        print(f"ov3: error: {e}", file=sys.stderr)
        return 2
    print(f"embedded {n} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
