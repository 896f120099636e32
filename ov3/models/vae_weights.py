"""VAE checkpoints: diffusers folders and FLUX's `ae.safetensors` <-> `ov3.models.vae` params.

Two checkpoint layouts load to identical params:
  * diffusers: a folder with `config.json` + `diffusion_pytorch_model.safetensors`
    (or such a folder under `vae/`, as in the FLUX.1-dev repository);
  * FLUX's original single file `ae.safetensors` (`encoder.down.0.block.0.norm1.weight`,
    `decoder.up.N...` with up-blocks numbered in reverse, attention as 1x1 convs). Its
    architecture is read from the tensor shapes; the rest is FLUX.1's (32 groups,
    scaling_factor 0.3611, shift_factor 0.1159).

Every key is checked: a missing, unexpected or mis-shaped tensor is an `Ov3Error`, never a
partial load. Safetensors are read with numpy (no torch on training hosts).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ov3 import paths
from ov3.errors import Ov3Error
from ov3.models.vae import (FLUX1_DEV_CONFIG, VAE, AutoencoderKL, VAEConfig, check_latent_norm,
                            param_shapes)

PyTree = Any

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FLUX_FILE_NAME = "ae.safetensors"
_HOW_TO_GET = (
    "Download it on a machine with internet, e.g. `huggingface-cli download "
    "black-forest-labs/FLUX.1-dev ae.safetensors` (single file) or `--include 'vae/*'` "
    "(diffusers folder; the repository is gated: accept its license first), then copy it here."
)


# ---------------------------------------------------------------------------------------------
# Flax params <-> torch state dict (diffusers names).
# ---------------------------------------------------------------------------------------------


def _torch_name(path: tuple[Any, ...]) -> str:
    """("decoder", "up_blocks_1", "resnets_0", "conv1", "kernel") -> "decoder.up_blocks.1..."."""
    names = [re.sub(r"_(\d+)$", r".\1", p.key) for p in path[:-1]]
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1].key]
    return ".".join(names + [leaf])


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape[::-1])  # 2-D transposed, 1-D unchanged


def _to_torch(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:
        return x.transpose(3, 2, 0, 1)  # conv HWIO -> OIHW
    if x.ndim == 2:
        return x.T  # dense (in, out) -> linear (out, in)
    return x


def _from_torch(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:
        return x.transpose(2, 3, 1, 0)
    if x.ndim == 2:
        return x.T
    return x


def expected_state_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """diffusers state-dict key -> torch shape, for every tensor the config needs."""
    leaves = jax.tree_util.tree_leaves_with_path(param_shapes(config))
    return {_torch_name(p): _torch_shape(v.shape) for p, v in leaves}


def params_to_state_dict(params: PyTree) -> dict[str, np.ndarray]:
    """Flax params -> diffusers `AutoencoderKL` state dict (fp32 numpy, torch layouts)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {_torch_name(p): np.ascontiguousarray(_to_torch(np.asarray(v, np.float32)))
            for p, v in leaves}


def state_dict_to_params(state: Mapping[str, np.ndarray], config: VAEConfig,
                         source: str) -> PyTree:
    """diffusers state dict -> fp32 Flax params; every key and shape checked against config."""
    _check_keys({k: tuple(v.shape) for k, v in state.items()}, expected_state_shapes(config),
                source)
    shapes = param_shapes(config)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(_from_torch(np.asarray(state[_torch_name(p)], np.float32))),
        shapes,
    )


_CONFIG_HINT = ("The weights file and its config.json must come from the same VAE (re-download "
                "the pair, or fix config.json)")


