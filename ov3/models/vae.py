"""Frozen KL autoencoder (diffusers' `AutoencoderKL`) in Flax: the config and the network.

OpenVision 3 puts the FLUX.1-dev VAE in front of its ViT: images are encoded to 16-channel
latents at 1/8 resolution, and the reconstruction branch decodes predicted latents back to
pixels through the same, frozen decoder. This file holds:

  * `VAEConfig`: a diffusers `config.json` parsed and checked (FLUX.1, SD-1.x/SDXL, SD3);
  * `AutoencoderKL`: the network, NHWC, numerically equal to diffusers' `AutoencoderKL`;
  * `VAE`: module + params + latent normalisation, with pure functions for jitted steps;
  * `init_random`.

Loading and saving checkpoints (diffusers folders, FLUX's `ae.safetensors`) is
`ov3.models.vae_weights`. Parameter names mirror diffusers' state-dict keys
("down_blocks.0" -> "down_blocks_0"), so that conversion is mechanical.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ov3.errors import Ov3Error

Array = jax.Array
PyTree = Any


# FLUX.1-dev `vae/config.json`, for reference and for `init_random`.
FLUX1_DEV_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

LATENT_NORMS = ("scale", "scale_shift")

# ---------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------

# Keys diffusers writes that do not change the network: tiling size and a pipeline precision
# hint. Keys starting with "_" (version, name) are bookkeeping and ignored as well.
_IGNORED_KEYS = ("sample_size", "force_upcast")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture-relevant part of a diffusers `AutoencoderKL` config.

    Defaults are diffusers' `AutoencoderKL.__init__` defaults, so a config.json that omits a key
    means the same here as in diffusers.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    # Per-channel statistics some pipelines use instead of scaling/shift. Kept so that
    # save_pretrained round-trips them; ov3's latent normalisation does not use them.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "VAE config") -> VAEConfig:
        """Parses and checks a diffusers `AutoencoderKL` config; `source` names it in errors."""
        if not isinstance(config, Mapping):
            raise Ov3Error(f"{source}: expected a JSON object (a diffusers VAE config.json), got "
                           f"{type(config).__name__}.")
        config = dict(config)
        class_name = config.pop("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise Ov3Error(
                f"{source}: _class_name is {class_name!r}; ov3 loads only diffusers "
                "'AutoencoderKL' VAEs (FLUX.1, SD-1.x/SDXL, SD3). Point it at such a VAE."
            )
        for key in list(config):
            if key.startswith("_") or key in _IGNORED_KEYS:
                config.pop(key)

        n_blocks = len(config.get("block_out_channels", cls.block_out_channels))
        for key, block in (("down_block_types", "DownEncoderBlock2D"),
                           ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(config.pop(key, (block,)))
            if set(types) != {block} or len(types) != n_blocks:
                raise Ov3Error(
                    f"{source}: {key} is {list(types)}; ov3 supports only {n_blocks} x "
                    f"{block!r} (one per entry of block_out_channels)."
                )
        act_fn = config.pop("act_fn", "silu")
        if act_fn != "silu":
            raise Ov3Error(f"{source}: act_fn is {act_fn!r}; ov3 supports only 'silu'.")

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise Ov3Error(
                f"{source}: unknown or unsupported key(s) {unknown}. Known keys: "
                f"{sorted(known | {'down_block_types', 'up_block_types', 'act_fn'})}."
            )
        for key in ("block_out_channels", "latents_mean", "latents_std"):
            if config.get(key) is not None:
                config[key] = tuple(config[key])
        try:
            cfg = cls(**config)
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise Ov3Error(f"{source}: {e}") from None
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        def bad(key: str, why: str) -> Ov3Error:
            return Ov3Error(f"{source}: {key}={getattr(self, key)!r} {why}")

        for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                    "norm_num_groups"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, "must be a positive integer.")
        if not self.block_out_channels or not all(
            isinstance(c, int) and c > 0 for c in self.block_out_channels
        ):
            raise bad("block_out_channels", "must be a non-empty list of positive integers.")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise bad("norm_num_groups", f"must divide every block_out_channels entry "
                      f"{list(self.block_out_channels)} (GroupNorm).")
        for key in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be true or false.")
        if not isinstance(self.scaling_factor, (int, float)) or self.scaling_factor <= 0:
            raise bad("scaling_factor", "must be a positive number.")
        if self.shift_factor is not None and not isinstance(self.shift_factor, (int, float)):
            raise bad("shift_factor", "must be a number or null.")

    def to_diffusers_dict(self) -> dict[str, Any]:
        """The config.json diffusers' `AutoencoderKL.from_pretrained` reads."""
        d = dataclasses.asdict(self)
        for key in ("block_out_channels", "latents_mean", "latents_std"):
            if d[key] is not None:
                d[key] = list(d[key])
        return {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * self.num_levels,
            "up_block_types": ["UpDecoderBlock2D"] * self.num_levels,
            **d,
        }


