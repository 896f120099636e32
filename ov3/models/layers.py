"""Transformer building blocks shared by every tower (pre-LN, as open_clip and big_vision).

Parameters carry *logical* axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`, ...);
`ov3/sharding.py` maps them onto mesh axes in one table. Activations are constrained with
`act_*` names the same way.

Layouts are chosen so that export to open_clip / transformers is a reshape, never a
re-computation: the fused qkv kernel is (embed, 3, heads, head_dim) which is
`attn.in_proj_weight` (3*embed, embed) transposed; LayerNorm eps is 1e-6; GELU is the exact
(erf) one, as `torch.nn.GELU()` and HF `hidden_act="gelu"`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
LN_EPS = 1e-6

# Names of the remat policies a config may ask for (`model.remat`).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dense_init(axes: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def zeros_init(axes: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding hint for an activation; a no-op outside a mesh/rules context."""
    return nn.with_logical_constraint(x, axes)


class LayerNorm(nn.Module):
    """LayerNorm with `scale`/`bias` directly under the module name (maps 1:1 to torch's
    `weight`/`bias`); statistics in float32 whatever the compute dtype."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (width,))
        bias = self.param("bias", zeros_init(("norm",)), (width,))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + bias
        return y.astype(self.dtype)


class Attention(nn.Module):
    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "xla"  # jax.nn.dot_product_attention's: "xla", or "cudnn" (GPU, bf16)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        width = x.shape[-1]
        head_dim = width // self.num_heads
        # Explicit params (not DenseGeneral, which boxes a flattened kernel): shapes are the
        # logical layout itself.
        w_qkv = self.param("qkv_kernel", dense_init(("embed", None, "heads", "kv")),
                           (width, 3, self.num_heads, head_dim))
        b_qkv = self.param("qkv_bias", zeros_init((None, "heads", "kv")), (3, self.num_heads, head_dim))
        w_out = self.param("out_kernel", dense_init(("heads", "kv", "embed")),
                           (self.num_heads, head_dim, width))
        b_out = self.param("out_bias", zeros_init(("embed",)), (width,))
        x = x.astype(self.dtype)
        qkv = jnp.einsum("btw,wihd->btihd", x, w_qkv.astype(self.dtype)) + b_qkv.astype(self.dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = constrain(q, ("act_batch", "act_len", "act_heads", "kv"))
        # `mask` is boolean, broadcastable to (batch, heads, q_len, kv_len); True = attend.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
        return jnp.einsum("bthd,hdw->btw", out, w_out.astype(self.dtype)) + b_out.astype(self.dtype)


class Mlp(nn.Module):
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="c_fc",
                     kernel_init=dense_init(("embed", "mlp")), bias_init=zeros_init(("mlp",)))(x)
        h = constrain(nn.gelu(h, approximate=False), ("act_batch", "act_len", "act_mlp"))
        return nn.Dense(width, dtype=self.dtype, name="c_proj",
                        kernel_init=dense_init(("mlp", "embed")), bias_init=zeros_init(("embed",)))(h)


class Block(nn.Module):
    """Pre-LN residual block; signature (carry, broadcast) -> (carry, None) so it can be scanned."""
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, None]:
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        x = x + Attention(self.num_heads, self.dtype, self.attention, name="attn")(LayerNorm(self.dtype, name="ln_1")(x), mask)
        x = x + Mlp(self.mlp_dim, self.dtype, name="mlp")(LayerNorm(self.dtype, name="ln_2")(x))
        return x, None


class Transformer(nn.Module):
    """`depth` blocks under `nn.scan`: one compiled block whatever the depth, params stacked on a
    leading `layers` axis (compile time of L/2 or H/2 stays that of one block)."""
    depth: int
    num_heads: int
    mlp_dim: int
    remat: str = "none"
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        block = Block
        if REMAT_POLICIES[self.remat] is not None:
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        stack = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=nn.broadcast, length=self.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(self.num_heads, self.mlp_dim, self.dtype, self.attention, name="resblocks")(x, mask)
        return x


def sincos_2d(grid: int, width: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (grid*grid, width), row-major over the grid.

    MAE's frequencies, 1 / 10000^(i / (width/4)), as open_clip's `pos_embed_type="sin_cos_2d"`
    (MAE's helper). big_vision's `posemb_sincos_2d` divides by width/4 - 1 instead (its lowest
    frequency is exactly 1/10000); the channel order is the same (sin, cos of the column, then
    of the row). The two tables differ by at most 0.013 (B, 8x8 grid) to 0.029 (B, 16x16). The
    exports copy the table itself, so either reproduces exactly in PyTorch."""
    if width % 4:
        raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
    coords = np.arange(grid, dtype=np.float64)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def causal_mask(length: int) -> jax.Array:
    return jnp.tril(jnp.ones((length, length), bool))[None, None]
