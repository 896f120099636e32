"""Tiny models and workdirs for the export / inference tests (and for trying the CLI by hand).

`write_workdir` writes exactly what `load.load_params` reads and what the trainer is to write:
config.json, tokenizer.json and an orbax checkpoint `checkpoints/<step>/state` holding
`{"step", "params", "opt_state"}` saved with `ocp.args.Composite(state=StandardSave(tree))`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ov3.config import base_config
from ov3.models.ov3 import ModelSpec, OV3Model

Params = dict[str, Any]
TEXTS = ("a photo of a cat", "two dogs playing in the snow", "a red car parked on a street",
         "an aerial view of a city at night", "a bowl of fruit on a wooden table")
IMAGE_SIZE = 64                 # -> 8x8 latents -> 4x4 tokens
GRID = IMAGE_SIZE // 8
TEXT_LEN, CAPTION_LEN = 12, 10
VOCAB_SIZE = 128                # >= the tiny tokenizer's vocabulary (tables may be padded, as OpenVision's)


def tiny_config(vae_path: str = "") -> ml_collections.ConfigDict:
    c = base_config()
    c.image_size = IMAGE_SIZE
    c.model.encoder, c.model.decoder, c.model.text = "mu/2", "mu/1", "mu"
    c.data.text_len, c.data.caption_len = TEXT_LEN, CAPTION_LEN
    c.vae.path = vae_path
    from ov3.models.vae import FLUX1_DEV_CONFIG
    c.vae_config = dict(FLUX1_DEV_CONFIG)  # what ov3.export.load.read_config adds from vae_config.json
    return c


def tiny_spec(vocab_size: int = VOCAB_SIZE) -> ModelSpec:
    """One spec for every test, so that each jitted function compiles once per process."""
    return ModelSpec(encoder="mu/2", decoder="mu/1", text="mu", vocab_size=vocab_size,
                     text_len=TEXT_LEN, caption_len=CAPTION_LEN, latent_channels=16, noise_tau=0.8)


def train_tokenizer(path: str | Path):
    from ov3.data.tokenizer import train_wordpiece
    return train_wordpiece(list(TEXTS) * 4, vocab_size=VOCAB_SIZE, out_path=str(path))


@functools.lru_cache(maxsize=4)
def _init(spec: ModelSpec, seed: int) -> Params:
    def init(key: jax.Array) -> Params:
        variables = OV3Model(spec).init(
            {"params": key, "noise": key}, jnp.zeros((1, GRID, GRID, spec.latent_channels)),
            jnp.zeros((1, spec.text_len), jnp.int32), jnp.zeros((1, spec.caption_len), jnp.int32))
        return nn.meta.unbox(variables["params"])
    return jax.tree.map(np.asarray, jax.jit(init)(jax.random.key(seed)))


def init_params(spec: ModelSpec, seed: int = 0) -> Params:
    """Freshly initialised float32 numpy params (compiled once per spec and seed, then cached)."""
    return jax.tree.map(np.copy, _init(spec, seed))


def perturb(params: Params, seed: int = 1, scale: float = 0.05) -> Params:
    """params + N(0, scale^2) noise on every leaf: stands in for a briefly trained model (biases
    and LayerNorms away from 0/1, class row and position embedding no longer sin-cos)."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [
        (np.asarray(x) + scale * rng.standard_normal(np.shape(x))).astype(np.float32) for x in leaves])


def write_workdir(workdir: str | Path, config: ml_collections.ConfigDict, params: Params,
                  step: int = 100, tokenizer: str | Path | None = None) -> Path:
    import orbax.checkpoint as ocp

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fields = config.to_dict()
    vae_config = fields.pop("vae_config", None)
    config = ml_collections.ConfigDict(fields)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))  # as ov3.train
    if vae_config is not None:
        (workdir / "vae_config.json").write_text(json.dumps(vae_config, indent=2))
    if tokenizer is not None:
        (workdir / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    state = {"step": np.int32(step), "params": params,
             "opt_state": {"mu": jax.tree.map(np.zeros_like, params)}}
    with ocp.CheckpointManager(workdir.absolute() / "checkpoints") as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    return workdir


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


@functools.lru_cache(maxsize=4)
def _apply_fns(spec: ModelSpec) -> tuple[Any, Any, Any]:
    model = OV3Model(spec)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=OV3Model.encode_image))
    text = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=OV3Model.encode_text))
    decode = jax.jit(lambda p, t: model.apply({"params": p}, t, method=OV3Model.decode_tokens))
    return encode, text, decode


def reference_outputs(spec: ModelSpec, params: Params, latents: np.ndarray,
                      ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """What the Flax model computes: pooled, tokens, decoded (from those tokens) [, text]."""
    encode, text, decode = _apply_fns(spec)
    pooled, tokens = encode(params, latents)
    out = {"pooled": np.array(pooled), "tokens": np.array(tokens), "decoded": np.array(decode(params, tokens))}
    if ids is not None:
        out["text"] = np.array(text(params, ids))
    return out


def random_latents(batch: int = 2, seed: int = 0) -> np.ndarray:
    """NHWC latents with roughly the spread of normalised FLUX latents."""
    return np.random.default_rng(seed).standard_normal((batch, GRID, GRID, 16)).astype(np.float32)


def max_err(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