def _as_config(config: VAEConfig | Mapping[str, Any]) -> VAEConfig:
    return config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)


# ---------------------------------------------------------------------------------------------
# Network (NHWC). Submodule names mirror diffusers' keys: "resnets.0" -> "resnets_0".
# ---------------------------------------------------------------------------------------------


def _conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1,
          padding: Any = None) -> nn.Conv:
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=[(pad, pad), (pad, pad)] if isinstance(pad, int) else pad,
                   dtype=dtype, name=name)


_GN_EPS = 1e-6  # diffusers' VAE GroupNorm epsilon

# Statistics reduce over these axes of (B, H, W, G, C/G). H and W stay separate dims: merging
# them is not free in TPU's layout for these activations (C minor, then B), and the compiled
# HLO then copied every GroupNorm input to another layout first.
_GN_AXES = (1, 2, 4)


def group_norm(x: Array, scale: Array, bias: Array, groups: int, silu: bool) -> Array:
    """GroupNorm (+ SiLU) of NHWC x: two-pass fp32 statistics (within 1e-5 of torch in float64
    even where |mean| >> std), normalisation and affine in fp32, then x's dtype; the SiLU runs
    in x's dtype, as diffusers' under bf16 autocast.

    Plain autodiff on purpose. The VAE decoder's forward + input gradient compiled for a TPU
    v4 chip (128 px, 32 per chip, `ov3.tools.roofline`) bounds at 35.95 ms with this form,
    against 37.09 for one-pass shifted statistics, 36.90 with the SiLU in fp32 and 37.50 for a
    custom backward that keeps only x and the per-group statistics: XLA fuses the recomputed
    normalisation into the convolutions around it, while the custom backward's fp32 gradient
    between its two passes was written to HBM at every GroupNorm."""
    xg = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups).astype(jnp.float32)
    mean = jnp.mean(xg, axis=_GN_AXES, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=_GN_AXES, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + _GN_EPS)).reshape(x.shape) * scale + bias
    y = y.astype(x.dtype)
    return nn.silu(y) if silu else y


class GroupNorm(nn.Module):
    """torch's `GroupNorm(groups, C, eps=1e-6)`, optionally followed by SiLU."""

    groups: int
    dtype: Any = jnp.float32
    silu: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,))
        bias = self.param("bias", nn.initializers.zeros_init(), (c,))
        return group_norm(x.astype(self.dtype), scale, bias, self.groups, self.silu)


