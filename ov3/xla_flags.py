"""The XLA / libtpu flags ov3 runs with on each platform, and why; one table for every entry point.

`apply()` runs at the start of `ov3.train.train` (before JAX starts its backend, which reads
them): the flags go into XLA_FLAGS (GPU) or LIBTPU_INIT_ARGS (TPU). A flag the environment
already sets keeps its value, so a launcher or a user can override any of them. CPU runs get none.
"""

from __future__ import annotations

import glob
import os

# TPU (libtpu). FSDP all-gathers every layer's weights in the forward and backward and
# reduce-scatters its gradients: these let that traffic run asynchronously, fused with and hidden
# behind the matmuls around it, instead of stalling the TensorCore (MaxText's defaults for FSDP).
TPU_FLAGS: dict[str, str] = {
    "xla_tpu_enable_async_collective_fusion": "true",            # collectives as async fusions
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",  # ... all-gathers included
    "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",   # ... overlapping several ops
    "xla_tpu_overlap_compute_collective_tc": "true",              # compute and collectives at once
    "xla_enable_async_all_gather": "true",
    # The data-parallel gradient all-reduce (the `data` axis, DCN across slices) split and overlapped.
    "xla_tpu_enable_data_parallel_all_reduce_opt": "true",
    "xla_tpu_data_parallel_opt_different_sized_ops": "true",
}

# NVIDIA GPU (XLA:GPU). The latency-hiding scheduler orders collectives so they overlap compute;
# the pipelined collectives move, inside the scanned layer loop, the next layer's FSDP
# all-gather and the previous layer's gradient reduce-scatter / all-reduce into the current
# iteration (JAX's GPU performance tips).
GPU_FLAGS: dict[str, str] = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
}


def detect(env: dict[str, str] | None = None) -> str:
    """"tpu", "gpu" or "cpu", without starting JAX: JAX_PLATFORMS if set, else the devices present."""
    env = os.environ if env is None else env
    wanted = env.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if wanted:
        return {"cuda": "gpu", "rocm": "gpu"}.get(wanted, wanted)
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return "tpu"
    if os.path.exists("/dev/nvidia0"):
        return "gpu"
    return "cpu"


def merged(existing: str, defaults: dict[str, str]) -> str:
    """`existing` flags with each default appended unless `existing` names that flag already."""
    have = {part.split("=")[0].lstrip("-") for part in existing.split()}
    extra = [f"--{k}={v}" for k, v in defaults.items() if k not in have]
    return " ".join([existing.strip(), *extra]).strip()


def apply(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the platform's flags in `env` (default os.environ); returns {variable: new value}."""
    env = os.environ if env is None else env
    platform = detect(env)
    var, defaults = {"tpu": ("LIBTPU_INIT_ARGS", TPU_FLAGS), "gpu": ("XLA_FLAGS", GPU_FLAGS)}.get(platform, (None, {}))
    if var is None:
        return {}
    value = merged(env.get(var, ""), defaults)
    if value == env.get(var, ""):
        return {}
    env[var] = value
    return {var: value}
