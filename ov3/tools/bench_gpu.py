"""One-shot benchmark for one NVIDIA H100 / H200 machine (< 8 minutes): what a GPU does with ov3.

    python -m ov3.tools.bench_gpu                     # OV3-B, 128 px, batch 128 per GPU, bf16
    python -m ov3.tools.bench_gpu --batch 256 --steps 10
    python -m ov3.tools.bench_gpu --config configs/demo.py --batch 8 --gemm 512 --vae_size 32  # CPU smoke run

Prints, in order:
1. a measured bf16 GEMM ceiling (an n x n x n matmul, jitted, best of a few), TFLOP/s;
2. the OV3-B train step at 128 px (random weights and batches, `ov3.tools.bench`), without and
   with cached latents (the VAE encoder skipped): step time, img/s, MFU against the datasheet
   peak (ov3/perf.py) and against the measured GEMM ceiling, peak device memory, compile time;
3. ov3's FLUX.1 VAE against diffusers' on this GPU (`ov3.tools.bench_vae`), encode and decode.
Each part runs in a fresh process (JAX takes most of the GPU's memory when it starts).

The lent GPU machine has jax (CUDA), flax, optax, orbax, torch and transformers but not
ml_collections, grain, array_record, clu, tensorboardX or diffusers, runs Python 3.12 and
reaches no package registry. Download their wheels beforehand, on a machine that reaches PyPI,
into the ignored folder .whl/ of the checkout (about 12 MB):

    pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \\
        ml_collections grain array_record clu tensorboardX diffusers cloudpickle portpicker wrapt importlib_metadata

This script installs whichever of them is missing from .whl/ (`pip install --no-index --no-deps
--find-links .whl`) before importing ov3, and says which it installed.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import time

# import name -> wheel name, for what ov3 needs and the GPU machine may lack.
# The first six are ov3's own requirements; the rest are theirs (grain: cloudpickle, portpicker;
# clu: wrapt; diffusers: importlib_metadata) that a jax + torch + transformers machine may lack.
NEEDED = {"ml_collections": "ml_collections", "grain": "grain", "array_record": "array_record",
          "clu": "clu", "tensorboardX": "tensorboardX", "diffusers": "diffusers",
          "cloudpickle": "cloudpickle", "portpicker": "portpicker", "wrapt": "wrapt",
          "importlib_metadata": "importlib_metadata"}
WHEELS = pathlib.Path(__file__).resolve().parents[2] / ".whl"


def install_missing(wheels: pathlib.Path = WHEELS) -> list[str]:
    """pip-install from `wheels` every package of NEEDED that does not import; returns their names."""
    missing = [wheel for module, wheel in NEEDED.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return []
    if not wheels.is_dir():
        raise SystemExit(f"bench_gpu: {', '.join(missing)} not installed and no {wheels} to install them "
                         "from; download the wheels first (see this file's docstring).")
    print(f"installing from {wheels}: {', '.join(missing)}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--find-links", str(wheels), *missing], check=True)
    importlib.invalidate_caches()
    return missing


def gemm_tflops(n: int, iters: int = 10) -> dict[str, float | str]:
    """Best bf16 n^3 matmul rate on device 0 (fp32 accumulation), in a fresh process."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    jax.block_until_ready(mm(a, b))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = mm(a, b)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / iters)
    return {"tflops": 2 * n ** 3 / best / 1e12, "device_kind": jax.devices()[0].device_kind}


def main() -> None:
    installed = install_missing()
    from ov3 import xla_flags
    applied = xla_flags.apply()  # the flags training would run with, set before JAX starts

    import multiprocessing

    from absl import app, flags
    from ml_collections import config_flags

    from ov3 import perf
    from ov3.tools import bench, bench_vae
    config = config_flags.DEFINE_config_file("config", "configs/ov3_b.py:pretrain", "configs/*.py[:arg]",
                                             lock_config=False)
    batch = flags.DEFINE_integer("batch", 128, "global batch of the train step (one GPU)")
    steps = flags.DEFINE_integer("steps", 5, "timed train steps per setting")
    gemm = flags.DEFINE_integer("gemm", 8192, "n of the n x n x n bf16 GEMM ceiling")
    vae_size = flags.DEFINE_integer("vae_size", 128, "image side for ov3 VAE vs diffusers")
    vae_batch = flags.DEFINE_integer("vae_batch", 16, "batch for ov3 VAE vs diffusers")

    def go(argv: list[str]) -> None:
        del argv
        t0 = time.perf_counter()
        print(f"python {sys.version.split()[0]}; installed from .whl: {', '.join(installed) or 'none'}; "
              f"XLA flags set: {applied or 'none (CPU, or already set)'}", flush=True)
        spawn = multiprocessing.get_context("spawn")
        with spawn.Pool(1) as pool:
            ceiling = pool.apply(gemm_tflops, (gemm.value,))
        peak = perf.peak_tflops(ceiling["device_kind"])
        print(f"\n1. bf16 GEMM {gemm.value}^3 on {ceiling['device_kind']}: {ceiling['tflops']:.1f} TFLOP/s"
              + (f" = {100 * ceiling['tflops'] / peak:.0f}% of the datasheet's {peak:.0f}" if peak else ""), flush=True)

        print(f"\n2. train step, {config.value.model.encoder} encoder at {config.value.image_size} px, bf16, "
              f"batch {batch.value}, {steps.value} timed steps", flush=True)
        rows = []
        for cached in (False, True):
            cfg = config.value.copy_and_resolve_references()
            cfg.data.use_cached_latents = cached
            row = bench.run(cfg, [batch.value], [cfg.model.remat], ["bfloat16"], steps.value, warmup=1)[0]
            row["cached_latents"] = cached
            rows.append(row)
        print(f"  {'VAE encoder':14s} {'img/s':>9s} {'step ms':>9s} {'TFLOP/s':>9s} {'MFU peak':>9s} "
              f"{'MFU GEMM':>9s} {'peak GiB':>9s} {'compile s':>9s}")
        for r in rows:
            tf = r["model_tflops_per_s_per_device"]
            mfu = f"{100 * r['mfu']:8.1f}%" if "mfu" in r else "        -"
            print(f"  {'cached latents' if r['cached_latents'] else 'in the step':14s} {r['images_per_s']:9.1f} "
                  f"{1e3 * r['step_s']:9.1f} {tf:9.1f} {mfu} {100 * tf / ceiling['tflops']:8.1f}% "
                  f"{r['peak_gib']:9.2f} {r['compile_s']:9.1f}")
        bench.print_reference(rows)

        print(f"\n3. FLUX.1 VAE, ov3 vs diffusers, {vae_size.value} px, batch {vae_batch.value}, bf16", flush=True)
        bench_vae.main(["--sizes", str(vae_size.value), "--batch", str(vae_batch.value), "--dtype", "bfloat16",
                        "--iters", "3"])
        print(f"\nbench_gpu: {time.perf_counter() - t0:.0f}s in all", flush=True)

    app.run(go)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
