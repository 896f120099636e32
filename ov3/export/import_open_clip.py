"""Import an open_clip-layout OpenVision 3 checkpoint into ov3's Flax params.

For fine-tuning or continuing training from a released checkpoint (e.g.
`openvision3-vit-base-patch2-32`: `visual.*` keys of open_clip's `VisionTransformer` with a
16-channel `conv1`, optionally a CLIP text tower and `logit_scale`):

    from ov3.export import import_open_clip
    imported = import_open_clip.load("open_clip_model.safetensors", spec, grid=image_size // 8)
    params = import_open_clip.merge(params, imported)    # replaces encoder (+ text, logit_scale)

Every key and shape is checked against the configured model first; a checkpoint that does not
fit raises one `Ov3Error` listing each mismatch (name, checkpoint shape, expected shape). Any
position embedding of the right shape is taken as is (learned, sin-cos, non-zero class row);
with `model.posemb="sincos"` ov3 keeps it fixed during training, with "learn" it trains it.

What weights cannot show (pooling, masks, GELU flavour, LayerNorm eps) is read from an
`open_clip_config.json` next to the weights when there is one; each difference from ov3's
forward pass is a warning, since the weights still make a good initialisation.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Mapping

import jax
import numpy as np

from ov3 import paths
from ov3.errors import Ov3Error
from ov3.export import layout
from ov3.export import open_clip as oc_export
from ov3.export.load import abstract_params
from ov3.models import registry
from ov3.models.layers import LN_EPS
from ov3.models.ov3 import ModelSpec

Params = dict[str, Any]
TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                 "text_projection")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """safetensors, or a torch pickle (open_clip_pytorch_model.bin, epoch_N.pt), as float32 numpy;
    local or gs://."""
    path = paths.path(path)
    if not path.is_file():
        raise Ov3Error(f"open_clip checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        try:
            from ov3.models.vae_weights import read_safetensors  # numpy reader that also handles bf16
        except ImportError:
            from safetensors.numpy import load_file as read_safetensors
        try:
            state = read_safetensors(path)
        except Exception as e:  # noqa: BLE001 - truncated or not safetensors: many exception types
            raise _unreadable(path, e) from e
    else:
        try:
            import torch
        except ImportError:
            raise Ov3Error(f"{path} is a torch pickle; reading it needs torch (pip install torch), "
                           "or convert it to .safetensors first.") from None
        try:
            state = torch.load(paths.readable(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated zip, a pickle with code in it, not torch at all
            raise _unreadable(path, e) from e
        if isinstance(state, dict) and "state_dict" in state:  # open_clip training checkpoints
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise _unreadable(path, f"it holds a {type(state).__name__}, not a state dict")
        state = {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}
    # DistributedDataParallel prefixes every key with "module.".
    return {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in state.items()}


def _unreadable(path: paths.Path, problem: Any) -> Ov3Error:
    if isinstance(problem, BaseException):
        lines = str(problem).strip().splitlines() or [""]
        problem = f"{type(problem).__name__}: {lines[0][:200]}"
    return Ov3Error(f"open_clip checkpoint {path} cannot be read ({problem}); download it again, or give the "
                    "open_clip_model.safetensors / open_clip_pytorch_model.bin of the model.")


def split_towers(state: Mapping[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """-> (visual, text, other) without their prefixes. Accepts CLIP (`visual.*` + top-level
    text), CustomTextCLIP (`text.*`) and bare VisionTransformer (`conv1.weight`, ...) layouts."""
    if not any(k.startswith("visual.") for k in state) and "conv1.weight" in state:
        return dict(state), {}, {}
    visual, text, other = {}, {}, {}
    for k, v in state.items():
        if k.startswith("visual."):
            visual[k.removeprefix("visual.")] = v
        elif k.startswith("text.") and k.removeprefix("text.").startswith(TEXT_PREFIXES):
            text[k.removeprefix("text.")] = v
        elif k.startswith(TEXT_PREFIXES):
            text[k] = v
        else:
            other[k] = v
    return visual, text, other


def _mismatches(tower: str, found: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> list[str]:
    lines = [f"{tower}.{k}: checkpoint {tuple(found[k].shape)}, expected {tuple(v.shape)}"
             for k, v in expected.items() if k in found and found[k].shape != v.shape]
    lines += [f"{tower}.{k}: missing from the checkpoint (expected {tuple(v.shape)})"
              for k, v in expected.items() if k not in found]
    lines += [f"{tower}.{k}: not in the ov3 model (checkpoint {tuple(v.shape)})"
              for k, v in found.items() if k not in expected]
    return lines


def _blocks(sd: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    return [{key: sd[f"transformer.resblocks.{i}.{key}"] for key in layout.BLOCK_KEYS} for i in range(depth)]


def visual_params(sd: Mapping[str, np.ndarray], heads: int) -> Params:
    """open_clip `VisionTransformer` state dict -> Flax `encoder` subtree (inverse of export)."""
    return {
        "conv1": {"kernel": layout.np32(sd["conv1.weight"].transpose(2, 3, 1, 0))},
        "class_embedding": layout.np32(sd["class_embedding"]),
        "positional_embedding": layout.np32(sd["positional_embedding"]),
        "transformer": layout.blocks_from_torch(_blocks(sd), heads),
        "ln_post": {"scale": layout.np32(sd["ln_post.weight"]), "bias": layout.np32(sd["ln_post.bias"])},
        "proj": {"kernel": layout.np32(sd["proj"])},
    }


def text_params(sd: Mapping[str, np.ndarray], heads: int) -> Params:
    """open_clip `TextTransformer` state dict -> Flax `text` subtree."""
    return {
        "token_embedding": {"embedding": layout.np32(sd["token_embedding.weight"])},
        "positional_embedding": layout.np32(sd["positional_embedding"]),
        "transformer": layout.blocks_from_torch(_blocks(sd), heads),
        "ln_final": {"scale": layout.np32(sd["ln_final.weight"]), "bias": layout.np32(sd["ln_final.bias"])},
        "text_projection": {"kernel": layout.np32(sd["text_projection"])},
    }


def _zeros(tree: Params) -> Params:
    return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), tree)


def _grid_hint(found: Mapping[str, np.ndarray], grid: int, patch: int) -> str:
    if "positional_embedding" not in found:
        return ""
    side = int(round((found["positional_embedding"].shape[0] - 1) ** 0.5))
    return (f"\nThe checkpoint's position embedding covers a {side * patch}x{side * patch} latent grid "
            f"({side * patch * 8} px images); config.image_size={grid * 8} gives {grid}x{grid}. "
            f"Set config.image_size={side * patch * 8} to import it.")


def check_config(oc_config: Mapping[str, Any], source: str) -> None:
    """Warn about every forward-pass difference an open_clip config declares."""
    cfg = oc_config.get("model_cfg", oc_config)
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    notes = []
    want = {"no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True}
    notes += [f"vision_cfg.{k}={v.get(k)!r} (ov3: {w!r})" for k, w in want.items() if v.get(k) != w]
    if cfg.get("quick_gelu"):
        notes.append("quick_gelu=True (ov3: exact erf GELU)")
    for name, tower in (("vision_cfg", v), ("text_cfg", t)):
        eps = (tower.get("norm_kwargs") or {}).get("eps", 1e-5)
        if tower and eps != LN_EPS:
            notes.append(f"{name} LayerNorm eps {eps:g} (ov3: {LN_EPS:g})")
        if (tower.get("act_kwargs") or {}).get("approximate", "none") != "none":
            notes.append(f"{name} GELU approximate={tower['act_kwargs']['approximate']!r} (ov3: exact)")
    if t and (t.get("pool_type") != "last" or not t.get("no_causal_mask")):
        notes.append(f"text_cfg pool_type={t.get('pool_type')!r}, no_causal_mask={t.get('no_causal_mask')!r} "
                     "(ov3: 'last', True)")
    if notes:
        warnings.warn(f"{source} declares a forward pass that differs from ov3's; the imported "
                      "weights are an initialisation, outputs will not match the source model exactly:\n  "
                      + "\n  ".join(notes), stacklevel=3)


def load(path: str | os.PathLike, spec: ModelSpec, grid: int, towers: tuple[str, ...] = ("encoder", "text")) -> Params:
    """Checkpoint file -> {"encoder": ..., ["text": ..., "logit_scale": ...]} Flax subtrees.

    `grid` is the latent grid side of the configured model (config.image_size // 8). The text
    tower is imported when it is in `towers` and in the checkpoint."""
    path = paths.path(path)
    oc_config = path.with_name(oc_export.CONFIG_NAME)
    if oc_config.is_file():
        check_config(json.loads(oc_config.read_text()), str(oc_config))
    return from_state_dict(read_state_dict(path), spec, grid, towers, source=str(path))


def from_state_dict(state: Mapping[str, np.ndarray], spec: ModelSpec, grid: int,
                    towers: tuple[str, ...] = ("encoder", "text"), source: str = "checkpoint") -> Params:
    visual, text, other = split_towers({k: np.asarray(v, np.float32) for k, v in state.items()})
    if not visual:
        raise Ov3Error(f"{source} has no vision tower (no 'visual.*' or 'conv1.weight' keys); "
                       "is it an open_clip checkpoint?")
    expected = abstract_params(spec, grid)
    enc_size, patch = registry.vit_size(spec.encoder, "model.encoder")
    want_visual = oc_export.visual_state_dict(_zeros(expected["encoder"]))
    errors = _mismatches("visual", visual, want_visual)
    hint = _grid_hint(visual, grid, patch) if any("positional_embedding" in e for e in errors) else ""
    use_text = "text" in towers and bool(text)
    if use_text:
        errors += _mismatches("text", text, oc_export.text_state_dict(_zeros(expected["text"])))
    ignored = set(other) - {"logit_scale", "logit_bias"}
    if ignored:
        errors += [f"{k}: not in the ov3 model (checkpoint {tuple(other[k].shape)})" for k in sorted(ignored)]
    if errors:
        raise Ov3Error(
            f"{source} does not fit the configured model (model.encoder={spec.encoder}"
            + (f", model.text={spec.text}, vocab {spec.vocab_size}, text_len {spec.text_len}" if use_text else "")
            + "):\n  " + "\n  ".join(errors) + hint
            + ("\nSet model.encoder/model.text to the checkpoint's sizes, or import only the vision "
               "tower with towers=('encoder',)." if not hint else ""))
    if "logit_bias" in other:
        warnings.warn(f"{source} has a logit_bias (sigmoid loss); ov3's softmax loss has none: dropped.",
                      stacklevel=2)
    out: Params = {"encoder": visual_params(visual, enc_size.num_heads)}
    if use_text:
        out["text"] = text_params(text, registry.text_size(spec.text).num_heads)
        if "logit_scale" in other:
            out["logit_scale"] = layout.np32(other["logit_scale"]).reshape(())
    return out


def merge(params: Params, imported: Params) -> Params:
    """`params` with the imported subtrees swapped in (other towers keep their values)."""
    merged = dict(params)
    merged.update(imported)
    return merged
