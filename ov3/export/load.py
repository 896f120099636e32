"""Reading a training workdir: the config, the tokenizer and the params of one checkpoint.

Layout this relies on (written by the trainer):

    WORKDIR/config.json                     the full ml_collections config, as JSON
    WORKDIR/tokenizer.json                  the tokenizer used for training
    WORKDIR/vae_config.json                 the VAE's diffusers config as training used it
    WORKDIR/checkpoints/<step>/state        orbax item "state": {step, params, opt_state}

Only `params` is read (a partial restore: the optimizer state, twice the size of the params,
never leaves the disk), as host numpy arrays, so a checkpoint written on any mesh loads on a
laptop. `params` must be the plain (unboxed) tree of `OV3Model.init(...)["params"]`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ov3 import paths
from ov3.errors import Ov3Error
from ov3.models.ov3 import ModelSpec, OV3Model

CONFIG_NAME = "config.json"
VAE_CONFIG_NAME = "vae_config.json"
TOKENIZER_NAME = "tokenizer.json"
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"

Params = dict[str, Any]


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    path = paths.path(workdir) / CONFIG_NAME
    if not path.is_file():
        raise Ov3Error(f"{path} does not exist; --workdir must be a training workdir (the trainer "
                       f"writes {CONFIG_NAME} there when a run starts).")
    try:
        config = ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise Ov3Error(f"{path} is not valid JSON ({e}); restore it from the run's launch config.") from None
    vae_config = paths.path(workdir) / VAE_CONFIG_NAME
    if vae_config.is_file():  # the export's VAE facts (ov3.export.card.vae_facts), not the path
        config.vae_config = json.loads(vae_config.read_text())
    return config


def load_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[ml_collections.ConfigDict, Params]:
    """(config, params) of checkpoint `step` (default: the latest) as float32 numpy arrays."""
    import orbax.checkpoint as ocp  # Heavy import; only the checkpoint readers need it.

    from ov3 import checkpoint as ckpt_lib
    config = read_config(workdir)
    ckpt_dir = ckpt_lib.directory(workdir)
    if not ckpt_dir.exists():
        raise Ov3Error(f"{ckpt_dir} does not exist: the run in {workdir} has not saved a checkpoint "
                       "yet (see config.checkpoint_every).")
    steps = ckpt_lib.finished_steps(workdir)
    if not steps:
        raise Ov3Error(f"{ckpt_dir} holds no finished checkpoint.")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise Ov3Error(f"--step {step} is not a checkpoint in {ckpt_dir}; saved steps: {sorted(steps)}.")
    # Read the "state" item directly: a manager would also look at the trainer's "data" item
    # (grain's iterator position), which needs grain's handler and is of no use here.
    item_dir = ckpt_dir / str(step) / STATE_ITEM
    handler = ocp.PyTreeCheckpointHandler()
    metadata = handler.metadata(item_dir)
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, dict) or "params" not in tree:
        raise Ov3Error(f"{item_dir} has no 'params' entry; is it an ov3 checkpoint?")
    if config.get("task", "ov3") != "ov3" or "encoder" not in tree["params"]:
        raise Ov3Error(f"{workdir} holds a config.task={config.get('task')!r} run (params: "
                       f"{sorted(tree['params'])}); only ov3 runs (task='ov3') have an encoder to export.")
    item = {"params": tree["params"]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = handler.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    handler.close()
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), restored["params"])
    return config, params


def model_spec(config: ml_collections.ConfigDict, params: Params) -> ModelSpec:
    """The ModelSpec of `params`. Sizes come from the config; vocabulary, lengths and latent
    channels from the tensors themselves (they are what the weights were trained with). Inference
    always runs in float32 without remat."""
    try:
        m = config.model
        spec = ModelSpec(
            encoder=m.encoder, decoder=m.decoder, text=m.text,
            vocab_size=int(np.shape(params["text"]["token_embedding"]["embedding"])[0]),
            text_len=int(np.shape(params["text"]["positional_embedding"])[0]),
            caption_len=int(np.shape(params["caption"]["positional_embedding"])[0]),
            latent_channels=int(np.shape(params["encoder"]["conv1"]["kernel"])[2]),
            noise_tau=float(m.noise_tau), noise_mode=m.get("noise_mode", "absolute"),
            posemb=m.get("posemb", "sincos"))
    except (KeyError, AttributeError) as e:
        raise Ov3Error(f"config.json or the checkpoint lacks {e}; export needs config.model.encoder/"
                       "decoder/text/noise_tau and params for encoder, decoder, text and caption.") from None
    check_params(params, spec)
    return spec


def latent_grid(params: Params) -> int:
    """Side of the latent grid the encoder was trained on (= image_size / 8 for FLUX)."""
    tokens = np.shape(params["encoder"]["positional_embedding"])[0] - 1
    patch = np.shape(params["encoder"]["conv1"]["kernel"])[0]
    return int(round(tokens ** 0.5)) * patch


def abstract_params(spec: ModelSpec, grid: int) -> Params:
    """Shapes of freshly initialised params (eval_shape: traced, never compiled or allocated)."""
    def init() -> Params:
        import flax.linen as nn
        variables = OV3Model(spec).init(
            {"params": jax.random.key(0), "noise": jax.random.key(0)},
            jnp.zeros((1, grid, grid, spec.latent_channels)),
            jnp.zeros((1, spec.text_len), jnp.int32), jnp.zeros((1, spec.caption_len), jnp.int32))
        return nn.meta.unbox(variables["params"])
    return jax.eval_shape(init)


def shape_mismatches(found: Params, expected: Params) -> list[str]:
    """'name: found shape vs expected shape' lines, plus missing and unexpected names."""
    flat_found = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(found)}
    flat_exp = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    lines = [f"{k}: checkpoint {flat_found[k]}, expected {shape}" for k, shape in flat_exp.items()
             if k in flat_found and tuple(flat_found[k]) != shape]
    lines += [f"{k}: missing from the checkpoint (expected {s})" for k, s in flat_exp.items() if k not in flat_found]
    lines += [f"{k}: not in the model (checkpoint {s})" for k, s in flat_found.items() if k not in flat_exp]
    return lines


def check_params(params: Params, spec: ModelSpec) -> None:
    lines = shape_mismatches(params, abstract_params(spec, latent_grid(params)))
    if lines:
        raise Ov3Error(
            f"the checkpoint does not fit config.model (encoder={spec.encoder}, decoder={spec.decoder}, "
            f"text={spec.text}):\n  " + "\n  ".join(lines[:20]) +
            ("\n  ..." if len(lines) > 20 else "") +
            "\nExport with the config.json the run was trained with.")


def tokenizer_file(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> paths.Path | None:
    """The workdir's copy of the tokenizer, else config.data.tokenizer if it still exists."""
    local = paths.path(workdir) / TOKENIZER_NAME
    if local.is_file():
        return local
    configured = config.get("data", {}).get("tokenizer", "")
    return paths.path(configured) if configured and paths.path(configured).exists() else None
