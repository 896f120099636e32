"""`config.init_from`: a new run's params from an earlier ov3 run, or from a released
OpenVision 3 open_clip checkpoint.

    init_from=RUN_DIR | RUN_DIR/checkpoints/STEP      an ov3 run (ov3/stages.py chains the paper's stages)
    init_from=FILE.safetensors | FILE.bin | FILE.pt   an open_clip checkpoint (e.g. openvision3-vit-base-patch2-32)
    init_from=FOLDER                                  a folder holding open_clip_model.safetensors or
                                                      open_clip_pytorch_model.bin (+ open_clip_config.json)

From an ov3 run, and why:
  * trainable params, loaded as saved, except position tables whose length changed:
      - fixed sin-cos tables (encoder with posemb="sincos", decoder) are recomputed for the new
        grid: they are a function of the grid, not learned;
      - learned ones are interpolated: the encoder's patch grid bicubically (its class row kept),
        the 1-D text/caption tables linearly;
  * not the optimizer state: the recipe restarts the schedule (new warmup, a 20x lower base LR,
    another batch size), so fresh Adam moments with the bias correction counting from 0 are what
    the warmup expects, rather than second moments of the 128 px objective without LPIPS;
  * not the step: the new stage's schedule and data order start at 0.
From an open_clip checkpoint: the vision tower, and the text tower and logit scale when the
checkpoint has them, through ov3/export/import_open_clip.py (every shape checked against the
configured model); the latent decoder and the caption decoder, which open_clip checkpoints do
not hold, start from their random init. Optimizer and step start fresh as above.
A resumed run restores its own checkpoints and ignores `init_from`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ov3 import paths
from ov3.errors import Ov3Error

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


def checkpoint_dir(init_from: str) -> paths.Path:
    """RUN_DIR -> its latest finished checkpoint; RUN_DIR/checkpoints/STEP -> that one."""
    from ov3 import checkpoint as ckpt_lib
    path = paths.path(init_from)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        if int(path.name) not in ckpt_lib.finished_steps(path.parent.parent):
            raise Ov3Error(f"config.init_from={init_from!r}: not a finished checkpoint of {path.parent.parent}.")
        return path
    steps = ckpt_lib.finished_steps(path)
    if not steps:
        raise Ov3Error(f"config.init_from={init_from!r} has no finished checkpoint under {path / 'checkpoints'}; "
                       "point it at the pretraining run's workdir (or RUN_DIR/checkpoints/STEP).")
    return path / "checkpoints" / str(steps[-1])


def load_params(step_dir: paths.Path) -> dict[str, Any]:
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


def from_run(trainer: Any, state: Any, init_from: str) -> Any:
    """`state` (a fresh TrainState: step 0, new optimizer) with params from an ov3 run."""
    step_dir = checkpoint_dir(init_from)
    params, adapted = merge(load_params(step_dir), state.params, trainer.cfg.model.posemb)
    shardings = trainer.state_shardings.params
    # make_array_from_callback: every process holds the full host copy and hands each of its
    # devices its shard, which also works when the mesh spans several hosts.
    if jax.process_index() == 0:
        shown = "; ".join(adapted) if adapted else "none"
        print(f"initialised from {step_dir} (params only; optimizer and step start fresh); "
              f"position tables adapted: {shown}", flush=True)
    return state.replace(params=_put(params, shardings))


def _put(params: Any, shardings: Any) -> Any:
    # make_array_from_callback: every process holds the full host copy and hands each of its
    # devices its shard, which also works when the mesh spans several hosts.
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
                        params, shardings)


def open_clip_file(init_from: str) -> paths.Path | None:
    """The open_clip weights file `init_from` names (itself, or the one in its folder); None
    when it names an ov3 run."""
    path = paths.path(init_from)
    if path.is_file() and path.suffix in OPEN_CLIP_SUFFIXES:
        return path
    if path.is_dir() and not (path / "checkpoints").exists() and not path.name.isdigit():
        return next((path / name for name in OPEN_CLIP_FILES if (path / name).is_file()), None)
    return None


def from_open_clip(trainer: Any, state: Any, path: paths.Path) -> Any:
    """`state` with the towers an open_clip checkpoint holds imported into it."""
    from ov3.export import import_open_clip
    task = trainer.task
    imported = import_open_clip.load(path, task.spec, task.latent_size)
    host = jax.device_get(state.params)
    params = import_open_clip.merge(host, imported)
    shardings = trainer.state_shardings.params
    # Same structure and shapes as the fresh params (the importer checked every shape).
    params = jax.tree.map(lambda new, old: np.asarray(new, old.dtype), params, host)
    if jax.process_index() == 0:
        fresh = sorted(set(host) - set(imported))
        print(f"initialised {', '.join(sorted(imported))} from the open_clip checkpoint {path}; "
              f"{', '.join(fresh)} start from their random init (optimizer and step start fresh)", flush=True)
    return state.replace(params=_put(params, shardings))


def apply(trainer: Any, state: Any, init_from: str) -> Any:
    """`state` (a fresh TrainState: step 0, new optimizer) with params from `init_from`."""
    path = open_clip_file(init_from)
    if path is not None:
        return from_open_clip(trainer, state, path)
    if paths.path(init_from).is_file():
        raise Ov3Error(f"config.init_from={init_from!r} is a file but not an open_clip checkpoint "
                       f"({', '.join(OPEN_CLIP_SUFFIXES)}); pass an ov3 run dir or an open_clip checkpoint.")
    return from_run(trainer, state, init_from)