def _check_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                source: str, hint: str = _CONFIG_HINT) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor (first few of each)."""

    def listed(keys: list[str]) -> str:
        more = f" ... and {len(keys) - 8} more" if len(keys) > 8 else ""
        return ", ".join(keys[:8]) + more

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} (file {list(found[k])}, expected {list(expected[k])})"
             for k in sorted(set(found) & set(expected)) if tuple(found[k]) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listed(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {listed(wrong)}")
    if problems:
        raise Ov3Error(f"{source} does not match the VAE config: " + "; ".join(problems)
                       + f". {hint}; ov3 never loads a VAE partially.")


# diffusers -> FLUX/LDM names. Up-blocks are numbered from the lowest resolution in diffusers
# and from the highest in FLUX, hence the index flip (as in diffusers' convert_ldm_vae_checkpoint).
_FLUX_RENAMES = (
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_(q|k|v)\.", r".\1."),
    (r"\.to_out\.0\.", ".proj_out."),
)


def diffusers_to_flux_key(key: str, num_levels: int) -> str:
    """diffusers `AutoencoderKL` key -> key in FLUX's original `ae.safetensors`."""
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", key)
    if m:
        level = num_levels - 1 - int(m.group(1))
        part = "block" if m.group(2) == "resnets" else "upsample"
        key = f"decoder.up.{level}.{part}.{m.group(3)}"
    for pattern, repl in _FLUX_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def _flux_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # FLUX's attention q/k/v/proj_out are 1x1 convs; diffusers' are linear layers.
    return shape + (1, 1) if ".attn_1." in key and len(shape) == 2 else shape


def state_dict_to_flux(state: Mapping[str, np.ndarray], num_levels: int) -> dict[str, np.ndarray]:
    """diffusers state dict -> FLUX `ae.safetensors` layout (names and attention shapes)."""
    out = {}
    for k, v in state.items():
        fk = diffusers_to_flux_key(k, num_levels)
        out[fk] = np.asarray(v).reshape(_flux_shape(fk, tuple(v.shape)))
    return out


def _infer_flux_config(shapes: Mapping[str, tuple[int, ...]], source: str) -> VAEConfig:
    """The architecture of a FLUX-layout file, from its tensor shapes; FLUX.1 for the rest."""
    try:
        levels = 1 + max(int(m.group(1)) for k in shapes
                         if (m := re.match(r"^encoder\.down\.(\d+)\.", k)))
        layers = 1 + max(int(m.group(1)) for k in shapes
                         if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k)))
        block_out = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]
                          for i in range(levels))
        latent = shapes["decoder.conv_in.weight"][1]
        in_ch = shapes["encoder.conv_in.weight"][1]
        out_ch = shapes["decoder.conv_out.weight"][0]
    except (KeyError, ValueError, IndexError) as e:
        raise Ov3Error(
            f"{source} is not a FLUX-layout VAE file (could not read its architecture: missing "
            f"{e}). Pass FLUX's ae.safetensors, or a diffusers folder with config.json."
        ) from None
    cfg = dict(FLUX1_DEV_CONFIG, block_out_channels=list(block_out), layers_per_block=layers,
               latent_channels=latent, in_channels=in_ch, out_channels=out_ch,
               down_block_types=["DownEncoderBlock2D"] * levels,
               up_block_types=["UpDecoderBlock2D"] * levels)
    return VAEConfig.from_dict(cfg, source)


def flux_to_state_dict(flux: Mapping[str, np.ndarray], config: VAEConfig,
                       source: str) -> dict[str, np.ndarray]:
    """FLUX-layout tensors -> diffusers state dict, checking every key (in FLUX names)."""
    expected = {diffusers_to_flux_key(k, config.num_levels): (k, s)
                for k, s in expected_state_shapes(config).items()}
    _check_keys({k: tuple(v.shape) for k, v in flux.items()},
                {fk: _flux_shape(fk, s) for fk, (_, s) in expected.items()}, source,
                "A single file must be FLUX's ae.safetensors (or a truncated/edited copy: "
                "re-download it); for other VAEs pass their diffusers folder with config.json")
    return {k: flux[fk].reshape(s) for fk, (k, s) in expected.items()}


