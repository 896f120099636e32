"""Train-step throughput of an ov3 config on this machine: step time, images/s, MFU, peak memory.

    python -m ov3.tools.bench [--config configs/ov3_b.py[:arg]] [--config.key=value ...]
        [--batch 8,16,32] [--remat none,full] [--dtype float32,bfloat16] [--steps 5]

Every combination of batch (global, over this machine's devices), remat policy (towers and VAE
decoder) and compute dtype (towers and VAE) runs in a fresh process, so that peak memory is its
own: the device's `peak_bytes_in_use` on GPU/TPU, the process's peak RSS on CPU. The VAE is a
random-init FLUX.1 VAE (or the architecture of vae.path's config.json when that is a diffusers
folder, e.g. the demo's), the vocabulary `ov3.tools.summary.vocab_size`'s, and the batches random
images and token ids, so no dataset or weights are needed. With
--config.data.use_cached_latents=True the batches carry random latents, as the latent cache's
do, and the step skips the VAE encoder: the cache's saving. Compilation and `--warmup` steps are
excluded from the timing.

The last lines put the result next to the paper's reference run: 200 epochs (~260M samples) at
128 px in 6.0 h on a TPU v4-256, with what that implies per chip at this config's FLOPs.
"""

from __future__ import annotations

import itertools
import multiprocessing
import resource
import sys
import time
from typing import Any

# Paper, Sec. 4 / notes: 200 epochs (~260M samples) at 128 px in 6.0 h on a TPU v4-256 (B/1 decoder).
REF_SAMPLES, REF_HOURS = 260e6, 6.0
# Cloud TPU v4 slice names count TensorCores; a v4 chip has two (one JAX device, "megacore").
REF_TENSORCORES = 256
REF_CHIPS = REF_TENSORCORES // 2
REF_DEVICE = "TPU v4"


def reference() -> dict[str, float]:
    per_s = REF_SAMPLES / (REF_HOURS * 3600)
    return {"images_per_s": per_s, "per_chip": per_s / REF_CHIPS, "per_tensorcore": per_s / REF_TENSORCORES}


def random_batch(task: Any, batch_size: int, image_size: int, mesh: Any, seed: int = 0) -> dict[str, Any]:
    import jax
    import ml_dtypes
    import numpy as np
    from ov3 import sharding
    rng = np.random.default_rng(seed)
    spec = task.spec
    host = {"image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),  # as the pipeline's
            "text": rng.integers(1, spec.vocab_size, (batch_size, spec.text_len), dtype=np.int32),
            "caption": rng.integers(1, spec.vocab_size, (batch_size, spec.caption_len), dtype=np.int32)}
    if "caption_sentence" in task.cfg.loss.contrastive_texts:  # the second contrastive positive
        host["caption_sentence"] = rng.integers(1, spec.vocab_size, (batch_size, spec.text_len), dtype=np.int32)
    if task.cfg.data.use_cached_latents:  # as the latent cache gives them: the step skips the VAE encoder
        shape = (batch_size, task.latent_size, task.latent_size, spec.latent_channels)
        host["latent"] = rng.normal(size=shape).astype(ml_dtypes.bfloat16)
    return jax.device_put(host, sharding.batch_sharding(mesh))


def build_task(cfg: Any) -> Any:
    """OV3Task with a random-init VAE (and random LPIPS when lambda > 0)."""
    import jax
    import jax.numpy as jnp
    from ov3 import tasks
    from ov3.models import lpips as lpips_lib
    from ov3.models import vae as vae_lib
    from ov3.tools.summary import vae_config, vocab_size
    from ov3.train import DTYPES

    vae = vae_lib.Identity() if cfg.model.input == "pixels" else vae_lib.init_random(
        vae_config(cfg), cfg.seed, dtype=DTYPES[cfg.vae.dtype], latent_norm=cfg.vae.latent_norm,
        remat_decoder=cfg.vae.remat_decoder)
    no_lpips = cfg.copy_and_resolve_references()
    no_lpips.loss.lpips = 0.0
    task = tasks.OV3Task(no_lpips, vae=vae, vocab_size=vocab_size(cfg), pad_id=0)
    task.cfg = cfg
    if cfg.loss.lpips > 0:
        x = jnp.zeros((1, 32, 32, 3))
        task.lpips = (tasks.lpips_apply(cfg), lpips_lib.LPIPS().init(jax.random.key(0), x, x)["params"])
    return task


