"""Throughput of the frozen FLUX.1 VAE: ov3 (Flax, jitted) next to diffusers (torch, no_grad).

    python -m ov3.tools.bench_vae [--sizes 128 256] [--batch 1] [--iters 1]

Both run the full FLUX.1-dev architecture with random weights (speed does not depend on the
values) on the same input shapes. Each framework runs in its own subprocess, one after the
other, so that their peak memory is measured separately and they do not compete for cores.
Peak memory is host RSS (`ru_maxrss`, cumulative over sizes, which run smallest first); on a
GPU it is the device's peak (`memory_stats()["peak_bytes_in_use"]` for JAX,
`torch.cuda.max_memory_allocated` for torch). Warm-up calls (including XLA compilation) are
excluded from the timings; the first call (compile included) is reported separately.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np


def _host_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn, warmup: int, iters: int) -> tuple[float, float, Any]:
    """-> (seconds of the first call, mean seconds per timed call, last output).

    The first call (XLA compilation for ov3) is one of the `warmup` calls, never timed.
    """
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    return first, (time.perf_counter() - t0) / iters, out


def _worker_ov3(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    from ov3.models import vae as V

    vae = V.init_random(V.FLUX1_DEV_CONFIG, seed=0, dtype=jnp.dtype(args.dtype))
    device = jax.devices()[0]
    enc = jax.jit(vae.encode_fn)
    dec = jax.jit(vae.decode_fn)
    rows = []
    for size in args.sizes:
        x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (args.batch, size, size, 3)),
                        jnp.float32)
        enc_first, enc_s, z = _timed(lambda: jax.block_until_ready(enc(vae.params, x)),
                                     args.warmup, args.iters)
        dec_first, dec_s, _ = _timed(lambda: jax.block_until_ready(dec(vae.params, z)),
                                     args.warmup, args.iters)
        stats = device.memory_stats() if device.platform != "cpu" else None
        peak = stats["peak_bytes_in_use"] / 2**20 if stats else _host_peak_mb()
        rows.append(dict(size=size, encode=args.batch / enc_s, decode=args.batch / dec_s,
                         first=enc_first + dec_first, peak_mb=peak,
                         device=f"{device.platform}:{device.device_kind}"))
    return rows


def _worker_diffusers(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from diffusers import AutoencoderKL

    from ov3.models import vae as V

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    cfg = {k: v for k, v in V.FLUX1_DEV_CONFIG.items() if not k.startswith("_")}
    model = AutoencoderKL(**cfg).to(dev, dtype).eval()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for size in args.sizes:
        x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, size, size)))
        x = x.to(dev, dtype)
        with torch.no_grad():

            def enc():
                out = model.encode(x).latent_dist.mean
                sync()
                return out

            def dec():
                out = model.decode(z).sample
                sync()
                return out

            enc_first, enc_s, z = _timed(enc, args.warmup, args.iters)
            dec_first, dec_s, _ = _timed(dec, args.warmup, args.iters)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _host_peak_mb()
        rows.append(dict(size=size, encode=args.batch / enc_s, decode=args.batch / dec_s,
                         first=enc_first + dec_first, peak_mb=peak,
                         device=f"torch:{dev.type} ({torch.get_num_threads()} threads)"))
    return rows


def _run_worker(name: str, argv: list[str]) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "ov3.tools.bench_vae", "--worker", name, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"bench_vae: the {name} worker failed (exit {proc.returncode}).")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per op (>= 1)")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--worker", choices=["ov3", "diffusers"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = sorted(args.sizes)
    args.warmup = max(1, args.warmup)
    if args.worker:
        rows = (_worker_ov3 if args.worker == "ov3" else _worker_diffusers)(args)
        print(json.dumps(rows))
        return

    passthrough = ["--sizes", *map(str, args.sizes), "--batch", str(args.batch),
                   "--warmup", str(args.warmup), "--iters", str(args.iters), "--dtype", args.dtype]
    t0 = time.perf_counter()
    ov3 = _run_worker("ov3", passthrough)
    ref = _run_worker("diffusers", passthrough)
    print(f"FLUX.1 VAE (83.8M params, random init), batch {args.batch}, {args.dtype}, "
          f"{args.iters} timed iteration(s) after {args.warmup} warm-up")
    print(f"ov3: {ov3[0]['device']}   diffusers: {ref[0]['device']}")
    header = f"{'px':>4} {'op':<7} {'ov3 img/s':>10} {'diffusers img/s':>16} {'ratio':>6}"
    print(header + "\n" + "-" * len(header))
    for a, b in zip(ov3, ref):
        for op in ("encode", "decode"):
            print(f"{a['size']:>4} {op:<7} {a[op]:>10.3f} {b[op]:>16.3f} {a[op] / b[op]:>6.2f}")
    print("\npeak memory (MiB, cumulative up to this size); first call = encode + decode, "
          "including XLA compilation for ov3")
    for a, b in zip(ov3, ref):
        print(f"{a['size']:>4}  ov3 {a['peak_mb']:>8.0f} MiB, first {a['first']:>6.1f}s   "
              f"diffusers {b['peak_mb']:>8.0f} MiB, first {b['first']:>6.1f}s")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
