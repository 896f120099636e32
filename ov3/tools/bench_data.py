"""Input-pipeline throughput: images per second (and per CPU core) out of ov3.data.pipeline.

    python -m ov3.tools.bench_data --path DIR --image-size 128,256 --batch 256 \
        --workers 0,2 --threads 1 --batches 20 [--step-time 0.45 --global-batch 8192 --hosts 16]
    python -m ov3.tools.bench_data --make-jpeg 512 --path /tmp/jpeg_bench ...  # photo-like set
    python -m ov3.tools.bench_data --path CACHE --cached-latents --image-size 128 ...
    python -m ov3.tools.bench_data --path DIR --read-latency-ms 0,30 --repeats 3  # bucket reads

Measures host-side work only (read, decode, crop, tokenise, stack, to float): the batches
stay numpy (mesh=None). The first batch (worker start-up, file open) is timed separately.

Per core: with --workers 0 every thread is in this process, so CPU seconds / images is
the cost of one image on one core (`img_per_cpu_s`), a figure that holds up better than
wall time on a shared machine. With --step-time, the table says whether one host keeps up
with the train step: needed = global batch / hosts / step time images per second, against
img_per_cpu_s x the cores this process may use (assumes decoding scales over cores, which
it does with grain workers; leave one or two cores for the train loop).

--read-latency-ms L delays every record read by L ms (a GCS range read costs ~30 ms):
settings run back to back, `--repeats` times, and each rate is also given as a ratio to
the 0 ms rate of the same repeat (>= 0.9: the read threads hide the latency). Worker,
thread and prefetch counts default to the pipeline's (ov3.data.pipeline.default_config).

--make-jpeg N writes N photo-like JPEGs (smooth colour fields + texture, shorter side
256-768 px, quality 90, captions of ~60 words as Recap-DataComp's) to --path first, when
--path holds no dataset yet.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image

from ov3.data import pipeline, records
from ov3.data.tokenizer import train_wordpiece

_WORDS = ("a photo of the red old wooden house with large windows near green trees under "
          "blue cloudy sky in winter light man woman dog cat sitting standing on street "
          "beside small white car and bicycle while people walk across busy city square").split()


def make_jpeg_dataset(out: str, num: int, seed: int = 0) -> None:
    """Photo-like JPEG records (sizes and file sizes of web photos) plus a tokenizer."""
    rng = np.random.default_rng(seed)
    writer = records.SplitWriter(out, "train", max(1, num // 256))
    texts = []
    for i in range(num):
        short = int(rng.integers(256, 769))
        ratio = [4 / 3, 3 / 4, 16 / 9, 1.0][i % 4]
        w, h = (round(short * ratio), short) if ratio >= 1 else (short, round(short / ratio))
        low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)  # smooth colour field...
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32)
        img += rng.normal(0, 12, (h, w, 1))  # ...with texture, so JPEGs get realistic sizes
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        caption = " ".join(rng.choice(_WORDS, 60))
        alt = " ".join(rng.choice(_WORDS, 10))
        writer.write(f"{i:07d}", buf.getvalue(), alt, caption)
        texts += [alt, caption]
    records.write_metadata(out, {"train": writer.close()}, name="ov3_bench_jpeg",
                           description="Photo-like JPEGs for ov3.tools.bench_data.")
    train_wordpiece(texts, 512, os.path.join(out, "tokenizer.json"))


def bench(path: str, *, image_size: int, batch: int, workers: int, threads: int,
          batches: int, augment: str, split: str, seed: int = 0, prefetch: int = 0,
          cached_latents: bool = False, read_latency_ms: float = 0) -> dict[str, float]:
    """Runs one configuration; returns start-up seconds and throughput after it."""
    cfg = pipeline.default_config()
    cfg.update(path=path, worker_count=workers, read_threads=threads, augment=augment,
               use_cached_latents=cached_latents, prefetch=prefetch or cfg.prefetch)
    t0 = time.perf_counter()
    it = pipeline.make_process_iterator(
        cfg, mesh=None, global_batch_size=batch, image_size=image_size, split=split,
        train=True, seed=seed, tokenizer=None, process_index=0, process_count=1,
        read_latency_ms=read_latency_ms)
    next(it)
    first = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    it.close()
    result = {"image_size": image_size, "workers": workers, "threads": threads,
              "prefetch": cfg.prefetch, "read_latency_ms": read_latency_ms,
              "first_batch_s": round(first, 3), "images_per_s": round(batches * batch / elapsed, 1)}
    if workers == 0:  # Every decoding thread is in this process: CPU time is the whole cost.
        result["img_per_cpu_s"] = round(batches * batch / cpu, 1)
    return result


def keeps_up(result: dict, step_time: float, global_batch: int, hosts: int,
             cores: int) -> dict[str, float]:
    """Needed images/s per host for the step, against what was measured (ratio >= 1: keeps
    up) and, from the per-core cost, how many cores it takes and what all `cores` give."""
    needed = global_batch / hosts / step_time
    out = {"needed_img_per_s": round(needed, 1),
           "ratio_measured": round(result["images_per_s"] / needed, 2)}
    if "img_per_cpu_s" in result:
        out["cores_needed"] = round(needed / result["img_per_cpu_s"], 2)
        out["ratio_all_cores"] = round(result["img_per_cpu_s"] * cores / needed, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--path", required=True, help="dataset folder (ov3.data.records)")
    p.add_argument("--make-jpeg", type=int, default=0,
                   help="first write this many photo-like JPEGs to --path (if it is empty)")
    p.add_argument("--split", default="train")
    p.add_argument("--image-size", default="128", help="comma-separated sizes to try")
    p.add_argument("--batch", type=int, default=256, help="per-process batch size")
    defaults = pipeline.default_config()
    p.add_argument("--workers", default=str(defaults.worker_count),
                   help="comma-separated worker counts to try")
    p.add_argument("--threads", type=int, default=defaults.read_threads,
                   help="read threads per process (or per worker)")
    p.add_argument("--prefetch", type=int, default=defaults.prefetch,
                   help="examples buffered ahead per process")
    p.add_argument("--read-latency-ms", default="0",
                   help="comma-separated per-read delays to try (a GCS range read: ~30)")
    p.add_argument("--repeats", type=int, default=1, help="runs of every setting")
    p.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    p.add_argument("--augment", default="rrc", choices=pipeline.AUGMENTS)
    p.add_argument("--cached-latents", action="store_true",
                   help="--path is a latent cache (ov3.data.cache_latents)")
    p.add_argument("--step-time", type=float, default=0.0,
                   help="train step seconds to compare with (0: no comparison)")
    p.add_argument("--global-batch", type=int, default=0, help="default: --batch")
    p.add_argument("--hosts", type=int, default=1, help="processes sharing the global batch")
    args = p.parse_args(argv)
    if args.make_jpeg and not os.path.exists(os.path.join(args.path, records.MANIFEST)):
        t0 = time.time()
        make_jpeg_dataset(args.path, args.make_jpeg)
        print(f"wrote {args.make_jpeg} JPEGs to {args.path} in {time.time() - t0:.1f}s")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(json.dumps({"cores": cores, "path": args.path, "batch": args.batch}))
    latencies = [float(x) for x in args.read_latency_ms.split(",")]
    for repeat in range(args.repeats):
        for size in (int(s) for s in args.image_size.split(",")):
            for w in (int(x) for x in args.workers.split(",")):
                base = None
                for latency in latencies:  # back to back: the machine's load is alike
                    result = bench(args.path, image_size=size, batch=args.batch, workers=w,
                                   threads=args.threads, prefetch=args.prefetch,
                                   batches=args.batches, augment=args.augment,
                                   split=args.split, cached_latents=args.cached_latents,
                                   read_latency_ms=latency)
                    result.update(repeat=repeat,
                                  loadavg=[round(x, 2) for x in os.getloadavg()])
                    if latency == 0:
                        base = result["images_per_s"]
                    elif base:
                        result["ratio_to_0ms"] = round(result["images_per_s"] / base, 3)
                    if args.step_time > 0:
                        result.update(keeps_up(result, args.step_time,
                                               args.global_batch or args.batch, args.hosts,
                                               cores))
                    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