# ---------------------------------------------------------------------------------------------
# Files (torch-free safetensors reading, so training hosts need no torch).
# ---------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy (fp32/fp16/bf16 supported), no torch.
    A local file is memory-mapped; a gs:// one is read whole (FLUX's ae.safetensors: 335 MB)."""
    path = paths.path(path)
    if not path.is_file():
        raise Ov3Error(f"{path} does not exist.")
    try:
        data = (np.frombuffer(path.read_bytes(), np.uint8) if paths.is_remote(path)
                else np.memmap(path, dtype=np.uint8, mode="r"))
        n = int(np.frombuffer(data[:8].tobytes(), "<u8")[0])
        header = json.loads(data[8:8 + n].tobytes())
        header.pop("__metadata__", None)
        body, out = data[8 + n:], {}
        for name, info in header.items():
            if info["dtype"] not in _ST_DTYPES:
                raise Ov3Error(f"{path}: tensor {name} has dtype {info['dtype']}; ov3 reads "
                               f"only {sorted(_ST_DTYPES)}.")
            begin, end = info["data_offsets"]
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            out[name] = np.frombuffer(body[begin:end], dtype).reshape(info["shape"])
    except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise Ov3Error(f"{path} is not a valid .safetensors file ({e!r}); re-download it."
                       ) from None
    return out


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    from safetensors.numpy import save  # pure-python + numpy, no torch

    paths.path(path).write_bytes(save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))


# Older diffusers VAE files (many SD-1.x ones) still use the pre-0.14 attention names, which
# diffusers renames on load; so do we.
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_deprecated(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in state.items():
        m = re.match(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", k)
        out[f"{m.group(1)}.{_DEPRECATED_ATTN[m.group(2)]}.{m.group(3)}" if m else k] = v
    return out


def _resolve(path: paths.Path) -> tuple[str, paths.Path, paths.Path | None]:
    """-> ("diffusers", weights, config.json) or ("flux", ae.safetensors, None)."""
    if path.is_file():
        if path.name == "config.json":
            path = path.parent
        elif path.suffix == ".safetensors":
            return "flux", path, None
        else:
            raise Ov3Error(f"{path}: expected a diffusers VAE folder (config.json + "
                           f"{WEIGHTS_NAME}) or FLUX's single file {FLUX_FILE_NAME}.")
    if path.is_dir():
        for folder in (path, path / "vae"):
            if (folder / "config.json").is_file():
                weights = folder / WEIGHTS_NAME
                if not weights.is_file():
                    raise Ov3Error(
                        f"{weights} is missing next to {folder / 'config.json'}. ov3 reads only "
                        f"safetensors weights (no .bin). {_HOW_TO_GET}")
                return "diffusers", weights, folder / "config.json"
        if (path / FLUX_FILE_NAME).is_file():
            return "flux", path / FLUX_FILE_NAME, None
        raise Ov3Error(f"{path} holds neither config.json + {WEIGHTS_NAME} (also looked in vae/) "
                       f"nor {FLUX_FILE_NAME}. {_HOW_TO_GET}")
    raise Ov3Error(f"VAE checkpoint {path} does not exist. {_HOW_TO_GET}")


def from_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32, latent_norm: str = "scale",
                    *, remat_decoder: bool = False) -> VAE:
    """Loads a diffusers VAE folder (or one with a `vae/` subfolder) or FLUX's ae.safetensors.

    `dtype` is the compute dtype; params are fp32 whatever the file stores.
    """
    check_latent_norm(latent_norm)
    kind, weights, config_path = _resolve(paths.path(path))
    tensors = read_safetensors(weights)
    if kind == "diffusers":
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise Ov3Error(f"{config_path} is not valid JSON ({e}).") from None
        config = VAEConfig.from_dict(raw, str(config_path))
        state = _rename_deprecated(tensors)
    else:
        if any(".down_blocks." in k for k in tensors):
            raise Ov3Error(f"{weights} has diffusers key names; pass the folder that holds it "
                           "together with its config.json instead of the file.")
        config = _infer_flux_config({k: tuple(v.shape) for k, v in tensors.items()},
                                    str(weights))
        state = flux_to_state_dict(tensors, config, str(weights))
    params = state_dict_to_params(state, config, str(weights))
    return VAE(AutoencoderKL(config, dtype, remat_decoder), params, config, latent_norm)


def save_pretrained(vae: VAE, path: str | os.PathLike) -> None:
    """Writes the diffusers layout (config.json + diffusion_pytorch_model.safetensors, fp32)."""
    path = paths.path(path)
    paths.makedirs(path)
    (path / "config.json").write_text(json.dumps(vae.config.to_diffusers_dict(), indent=2) + "\n")
    write_safetensors(params_to_state_dict(vae.params), path / WEIGHTS_NAME)
