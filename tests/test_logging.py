"""What a user watches a run with: the reconstruction grid PNG, TensorBoard (the `tensorboard`
package alone, no TensorFlow) and Weights & Biases in offline mode (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ov3 import metrics as metrics_lib
from ov3 import train
from tests.helpers import make_assets, tiny_config


def test_image_grid_is_upscaled_and_labelled():
    rows = [np.full((8, 4, 4, 3), -1.0), np.full((8, 4, 4, 3), 1.0)]   # 8 black tiles over 8 white ones
    grid = metrics_lib.image_grid(rows, ["originals", "reconstructions"], min_width=512)
    factor = 16  # 8 tiles x 4 px = 32 px -> 512
    band = (grid.shape[0] - 2 * 4 * factor) // 2
    assert grid.shape == (2 * (band + 4 * factor), 512, 3) and band > 0
    assert (grid[band:band + 4 * factor] == 0).all() and (grid[2 * band + 4 * factor:] == 255).all()
    header = grid[:band]
    assert (header == 255).mean() > 0.8 and (header < 128).any()   # white band with dark text in it


def test_run_logs_to_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))   # not ~/.config/wandb
    data, vae = make_assets(tmp_path / "assets")
    workdir = tmp_path / "run"
    cfg = tiny_config(data, vae, total_steps=2, checkpoint_every=2,
                      **{"log.wandb.project": "ov3-test", "log.wandb.mode": "offline"})
    last = train.train(cfg, workdir)

    grid = Image.open(workdir / "reconstructions_000002.png")
    assert grid.width >= 512, grid.size

    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")][-1] == pytest.approx(last["loss"], rel=1e-6)

    # Offline, W&B writes one protobuf log per run (uploaded later by `wandb sync`); history
    # values are stored as JSON text in it, so every logged loss is findable in its bytes.
    runs = list((workdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((workdir / "wandb").iterdir())
    run_id = (workdir / "wandb_run_id").read_text().strip()
    log = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"ov3-test" in log
    for row in metrics_lib.read_jsonl(workdir / "metrics.jsonl"):
        assert json.dumps(row["loss"]).encode() in log, row
    assert list((runs[0] / "files" / "media" / "images").glob("reconstructions_2_*.png"))   # the grid too
