"""Peak bf16 FLOP/s per device and model FLOPs utilisation (MFU).

MFU = (analytic model FLOPs of a step / step time / devices) / the device's dense bf16 peak.
Model FLOPs come from `ov3.flops` (remat recomputation is not counted, by definition).
Peaks are vendor figures, dense (no 2:4 sparsity), per JAX device: on TPU v4 and v5p one JAX
device is one chip (both TensorCores, "megacore").
"""

from __future__ import annotations

import jax

# jax.Device.device_kind -> peak dense bf16 TFLOP/s. Sources: Cloud TPU system-architecture
# pages (v4 275, v5e 197, v5p 459, v6e 918 per chip); NVIDIA datasheets (A100 312,
# H100 SXM 989, H100 PCIe 756, H200 989; all dense bf16 tensor-core).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,           # v5e
    "TPU v5e": 197.0,
    "TPU v5": 459.0,                # v5p
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,           # v6e (Trillium)
    "TPU v6e": 918.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """Peak for a device kind, None where unknown (CPU, other accelerators): MFU is then omitted.
    Exact names only: a prefix match would give e.g. "TPU v4 lite" (v4i) the v4's peak."""
    return PEAK_BF16_TFLOPS.get(device_kind)


def utilisation(step_flops: float, step_time_s: float, num_devices: int | None = None,
                device_kind: str | None = None) -> dict[str, float]:
    """{"model_tflops_per_s_per_device": ..., "mfu": ...}; "mfu" only for a known device."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    device_kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    tflops = step_flops / step_time_s / num_devices / 1e12
    out = {"model_tflops_per_s_per_device": tflops}
    peak = peak_tflops(device_kind)
    if peak is not None:
        out["mfu"] = tflops / peak
    return out
