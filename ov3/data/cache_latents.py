"""Latent cache: encode a dataset once with the frozen VAE, then train without its encoder.

    python -m ov3.data.cache_latents --data DIR --vae PATH --image-size 256 --out OUT \
        [--batch 64] [--splits train,heldout] [--latent-norm scale] [--dtype float32]
    python -m ov3.main --config ... --config.data.path=OUT \
        --config.data.use_cached_latents=True --config.image_size=256

Beyond the paper. The VAE is frozen, so the latents of a given crop never change; OV3
recomputes them every step (the VAE encoder is a large share of the step at 128-256 px).
This tool computes them once: each image is centre-cropped to S x S exactly as the
pipeline's eval crop (ov3.data.shapes.center_crop, same JPEG draft decoding) and encoded
with `VAE.encode` (posterior mean, normalised with `--latent-norm`, as in training).

AUGMENTATION IS FIXED in cached mode: every epoch sees the same centre crop, where the
uncached pipeline draws a new random resized crop each time (config.data.augment="rrc").
Use it where that is acceptable (short stages, high-resolution fine-tuning, ablations),
and cache once per image size.

OUT is an ov3 records folder (grain and TFDS read it), one output shard per input shard.
Each record holds `key`, `image` (PNG of the S x S crop: the pixel-loss target, lossless),
`alt_text`, `caption` and every other field (`label`, the `captions` list...) as the input did, plus `latent`
(bfloat16, row-major h x w x c, raw bytes) and `latent_shape` ("h,w,c"). The manifest's
`latent_cache` names the VAE (path, sha256 of its files), image size, latent shape and
normalisation. Resumable like ov3.data.convert: re-run the same command after an
interruption. Runs in one process; the batch is split over all local devices.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ov3.data import decode, records, resumable, shapes
from ov3.data.shapes import FORMAT, vae_fingerprint
from ov3.errors import Ov3Error

class _Load:
    """Record → {key, alt_text, caption, extra, png, pixels} of the S x S centre crop, or
    {"skip": reason}. `extra`: every other field as stored (label, the `captions` list...)."""

    def __init__(self, image_size: int, max_pixels: int, min_side: int):
        self.size, self.max_pixels, self.min_side = image_size, max_pixels, min_side

    def __call__(self, record: bytes) -> dict[str, Any]:
        try:
            fields = records.parse_features(record)
            out = {"key": fields["key"][0], "alt_text": fields["alt_text"][0],
                   "caption": fields["caption"][0],
                   "extra": {k: v for k, v in fields.items() if k not in records.FEATURES}}
            img = decode.decode_image(fields["image"][0], max_pixels=self.max_pixels,
                                      min_side=self.min_side, draft_side=self.size)
        except (ValueError, KeyError, IndexError):
            return {"skip": "bad_record"}
        except decode.Skip as s:
            return {"skip": s.reason}
        img = shapes.center_crop(img, self.size)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)  # Fast; photos barely compress more.
        out.update(png=buf.getvalue(), pixels=np.asarray(img, np.uint8))
        return out


def cache_split(data: str, out: str, split: str, vae, *, image_size: int, batch: int,
                plan: dict, metadata: dict, threads: int, bar, max_pixels: int,
                min_side: int) -> dict:
    """Encodes one split into `out` (resumable); returns the manifest, which lists it."""
    files = records.split_files(data, split)
    job = resumable.ShardedJob(out, split, len(files), plan)
    try:
        _encode_shards(job, files, vae, image_size=image_size, batch=batch, threads=threads,
                       bar=bar, load=_Load(image_size, max_pixels, min_side))
        entry, _ = job.finalize()
        manifest = resumable.merge_metadata(out, split, entry, **metadata)
        job.cleanup()
    finally:
        job.release()
    return manifest


def _encode_shards(job: resumable.ShardedJob, files: list[str], vae, *, image_size: int,
                   batch: int, threads: int, bar, load: _Load) -> None:
    todo = job.pending()
    # Data parallel over the local devices (params are replicated by jit).
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    padded = -(-batch // jax.device_count()) * jax.device_count()  # whole rows per device
    for i, path in enumerate(files):
        src = grain.sources.ArrayRecordDataSource([path])
        if i not in todo:
            bar.update(len(src))
            continue
        writer = records.SplitWriter(*job.writer_args(i), validate=False)
        rows = iter(grain.MapDataset.source(src).map(load).to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * padded)))
        while True:
            good = []
            for row in rows:
                bar.update(1)
                if "skip" in row:
                    writer.skipped[row["skip"]] = writer.skipped.get(row["skip"], 0) + 1
                else:
                    good.append(row)
                if len(good) == batch:
                    break
            if not good:
                break
            x = np.zeros((padded, image_size, image_size, 3), np.float32)
            x[:len(good)] = np.stack([r["pixels"] for r in good]) * np.float32(2 / 255) - 1
            z = vae.encode(jax.device_put(x, sharding)).astype(jnp.bfloat16)
            z = np.asarray(jax.device_get(z))[:len(good)]
            for r, zi in zip(good, z):
                extra = {**r["extra"], "latent": zi.tobytes(), "latent_shape": ",".join(map(str, zi.shape))}
                writer.write(r["key"].decode(), r["png"], r["alt_text"], r["caption"], extra)
        job.mark_done(i, writer.close())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ov3.data.cache_latents",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="input ov3 records folder")
    p.add_argument("--vae", required=True, help="diffusers VAE folder or FLUX ae.safetensors")
    p.add_argument("--image-size", type=int, required=True, help="crop side S in pixels")
    p.add_argument("--out", required=True, help="output folder (the cache)")
    p.add_argument("--batch", type=int, default=64, help="images per VAE call")
    p.add_argument("--splits", default="", help="comma list (default: all of --data)")
    p.add_argument("--latent-norm", default="scale", choices=("scale", "scale_shift"),
                   help="as config.vae.latent_norm of the runs that will use the cache")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="VAE compute dtype (the stored latents are bfloat16 either way)")
    p.add_argument("--threads", type=int, default=8, help="decoding threads")
    p.add_argument("--max-pixels", type=int, default=64 * 1024 * 1024)
    p.add_argument("--min-side", type=int, default=8)
    args = p.parse_args(argv)
    try:
        run(args)
    except Ov3Error as e:
        print(f"ov3: error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from ov3.models import vae_weights

    if args.image_size % 16:
        raise Ov3Error(f"--image-size {args.image_size} must be divisible by 16 (as "
                       "config.image_size).")
    manifest = records.read_manifest(args.data)
    splits = [s for s in args.splits.split(",") if s] or list(manifest["splits"])
    vae = vae_weights.from_pretrained(args.vae, getattr(jnp, args.dtype), args.latent_norm)
    f = vae.config.downsample_factor
    shape = [args.image_size // f, args.image_size // f, vae.config.latent_channels]
    info = {"format": FORMAT, "image_size": args.image_size, "crop": "center",
            "latent_shape": shape, "latent_dtype": "bfloat16",
            "vae": os.path.abspath(args.vae), "vae_sha256": vae_fingerprint(args.vae),
            "latent_norm": args.latent_norm, "vae_dtype": args.dtype,
            "data": os.path.abspath(args.data)}
    total = sum(manifest["splits"][s]["num_examples"] for s in splits
                if s in manifest["splits"])
    bar = tqdm(total=total, unit="img", desc="caching latents", smoothing=0.05)
    t0 = time.time()
    kept = {k: manifest[k] for k in ("classes", "class_folders", "label_key", "texts_key", "per_split")
            if k in manifest}
    done = {}
    if os.path.exists(os.path.join(args.out, records.MANIFEST)):
        existing = records.read_manifest(args.out)
        if existing.get("latent_cache") != info:  # Splits of one cache must match.
            raise Ov3Error(f"{args.out} already holds a cache made with other settings "
                           f"({existing.get('latent_cache')}); choose another --out.")
        done = existing["splits"]
    result = None
    for split in splits:
        if split in done and not os.path.exists(os.path.join(args.out, f".work-{split}")):
            print(f"{args.out}: split {split!r} is already cached; skipping it.")
            bar.update(manifest["splits"][split]["num_examples"])
            continue
        metadata = {"name": f"{manifest['name']}_latents_{args.image_size}",
                    "description": f"VAE latents of {manifest['name']} at {args.image_size} "
                                   "px (ov3.data.cache_latents).",
                    "extra": {"source": "ov3.data.cache_latents", "latent_cache": info, **kept}}
        result = cache_split(args.data, args.out, split, vae, image_size=args.image_size,
                             batch=args.batch, plan={"format": "latent_cache", **info},
                             metadata=metadata, threads=args.threads, bar=bar,
                             max_pixels=args.max_pixels, min_side=args.min_side)
    bar.close()
    if "classes" in kept:
        records.add_class_label(args.out, kept["classes"])
    if "texts_key" in kept:  # several captions an image (Karpathy sets): retrieval reads them
        records.add_text_list(args.out, kept["texts_key"])
    tok = os.path.join(args.data, "tokenizer.json")
    if os.path.exists(tok):
        shutil.copyfile(tok, os.path.join(args.out, "tokenizer.json"))
    result = result or records.read_manifest(args.out)
    n = sum(result["splits"][s]["num_examples"] for s in splits)
    print(f"cached {n} examples of {splits} in {time.time() - t0:.1f} s → {args.out}")
    for s in splits:
        skipped = result["splits"][s]["skipped"]
        print(f"  {s}: {result['splits'][s]['num_examples']} examples, "
              f"{result['splits'][s]['num_bytes'] / 1e6:.1f} MB, skipped {skipped or 'none'}")
    if "classes" not in kept:
        from ov3.data.tokenizer import describe
        print(describe(args.out))
    return result


if __name__ == "__main__":
    main()
