"""Where numbers go: DIR/metrics.jsonl (one JSON object per logged step), TensorBoard event
files (tensorboardX: no TensorFlow needed) and a console line with rate and ETA.
Only process 0 writes."""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str | pathlib.Path):
        self.enabled = jax.process_index() == 0
        self.workdir = pathlib.Path(workdir)
        if self.enabled:
            from tensorboardX import SummaryWriter
            self.jsonl = open(self.workdir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in values.items():
            row[k] = float(v)
            self.tb.add_scalar(k, row[k], int(step))
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def image(self, step: int, name: str, image_hwc_uint8: np.ndarray) -> None:
        if self.enabled:
            self.tb.add_image(name, image_hwc_uint8, int(step), dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """One console line per log step: step, chosen metrics, rate and ETA."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start, self.t0 = total_steps, start_step, time.time()

    def line(self, step: int, metrics: dict[str, float], images_per_s: float) -> str:
        done = step - self.start
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - step) if done else math.nan
        shown = " ".join(f"{k.removeprefix('loss/')}={v:.4g}" for k, v in metrics.items()
                         if k.startswith("loss") or k == "temperature")
        return (f"step {step}/{self.total} ({100 * step / self.total:.0f}%) {shown} "
                f"| {images_per_s:.1f} img/s | elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """rows: list of (N, H, W, 3) float images in [-1, 1] -> one uint8 (rows*H, N*W, 3) grid."""
    strips = [np.concatenate(list(r), axis=1) for r in rows]
    grid = np.concatenate(strips, axis=0)
    return np.clip((grid + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