def _norm(groups: int, dtype: Any, name: str, silu: bool = False) -> GroupNorm:
    return GroupNorm(groups, dtype, silu, name=name)


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` without time embedding: norm-SiLU-conv twice, plus skip."""

    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _norm(self.groups, self.dtype, "norm1", silu=True)(x)
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = _norm(self.groups, self.dtype, "norm2", silu=True)(h)
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """The VAE's single-head spatial self-attention (diffusers `Attention`, residual)."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        y = _norm(self.groups, self.dtype, "group_norm")(x).reshape(b, h * w, 1, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        # One head of width c; logits and softmax run in fp32 even for bf16 inputs.
        y = jax.nn.dot_product_attention(q, k, v)
        y = nn.Dense(c, dtype=self.dtype, name="to_out_0")(y)
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    channels: int
    groups: int
    attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.attention:
            x = Attention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # Stride-2 3x3 conv padded on the bottom/right only, as diffusers (padding=0) and LDM do.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding=0)(x)


# Nearest x2 upsampling then a 3x3 "same" conv (w0, w1, w2), in 1-D over a low-res row x:
#   output 2i   = w0 x[i-1] + (w1 + w2) x[i]
#   output 2i-1 = (w0 + w1) x[i-1] + w2 x[i]
# Both outputs are 2-tap convs over the same window (x[i-1], x[i]). _PHASES[p, a, k] is how
# much 3x3 tap k adds to window tap a for output phase p (0: 2i-1, 1: 2i).
_PHASES = np.array([[[1, 1, 0], [0, 0, 1]],
                    [[1, 0, 0], [0, 1, 1]]], np.float32)


class SubpixelConv(nn.Module):
    """diffusers' `Upsample2D` (nearest x2, then a 3x3 conv) computed in the "sub-pixel" form.

    Each of the four output phases (even/odd row, even/odd column) is a 2x2 conv with its own
    window on the low-resolution map; the phases are interleaved into the 2x image. The same
    outputs exactly (up to float summation order), for 4/9 of the FLOPs, and the 4x-upsampled
    input is never materialised. Four convs whose windows are shifted by padding, rather than
    one conv to 4x the channels and a depth-to-space + crop: in the TPU-compiled decoder that
    shuffle was three extra passes over the 4x tensor, forward and backward. The params are
    the 3x3 conv's, as in diffusers' files; the 2x2 kernels are folded from them in each call
    (a few MFLOPs per step, independent of the batch), so checkpoints load and save unchanged
    and the VAE can still be trained (task="vae").
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, cin = x.shape
        c = self.features
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, cin, c))
        bias = self.param("bias", nn.initializers.zeros_init(), (c,))
        # (window row a, window col b, in, phase row p, phase col q, out); exact fp32 sums.
        folded = jnp.einsum("pak,qbl,klio->abipqo", _PHASES, _PHASES, kernel,
                            precision=jax.lax.Precision.HIGHEST).astype(self.dtype)
        x = x.astype(self.dtype)

        def phase(r: int, s: int) -> Array:
            # Output pixel (2m + r, 2n + s) is phase (1 - r, 1 - s) over rows m - 1 + r .. m + r
            # and columns n - 1 + s .. n + s of x (zero outside).
            return jax.lax.conv_general_dilated(
                x, folded[:, :, :, 1 - r, 1 - s], (1, 1), [(1 - r, r), (1 - s, s)],
                dimension_numbers=("NHWC", "HWIO", "NHWC"))

        y = jnp.stack([jnp.stack([phase(r, s) for s in (0, 1)], axis=3) for r in (0, 1)], axis=2)
        return y.reshape(b, 2 * h, 2 * w, c) + bias.astype(self.dtype)


class Upsample(nn.Module):
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return SubpixelConv(self.channels, self.dtype, name="conv")(x)


class DownBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, g = self.config, self.config.norm_num_groups
        x = _conv(cfg.block_out_channels[0], 3, self.dtype, "conv_in")(x)
        for i, ch in enumerate(cfg.block_out_channels):
            x = DownBlock(ch, cfg.layers_per_block, g, i < cfg.num_levels - 1, self.dtype,
                          name=f"down_blocks_{i}")(x)
        ch = cfg.block_out_channels[-1]
        x = MidBlock(ch, g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        x = _norm(g, self.dtype, "conv_norm_out", silu=True)(x)
        return _conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg, g = self.config, self.config.norm_num_groups
        chans = cfg.block_out_channels[::-1]
        x = _conv(chans[0], 3, self.dtype, "conv_in")(z)
        x = MidBlock(chans[0], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        # The up-blocks hold most of the decoder's activations (full resolution, 3 resnets
        # each); rematerialising them trades ~1/3 more decoder FLOPs for that memory when
        # gradients flow through the frozen decoder.
        block = nn.remat(UpBlock) if self.remat else UpBlock
        for i, ch in enumerate(chans):
            x = block(ch, cfg.layers_per_block + 1, g, i < cfg.num_levels - 1, self.dtype,
                      name=f"up_blocks_{i}")(x)
        x = _norm(g, self.dtype, "conv_norm_out", silu=True)(x)
        return _conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL` in NHWC. `dtype` is the compute dtype; params stay fp32."""

    config: VAEConfig
    dtype: Any = jnp.float32
    remat_decoder: bool = False

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype, self.remat_decoder)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, self.dtype, "quant_conv")
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype, "post_quant_conv")

    def encode(self, images: Array) -> tuple[Array, Array]:
        """NHWC images in [-1, 1] -> posterior (mean, logvar), unnormalised, fp32."""
        h = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)  # diffusers' DiagonalGaussianDistribution

    def decode(self, z: Array) -> Array:
        """Unnormalised NHWC latents -> NHWC images (fp32, nominally in [-1, 1])."""
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: Array) -> Array:
        return self.decode(self.encode(images)[0])


# ---------------------------------------------------------------------------------------------
# The frozen VAE as used by training: params + latent normalisation + pure functions.
# ---------------------------------------------------------------------------------------------


def check_latent_norm(latent_norm: str) -> None:
    if latent_norm not in LATENT_NORMS:
        raise Ov3Error(
            f"latent_norm={latent_norm!r} is not one of {LATENT_NORMS}: 'scale' (mean x "
            "scaling_factor, what the released OpenVision 3 checkpoints expect) or "
            "'scale_shift' ((mean - shift_factor) x scaling_factor, as diffusers' FLUX pipeline)."
        )


@dataclasses.dataclass(frozen=True, eq=False)
class VAE:
    """A frozen VAE. The `*_fn`/`posterior` methods are pure in `params` (use them inside a
    jitted step, passing params explicitly); `encode`/`decode` are jitted conveniences."""

    module: AutoencoderKL
    params: PyTree
    config: VAEConfig
    latent_norm: str = "scale"

    def __post_init__(self) -> None:
        check_latent_norm(self.latent_norm)

    @property
    def _shift(self) -> float:
        if self.latent_norm == "scale_shift":
            return float(self.config.shift_factor or 0.0)  # null shift (SD-1.x) means none
        return 0.0

    def normalize(self, z: Array) -> Array:
        """Raw posterior latents -> the normalised latents the ViT sees."""
        return (z - self._shift) * self.config.scaling_factor

    def denormalize(self, latents: Array) -> Array:
        return latents / self.config.scaling_factor + self._shift

    def posterior(self, params: PyTree, images: Array) -> tuple[Array, Array]:
        """NHWC images in [-1, 1] -> raw (mean, logvar), e.g. for an L1 + KL VAE loss."""
        return self.module.apply({"params": params}, images, method=AutoencoderKL.encode)

    def encode_fn(self, params: PyTree, images: Array) -> Array:
        """NHWC images in [-1, 1] -> normalised latents from the posterior mean."""
        return self.normalize(self.posterior(params, images)[0])

    def decode_raw_fn(self, params: PyTree, z: Array) -> Array:
        """Raw (unnormalised) latents -> NHWC images."""
        return self.module.apply({"params": params}, z, method=AutoencoderKL.decode)

    def decode_fn(self, params: PyTree, latents: Array) -> Array:
        """Normalised latents -> NHWC images; differentiable w.r.t. `latents`."""
        return self.decode_raw_fn(params, self.denormalize(latents))

    def encode(self, images: Array) -> Array:
        """Jitted `encode_fn` with this VAE's params."""
        return _jit_encode(self.params, images, module=self.module, latent_norm=self.latent_norm)

    def decode(self, latents: Array) -> Array:
        """Jitted `decode_fn` with this VAE's params."""
        return _jit_decode(self.params, latents, module=self.module, latent_norm=self.latent_norm)