def measure(cfg_dict: dict, steps: int, warmup: int) -> dict[str, Any]:
    """One setting, in this (fresh) process."""
    import jax
    import ml_collections
    from ov3 import perf, sharding, train
    from ov3 import flops

    cfg = ml_collections.ConfigDict(cfg_dict)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.batch_size, mesh)
    task = build_task(cfg)
    trainer = train.Trainer(cfg, mesh, task)
    state, frozen = trainer.init_state(), trainer.put_frozen(task.frozen_params())
    batch = random_batch(task, cfg.batch_size, cfg.image_size, mesh)
    t0 = time.perf_counter()
    compiled = trainer.compile(state, frozen, batch)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    peak = (stats["peak_bytes_in_use"] if stats else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    step_flops = flops.train_flops_per_example(
        flops.task_costs(cfg, task, cached_latents="latent" in batch)) * cfg.batch_size
    return {"batch": cfg.batch_size, "remat": cfg.model.remat, "dtype": cfg.model.dtype,
            "devices": jax.device_count(), "device_kind": device.device_kind, "compile_s": compile_s,
            "step_s": step_s, "images_per_s": cfg.batch_size / step_s,
            "images_per_s_per_device": cfg.batch_size / step_s / jax.device_count(),
            "peak_gib": peak / 2 ** 30, "peak_kind": "device peak_bytes_in_use" if stats else "host peak RSS",
            "loss": float(metrics["loss"]), "flops_per_example": step_flops / cfg.batch_size,
            **perf.utilisation(step_flops, step_s)}


def settings(cfg: Any, batches: list[int], remats: list[str], dtypes: list[str]) -> list[dict]:
    """The config of every combination, references resolved (plain dicts cross processes)."""
    out = []
    for batch, remat, dtype in itertools.product(batches, remats, dtypes):
        c = cfg.copy_and_resolve_references()
        c.batch_size = batch
        c.model.update(remat=remat, dtype=dtype)
        c.vae.update(remat_decoder=remat != "none", dtype=dtype)
        out.append(c.to_dict())
    return out


def run(cfg: Any, batches: list[int], remats: list[str], dtypes: list[str], steps: int, warmup: int
        ) -> list[dict[str, Any]]:
    from ov3.config import validate
    validate(cfg)
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for setting in settings(cfg, batches, remats, dtypes):
        with spawn.Pool(1) as pool:  # a fresh process per setting: its own peak memory
            rows.append(pool.apply(measure, (setting, steps, warmup)))
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(r: dict[str, Any]) -> str:
    mfu = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else "    -"
    return (f"batch {r['batch']:5d} remat {r['remat']:5s} {r['dtype']:8s} | step {r['step_s'] * 1e3:9.1f} ms "
            f"| {r['images_per_s']:9.4g} img/s ({r['images_per_s_per_device']:8.4g}/device) "
            f"| {r['model_tflops_per_s_per_device']:8.4g} TFLOP/s/device, MFU {mfu} "
            f"| peak {r['peak_gib']:6.2f} GiB ({r['peak_kind']}) | compile {r['compile_s']:5.1f}s")


def print_reference(rows: list[dict[str, Any]]) -> None:
    from ov3 import perf
    ref = reference()
    best = max(rows, key=lambda r: r["images_per_s_per_device"])
    ref_tflops = ref["per_chip"] * best["flops_per_example"] / 1e12
    print(f"\npaper reference: {REF_SAMPLES / 1e6:.0f}M samples in {REF_HOURS} h on a TPU v4-256 = "
          f"{ref['images_per_s']:.0f} img/s = {ref['per_chip']:.1f} img/s per chip ({REF_CHIPS} chips; "
          f"{ref['per_tensorcore']:.1f} per TensorCore)")
    print(f"  at this config's {best['flops_per_example'] / 1e9:.1f} GFLOPs/example that is {ref_tflops:.1f} "
          f"TFLOP/s per chip = {100 * ref_tflops / perf.peak_tflops(REF_DEVICE):.1f}% MFU on {REF_DEVICE}")
    print(f"  here ({best['device_kind']}): best {best['images_per_s_per_device']:.4g} img/s per device "
          f"= {best['images_per_s_per_device'] / ref['per_chip']:.3g}x the paper's per-chip rate")


def main() -> None:
    from absl import app, flags
    from ml_collections import config_flags
    from ov3.errors import Ov3Error
    config = config_flags.DEFINE_config_file("config", "configs/ov3_b.py", "configs/*.py[:arg]", lock_config=False)
    batch = flags.DEFINE_list("batch", ["8"], "global batch sizes")
    remat = flags.DEFINE_list("remat", ["none"], "model.remat policies (remat != none also remats the VAE decoder)")
    dtype = flags.DEFINE_list("dtype", ["bfloat16"], "compute dtypes of towers and VAE")
    steps = flags.DEFINE_integer("steps", 5, "timed steps per setting")
    warmup = flags.DEFINE_integer("warmup", 1, "untimed steps after compiling")

    def go(argv: list[str]) -> None:
        del argv
        try:
            rows = run(config.value, [int(b) for b in batch.value], remat.value, dtype.value, steps.value, warmup.value)
        except Ov3Error as e:
            print(f"ov3: error: {e}", file=sys.stderr)
            sys.exit(2)
        print_reference(rows)

    app.run(go)


if __name__ == "__main__":
    main()
