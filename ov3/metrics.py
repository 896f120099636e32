"""Where numbers go: DIR/metrics.jsonl (one JSON object per logged step), TensorBoard event
files under DIR/tensorboard (tensorboardX: no TensorFlow needed) and a console line with rate
and ETA. Only process 0 writes.

On gs:// both are complete objects after every log step, so a running job can be watched from
anywhere (an object exists only once its upload is finalised, and GCS objects cannot be
appended to): metrics.jsonl is rewritten whole (its rows are kept in memory; a resumed run
starts from the object's rows), and the event file, written to a local temporary folder, is
uploaded whole. Both weigh a few MB after 100k steps logged every 50."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import numpy as np

from ov3 import paths


class MetricWriter:
    def __init__(self, workdir: str | os.PathLike):
        self.enabled = jax.process_index() == 0
        self.workdir = paths.path(workdir)
        self.remote = paths.is_remote(workdir)
        if self.enabled:
            from tensorboardX import SummaryWriter
            self.path = self.workdir / "metrics.jsonl"
            if self.remote:
                self.text = self.path.read_text() if self.path.exists() else ""
                self.tb_dir = tempfile.mkdtemp(prefix="ov3-tensorboard-")
            else:
                self.jsonl = open(self.path, "a")
                self.tb_dir = str(self.workdir / "tensorboard")
            # The pid in the name: two writers started in one second (a quick restart) would
            # otherwise share a name, and on gs:// the second would replace the first's object.
            self.tb = SummaryWriter(self.tb_dir, filename_suffix=f".{os.getpid()}")

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in values.items():
            row[k] = float(v)
            self.tb.add_scalar(k, row[k], int(step))
        line = json.dumps(row) + "\n"
        if self.remote:
            self.text += line
            self.path.write_text(self.text)
            self._upload_events()
        else:
            self.jsonl.write(line)
            self.jsonl.flush()

    def image(self, step: int, name: str, image_hwc_uint8: np.ndarray) -> None:
        if self.enabled:
            self.tb.add_image(name, image_hwc_uint8, int(step), dataformats="HWC")
            if self.remote:
                self._upload_events()

    def _upload_events(self) -> None:
        self.tb.flush()
        for name in os.listdir(self.tb_dir):
            paths.copy(os.path.join(self.tb_dir, name), self.workdir / "tensorboard" / name)

    def close(self) -> None:
        if self.enabled:
            if self.remote:
                self._upload_events()
                self.tb.close()
                shutil.rmtree(self.tb_dir, ignore_errors=True)
            else:
                self.tb.close()
                self.jsonl.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a metrics.jsonl, local or gs://."""
    return [json.loads(line) for line in paths.path(path).read_text().splitlines() if line.strip()]


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