# Module-level so that VAEs with equal modules (hashable: config is a frozen dataclass) share
# one compilation.
@functools.partial(jax.jit, static_argnames=("module", "latent_norm"))
def _jit_encode(params: PyTree, images: Array, *, module: AutoencoderKL,
                latent_norm: str) -> Array:
    return VAE(module, params, module.config, latent_norm).encode_fn(params, images)


@functools.partial(jax.jit, static_argnames=("module", "latent_norm"))
def _jit_decode(params: PyTree, latents: Array, *, module: AutoencoderKL,
                latent_norm: str) -> Array:
    return VAE(module, params, module.config, latent_norm).decode_fn(params, latents)


# ---------------------------------------------------------------------------------------------
# Params.
# ---------------------------------------------------------------------------------------------


def param_shapes(config: VAEConfig) -> PyTree:
    """The params tree (ShapeDtypeStructs) of `AutoencoderKL(config)`."""
    module = AutoencoderKL(config)
    size = 2 * config.downsample_factor
    x = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


def init_random(config: VAEConfig | Mapping[str, Any], seed: int = 0, *,
                dtype: Any = jnp.float32, latent_norm: str = "scale",
                remat_decoder: bool = False) -> VAE:
    """A randomly initialised VAE, e.g. to train a small demo VAE or to benchmark.

    Kernels ~ N(0, 1/fan_in) (LeCun normal, Flax's default), biases 0, GroupNorm scale 1.
    Drawn with numpy from the param shapes: a jitted `module.init` would spend most of a minute
    compiling the random-number generation on CPU for no benefit.
    """
    config = _as_config(config)
    check_latent_norm(latent_norm)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)
        else:
            value = np.full(leaf.shape, 1.0 if path[-1].key == "scale" else 0.0, np.float32)
        return jnp.asarray(value)

    params = jax.tree_util.tree_map_with_path(draw, param_shapes(config))
    return VAE(AutoencoderKL(config, dtype, remat_decoder), params, config, latent_norm)


# ---------------------------------------------------------------------------------------------
# No VAE: config.model.input = "pixels" (the paper's Sec. 5.2 "w/o VAE" ablation).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PixelSpace:
    """What the training and inference code read of a VAE config, for pixels as the "latents"."""
    latent_channels: int = 3
    downsample_factor: int = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Identity:
    """Stands in for the frozen VAE when the encoder sees pixels: encoding and decoding are the
    identity, so the encoder patchifies images (e.g. B/16) and the decoder predicts pixel patches."""
    params: PyTree = dataclasses.field(default_factory=dict)
    config: PixelSpace = PixelSpace()

    def encode_fn(self, params: PyTree, images: Array) -> Array:
        return images.astype(jnp.float32)

    def decode_fn(self, params: PyTree, latents: Array) -> Array:
        return latents

    def encode(self, images: Array) -> Array:
        return self.encode_fn(self.params, images)

    def decode(self, latents: Array) -> Array:
        return latents
