"""LPIPS (Zhang et al. 2018, `lpips` package, net='vgg', version 0.1) in Flax.

distance(x, y) = sum over 5 VGG16 taps l of mean_{h,w} w_l . (f_l(x) - f_l(y))^2, where f_l are
channel-normalised relu1_2 / relu2_2 / relu3_3 / relu4_3 / relu5_3 features of torchvision's
VGG16 `features` and w_l are the learned non-negative 1x1 "lin" heads. Images are NHWC in
[-1, 1] and first go through lpips' fixed ScalingLayer.

Weights (nothing is downloaded at run time):
  * VGG16 trunk: torchvision's ImageNet state dict `vgg16-397923af.pth` (keys `features.N.*`;
    `classifier.*` is ignored), or a .safetensors file with the same keys.
  * heads: by default the `lin{0..4}.model.1.weight` file `lpips/weights/v0.1/vgg.pth` shipped
    inside the installed `lpips` package (found without importing lpips, which needs
    torchvision), or any .pth/.safetensors file with those keys.
  Reading .pth needs torch. To train on a host without torch, convert once where torch exists:
  `save_lpips(params, "lpips_vgg.safetensors")`; then `load_lpips("lpips_vgg.safetensors")`
  finds trunk and heads in that single file.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ov3 import paths
from ov3.errors import Ov3Error
from ov3.models.vae_weights import read_safetensors, write_safetensors

Array = jax.Array
PyTree = Any

# torchvision VGG16 `features`: conv widths with "M" for max-pools, indexed as in the
# Sequential (conv i, ReLU i+1), so "features.28.weight" is the last conv.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices (in `features`) of the ReLUs whose outputs LPIPS compares.
_TAPS = (3, 8, 15, 22, 29)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def _conv_indices() -> list[tuple[int, int]]:
    """(index in torchvision `features`, out channels) for the 13 convs."""
    out, i = [], 0
    for layer in _VGG16:
        if layer == "M":
            i += 1
        else:
            out.append((i, layer))
            i += 2  # conv + ReLU
    return out


def _inverse_norm(f: Array, eps: float = 1e-10) -> Array:
    """1 / (||f|| + eps) over channels, per pixel, fp32: lpips divides each pixel's features by
    (||f|| + 1e-10). The norm's gradient is undefined where a pixel's features are all zero
    (ReLU makes that possible), so the squared norm is clamped before the sqrt: the same
    values wherever ||f|| >= 1e-15, and a zero instead of a NaN gradient."""
    f = f.astype(jnp.float32)
    return 1.0 / (jnp.sqrt(jnp.maximum(jnp.sum(f * f, axis=-1, keepdims=True), 1e-30)) + eps)


class _Lin(nn.Module):
    """lpips' 1x1 "lin" head to one channel (no bias), then the spatial mean, of the squared
    difference of the channel-normalised features of x (first half of the batch) and y (fp32
    arithmetic on features kept in the trunk's dtype). Written as per-pixel sums over channels
    rather than normalised fp32 copies of the feature maps and a 1x1 conv: XLA fuses it into a
    few reads of the features; the copies were most of LPIPS' time in the TPU-compiled
    fine-tuning step. (Equal images give 0 to float rounding, ~1e-17, not exactly.)"""

    @nn.compact
    def __call__(self, f: Array) -> Array:
        n = f.shape[0] // 2
        fx, fy = f[:n], f[n:]
        w = self.param("kernel", nn.initializers.lecun_normal(), (f.shape[-1], 1))[:, 0]
        diff = fx.astype(jnp.float32) * _inverse_norm(fx) - fy.astype(jnp.float32) * _inverse_norm(fy)
        return jnp.mean(jnp.sum(diff * diff * w, axis=-1), axis=(1, 2))


class LPIPS(nn.Module):
    """Per-example LPIPS distance between NHWC images in [-1, 1]."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        h = jnp.concatenate([x, y]).astype(jnp.float32)  # one trunk pass for both images
        h = ((h - jnp.array(_SHIFT)) / jnp.array(_SCALE)).astype(self.dtype)
        convs = dict(_conv_indices())
        feats = []
        for i in range(_TAPS[-1] + 1):
            if i in convs:
                h = nn.Conv(convs[i], (3, 3), padding=[(1, 1), (1, 1)], dtype=self.dtype,
                            name=f"features_{i}")(h)
            elif i - 1 in convs:
                h = nn.relu(h)
            else:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            if i in _TAPS:
                feats.append(h)
        return sum(_Lin(name=f"lin{k}")(f) for k, f in enumerate(feats))


def lpips_fn(params: PyTree, x: Array, y: Array, dtype: Any = jnp.float32) -> Array:
    """Pure LPIPS: params from `load_lpips`, NHWC images in [-1, 1] -> distances of shape (B,).
    dtype: the VGG trunk's compute dtype. In bfloat16 the convolutions still accumulate in
    float32 (XLA's default on TPU and GPU matrix units); the normalisation, the heads and the
    distance are float32 whatever it is."""
    return LPIPS(dtype).apply({"params": params}, x, y)


def _read(path: paths.Path, what: str, how: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise Ov3Error(f"{what} {path} does not exist. {how}")
    if path.suffix == ".safetensors":
        return {k: np.asarray(v, np.float32) for k, v in read_safetensors(path).items()}
    try:
        import torch
    except ImportError:
        raise Ov3Error(
            f"{path} is a torch file and torch is not installed. Convert it once on a machine "
            "with torch: params = load_lpips(...); save_lpips(params, 'lpips_vgg.safetensors')."
        ) from None
    try:
        state = torch.load(paths.readable(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or not a state dict
        raise Ov3Error(f"{what} {path} could not be read by torch.load ({e}). {how}") from None
    return {k: v.float().numpy() for k, v in state.items()}


def _default_heads() -> paths.Path:
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise Ov3Error(
            "LPIPS heads: heads_path was not given and the `lpips` package is not installed. "
            "`pip install --no-deps lpips` (its wheel ships lpips/weights/v0.1/vgg.pth), or pass "
            "heads_path to a vgg.pth/.safetensors file with keys lin0..lin4.model.1.weight."
        )
    return paths.path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"


def _expected() -> dict[str, tuple[int, ...]]:
    shapes, cin = {}, 3
    for i, cout in _conv_indices():
        shapes[f"features.{i}.weight"] = (cout, cin, 3, 3)
        shapes[f"features.{i}.bias"] = (cout,)
        cin = cout
    for k, c in enumerate((64, 128, 256, 512, 512)):
        shapes[f"lin{k}.model.1.weight"] = (1, c, 1, 1)
    return shapes


def load_lpips(vgg_path: str | os.PathLike, heads_path: str | os.PathLike | None = None) -> tuple[LPIPS, PyTree]:
    """Loads LPIPS-VGG weights -> (module, params). See the module docstring for the files."""
    vgg_path = paths.path(vgg_path)
    state = _read(vgg_path, "VGG16 weights",
                  f"Download torchvision's VGG16 ImageNet weights on a machine with internet "
                  f"({VGG_URL}) and pass that file.")
    # torchvision's file also holds the classifier, which LPIPS does not use.
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    has_heads = any(k.startswith("lin") for k in state)
    if heads_path is not None or not has_heads:
        heads = paths.path(heads_path) if heads_path is not None else _default_heads()
        state.update(_read(heads, "LPIPS heads",
                           "It ships in the lpips wheel as lpips/weights/v0.1/vgg.pth."))
    expected = _expected()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {list(state[k].shape)} != {list(s)}" for k, s in expected.items()
                   if k in state and tuple(state[k].shape) != s)
    if missing or unexpected or wrong:
        raise Ov3Error(
            f"LPIPS weights ({vgg_path}"
            + (f", {heads_path}" if heads_path else "")
            + f") do not match torchvision VGG16 + lpips v0.1 heads: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, wrong shapes {wrong[:8]}. Use torchvision's "
            f"vgg16-397923af.pth and lpips' weights/v0.1/vgg.pth."
        )
    params: dict[str, Any] = {}
    for i, _ in _conv_indices():
        params[f"features_{i}"] = {
            "kernel": jnp.asarray(state[f"features.{i}.weight"].transpose(2, 3, 1, 0)),
            "bias": jnp.asarray(state[f"features.{i}.bias"]),
        }
    for k in range(5):
        head = state[f"lin{k}.model.1.weight"]  # (1, C, 1, 1) -> Dense kernel (C, 1)
        params[f"lin{k}"] = {"kernel": jnp.asarray(head[0, :, 0, 0, None])}
    return LPIPS(), params


def save_lpips(params: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes trunk + heads as one .safetensors (torch key names) that loads without torch."""
    out = {}
    for name, p in params.items():
        if name.startswith("features_"):
            i = name.split("_")[1]
            out[f"features.{i}.weight"] = np.asarray(p["kernel"]).transpose(3, 2, 0, 1)
            out[f"features.{i}.bias"] = np.asarray(p["bias"])
        else:
            out[f"{name}.model.1.weight"] = np.asarray(p["kernel"])[:, 0].reshape(1, -1, 1, 1)
    write_safetensors({k: v.astype(np.float32) for k, v in out.items()}, path)
