"""Stage handoff (paper Table 1): fine-tuning at 224/256 px starts from the 128 px pretraining run.

    python -m ov3.stages --workdir DIR \
        --pretrain_config configs/ov3_b.py:pretrain --finetune_config configs/ov3_b.py:finetune \
        [--pretrain_config.total_steps=... --finetune_config.batch_size=... ...]

trains DIR/pretrain (resuming it, or skipping it once it reached its last step), then DIR/finetune
with `init_from=DIR/pretrain`. Any single run can do the same with `--config.init_from=RUN_DIR`
(its latest checkpoint) or `RUN_DIR/checkpoints/STEP`.

What a new stage takes from the previous run, and why:
  * trainable params, loaded as saved, except position tables whose length changed:
      - fixed sin-cos tables (encoder with posemb="sincos", decoder) are recomputed for the new
        grid: they are a function of the grid, not learned;
      - learned ones are interpolated: the encoder's patch grid bicubically (its class row kept),
        the 1-D text/caption tables linearly;
  * not the optimizer state: the recipe restarts the schedule (new warmup, a 20x lower base LR,
    another batch size), so fresh Adam moments with the bias correction counting from 0 are what
    the warmup expects, rather than second moments of the 128 px objective without LPIPS;
  * not the step: the new stage's schedule and data order start at 0.
A resumed fine-tuning run restores its own checkpoints and ignores `init_from`.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ov3.errors import Ov3Error

# Params that are position tables: path -> how a new length is obtained ("grid": 2-D over the
# patch grid after a class row, "grid_nocls": 2-D without one, "seq": 1-D).
_POSITION_TABLES = {
    ("encoder", "positional_embedding"): "grid",
    ("decoder", "positional_embedding"): "grid_nocls",
    ("text", "positional_embedding"): "seq",
    ("caption", "positional_embedding"): "seq",
}
# Tables that are fixed functions of the grid whatever the config says (never trained).
_ALWAYS_FIXED = {("decoder", "positional_embedding")}


def checkpoint_dir(init_from: str) -> epath.Path:
    """RUN_DIR -> its latest finished checkpoint; RUN_DIR/checkpoints/STEP -> that one."""
    path = epath.Path(init_from)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        if not (path / "state").exists():
            raise Ov3Error(f"config.init_from={init_from!r}: {path / 'state'} does not exist.")
        return path
    steps = sorted(int(p.name) for p in (path / "checkpoints").glob("*") if p.name.isdigit()) \
        if (path / "checkpoints").exists() else []
    if not steps:
        raise Ov3Error(f"config.init_from={init_from!r} has no finished checkpoint under {path / 'checkpoints'}; "
                       "point it at the pretraining run's workdir (or RUN_DIR/checkpoints/STEP).")
    return path / "checkpoints" / str(steps[-1])


def load_params(step_dir: epath.Path) -> dict[str, Any]:
    """The `params` of a saved TrainState as host numpy arrays (the optimizer state is not read)."""
    import orbax.checkpoint as ocp
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
    item = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree["params"])}
    args = ocp.args.PyTreeRestore(item=item, partial_restore=True, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item))
    return checkpointer.restore(step_dir / "state", args=args)["params"]


def _resize_grid(table: np.ndarray, side: int) -> np.ndarray:
    old = int(round(table.shape[0] ** 0.5))
    grid = jnp.asarray(table).reshape(old, old, -1)
    return np.asarray(jax.image.resize(grid, (side, side, grid.shape[-1]), "bicubic")).reshape(side * side, -1)


def adapt(saved: np.ndarray, shape: tuple[int, ...], kind: str, fixed: bool) -> np.ndarray:
    """A saved position table resized to `shape`: recomputed when `fixed` (sin-cos), else
    interpolated."""
    from ov3.models.layers import sincos_2d
    from ov3.models.vit import cls_and_sincos
    length, width = shape
    if kind == "seq":
        return np.asarray(jax.image.resize(jnp.asarray(saved), shape, "linear"))
    if kind == "grid":  # a class row, then the patch grid
        side = int(round((length - 1) ** 0.5))
        if fixed:
            return np.asarray(cls_and_sincos(side, width))
        return np.concatenate([saved[:1], _resize_grid(saved[1:], side)], axis=0)
    side = int(round(length ** 0.5))
    return sincos_2d(side, width) if fixed else _resize_grid(saved, side)


def merge(saved: dict[str, Any], fresh: Any, posemb: str) -> tuple[Any, list[str]]:
    """Saved params in the structure and shapes of `fresh` (the new model's params, or their
    ShapeDtypeStructs); -> (params, descriptions of the adapted tables).
    Any other difference (a missing/extra param, another shape) is an Ov3Error listing them."""
    flat_saved = {tuple(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    problems, adapted = [], []

    def one(path: tuple, new: Any) -> Any:
        key = tuple(k.key for k in path)
        name = "/".join(key)
        if key not in flat_saved:
            problems.append(f"{name}: in this model, not in the checkpoint")
            return None
        old = flat_saved.pop(key)
        if old.shape == new.shape:
            return np.asarray(old, new.dtype)
        kind = _POSITION_TABLES.get(key)
        if kind is None:
            problems.append(f"{name}: saved {old.shape}, expected {new.shape}")
            return None
        adapted.append(f"{name} {old.shape} -> {new.shape}")
        fixed = key in _ALWAYS_FIXED or (key[0] == "encoder" and posemb == "sincos")
        return adapt(old, new.shape, kind, fixed).astype(new.dtype)

    params = jax.tree_util.tree_map_with_path(one, fresh)
    problems += [f"{'/'.join(k)}: in the checkpoint, not in this model" for k in sorted(flat_saved)]
    if problems:
        raise Ov3Error(f"config.init_from: the checkpoint does not fit the configured model "
                       f"({len(problems)} mismatches):\n  " + "\n  ".join(problems[:40]) +
                       "\nOnly image size and text lengths may change between stages; keep the towers "
                       "(model.encoder/decoder/text) and the tokenizer of the pretraining run.")
    return params, adapted


def init_from(trainer: Any, state: Any, init_from: str) -> Any:
    """`state` (a fresh TrainState: step 0, new optimizer) with params from `init_from`."""
    step_dir = checkpoint_dir(init_from)
    params, adapted = merge(load_params(step_dir), state.params, trainer.cfg.model.posemb)
    shardings = trainer.state_shardings.params
    # make_array_from_callback: every process holds the full host copy and hands each of its
    # devices its shard, which also works when the mesh spans several hosts.
    params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
                          params, shardings)
    if jax.process_index() == 0:
        shown = "; ".join(adapted) if adapted else "none"
        print(f"initialised from {step_dir} (params only; optimizer and step start fresh); "
              f"position tables adapted: {shown}", flush=True)
    return state.replace(params=params)


# ----------------------------------------------------------------------------- CLI

def _finished(workdir: epath.Path, total_steps: int) -> bool:
    from ov3 import checkpoint as ckpt_lib
    if not (workdir / "checkpoints").exists():
        return False
    return ckpt_lib.Checkpointer(workdir).latest_step() == total_steps


def run(pretrain_cfg: Any, finetune_cfg: Any, workdir: str) -> dict[str, float]:
    """Both stages in DIR/pretrain and DIR/finetune; returns the fine-tuning run's last metrics."""
    from ov3 import train
    root = epath.Path(workdir)
    pre, fine = root / "pretrain", root / "finetune"
    if finetune_cfg.init_from and finetune_cfg.init_from != str(pre):
        raise Ov3Error(f"--finetune_config.init_from={finetune_cfg.init_from!r}: ov3.stages sets it to "
                       f"{pre}; leave it empty (or run ov3.main with --config.init_from for one stage).")
    if _finished(pre, pretrain_cfg.total_steps):
        print(f"{pre} already reached step {pretrain_cfg.total_steps}; skipping pretraining", flush=True)
    else:
        train.train(pretrain_cfg, pre)
    finetune_cfg.init_from = str(pre)
    return train.train(finetune_cfg, fine)


def cli() -> None:
    # Flags are defined here, not at import: ov3.train imports this module next to ov3.main's flags.
    from absl import app, flags
    from ml_collections import config_flags
    pretrain = config_flags.DEFINE_config_file("pretrain_config", None, "configs/*.py[:arg] of stage 1.")
    finetune = config_flags.DEFINE_config_file("finetune_config", None, "configs/*.py[:arg] of stage 2.")
    workdir = flags.DEFINE_string("workdir", None, "Holds pretrain/ and finetune/.")
    flags.mark_flags_as_required(["pretrain_config", "finetune_config", "workdir"])

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        from ov3 import metrics
        metrics.quiet_library_logs()
        try:
            run(pretrain.value, finetune.value, workdir.value)
        except Ov3Error as e:
            print(f"ov3: error: {e}", file=sys.stderr)
            sys.exit(2)
        from ov3 import sharding
        sharding.shutdown_distributed()

    app.run(main)


if __name__ == "__main__":
    cli()
