"""Input-pipeline throughput: images per second one process gets out of ov3.data.pipeline.

    python -m ov3.tools.bench_data --path runs/demo_data --image-size 64 --batch 256 \
        --workers 0,2,4 --batches 20

Measures host-side work only (read, decode, crop, tokenise, stack, to float): the batches
stay numpy (mesh=None). The first batch (worker start-up, file open) is timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from ov3.data import pipeline


def bench(path: str, *, image_size: int, batch: int, workers: int, threads: int,
          batches: int, augment: str, split: str, seed: int = 0) -> dict[str, float]:
    """Runs one configuration; returns start-up seconds and images per second after it."""
    cfg = pipeline.default_config()
    cfg.update(path=path, worker_count=workers, read_threads=threads, augment=augment)
    t0 = time.perf_counter()
    it = pipeline.make_process_iterator(
        cfg, mesh=None, global_batch_size=batch, image_size=image_size, split=split,
        train=True, seed=seed, tokenizer=None, process_index=0, process_count=1)
    next(it)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t0
    it.close()
    return {"workers": workers, "threads": threads, "first_batch_s": round(first, 3),
            "images_per_s": round(batches * batch / elapsed, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--path", required=True, help="dataset folder (ov3.data.records)")
    p.add_argument("--split", default="train")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=256, help="per-process batch size")
    p.add_argument("--workers", default="0", help="comma-separated worker counts to try")
    p.add_argument("--threads", type=int, default=8, help="read threads per process")
    p.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    p.add_argument("--augment", default="rrc", choices=pipeline.AUGMENTS)
    args = p.parse_args(argv)
    print(json.dumps({"cpus": os.cpu_count(), "path": args.path,
                      "image_size": args.image_size, "batch": args.batch}))
    for w in (int(x) for x in args.workers.split(",")):
        print(json.dumps(bench(args.path, image_size=args.image_size, batch=args.batch,
                               workers=w, threads=args.threads, batches=args.batches,
                               augment=args.augment, split=args.split)), flush=True)


if __name__ == "__main__":
    main()
