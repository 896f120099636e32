"""Where numbers go: DIR/metrics.jsonl (one JSON object per logged step and source: the train
loop and each evaluator round write their own row; a resumed run first drops the rows after
its checkpoint, so no step is there twice from two runs), TensorBoard event files under
DIR/tensorboard (tensorboardX: no TensorFlow needed), Weights & Biases when
`config.log.wandb.project` is set, and a console line with rate and ETA. Only process 0 writes.

On gs:// metrics.jsonl and the event file are complete objects after every log step, so a
running job can be watched from anywhere (an object exists only once its upload is finalised,
and GCS objects cannot be appended to): metrics.jsonl is rewritten whole (its rows are kept in
memory; a resumed run starts from the object's rows), and the event file, written to a local
temporary folder, is uploaded whole. Both weigh a few MB after 100k steps logged every 50."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import jax
import numpy as np

from ov3 import paths


def quiet_library_logs() -> None:
    """WARNING and above on the console unless `--verbosity` was given: absl's app.run turns
    INFO on, and orbax logs dozens of INFO lines per checkpoint save."""
    from absl import flags, logging
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


class MetricWriter:
    def __init__(self, workdir: str | os.PathLike, log: Any = None, config: Any = None):
        """`log`: config.log (None: no W&B); `config`: the run's config, stored with the W&B run."""
        self.enabled = jax.process_index() == 0
        self.workdir = paths.path(workdir)
        self.remote = paths.is_remote(workdir)
        self.wandb = None
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
            if log is not None and log.wandb.project:
                self.wandb = start_wandb(self.workdir, log.wandb, config)

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
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def image(self, step: int, name: str, image_hwc_uint8: np.ndarray) -> None:
        if self.enabled:
            self.tb.add_image(name, image_hwc_uint8, int(step), dataformats="HWC")
            if self.remote:
                self._upload_events()
            if self.wandb is not None:
                import wandb
                self.wandb.log({name: wandb.Image(image_hwc_uint8)}, step=int(step))

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
            if self.wandb is not None:
                self.wandb.finish()


def start_wandb(workdir: paths.Path, cfg: Any, config: Any = None) -> Any:
    """A W&B run. Its id is kept in DIR/wandb_run_id, so a resumed (or preempted and restarted)
    training run continues the same W&B run instead of starting a new one. Its local files go to
    DIR/wandb (on gs://: a local temporary folder; W&B uploads them itself)."""
    try:
        import wandb
    except ImportError:
        from ov3.errors import Ov3Error
        raise Ov3Error("config.log.wandb.project is set but wandb is not installed: pip install -e '.[wandb]' "
                       "(or leave log.wandb.project empty).") from None
    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    local = tempfile.mkdtemp(prefix="ov3-wandb-") if paths.is_remote(workdir) else str(workdir)
    return wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or workdir.name,
                      mode=cfg.mode, dir=local, id=run_id, resume="allow",
                      config=config.to_dict() if config is not None else None)


def truncate_jsonl(path: str | os.PathLike, step: int) -> int:
    """Drop the rows after `step` (a resumed run logs those steps again); returns how many.
    So every step of DIR/metrics.jsonl holds the rows of the run that produced the checkpoints."""
    path = paths.path(path)
    if not path.is_file() or path.stat().length == 0:  # nothing logged (or not a regular file: never read it)
        return 0
    rows = path.read_text().splitlines(keepends=True)
    kept = [r for r in rows if r.strip() and json.loads(r)["step"] <= step]
    if len(kept) < len(rows):
        if paths.is_remote(path):
            path.write_text("".join(kept))  # one object, replaced whole: readers see old or new
        else:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)  # atomic: a crash here leaves the old log, never half of it
    return len(rows) - len(kept)


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


def image_grid(rows: list[np.ndarray], labels: list[str], min_width: int = 512) -> np.ndarray:
    """rows: list of (N, H, W, 3) float images in [-1, 1] -> one uint8 grid: each row under a
    band with its label, tiles upscaled (nearest, an integer factor) to >= `min_width` px wide,
    so 32 px tiles can be looked at without zooming."""
    from PIL import Image, ImageDraw
    strips = [np.concatenate(list(r), axis=1) for r in rows]
    factor = max(1, -(-min_width // strips[0].shape[1]))
    band = 20
    out = []
    for strip, label in zip(strips, labels, strict=True):
        pixels = np.clip((strip + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        pixels = pixels.repeat(factor, axis=0).repeat(factor, axis=1)
        header = Image.new("RGB", (pixels.shape[1], band), (255, 255, 255))
        ImageDraw.Draw(header).text((4, 3), label, fill=(0, 0, 0))
        out += [np.asarray(header), pixels]
    return np.concatenate(out, axis=0)
