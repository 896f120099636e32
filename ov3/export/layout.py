"""Flax <-> PyTorch tensor layouts of one scanned transformer stack (numpy only, no torch).

Every export speaks PyTorch through one intermediate form: a list with one dict per block,
keyed by open_clip's `ResidualAttentionBlock` names (`ln_1.weight`, `attn.in_proj_weight`,
`mlp.c_fc.weight`, ...). open_clip uses it as is; transformers' ViT/SigLIP/BEiT names are a
rename of it (plus splitting the fused qkv), done in `hf.py`.

Our Flax stack keeps every parameter stacked on a leading layers axis (blocks are scanned) and
the attention weights per head: qkv (L, W, 3, H, D), out (L, H, D, W). torch's fused
`in_proj_weight` is (3W, W) with rows ordered [q; k; v], each block of rows head-major; so the
conversion is a reshape + transpose, never arithmetic, and round trips are bit-exact.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

Params = Mapping[str, Any]
# The names of one open_clip block, in state-dict order.
BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
              "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
              "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def np32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def num_heads(transformer: Params) -> int:
    return int(np.shape(transformer["resblocks"]["attn"]["qkv_kernel"])[3])


def blocks_to_torch(transformer: Params) -> list[dict[str, np.ndarray]]:
    """Flax `transformer` subtree (scanned) -> one open_clip-named dict per block."""
    r = transformer["resblocks"]
    qkv_w, qkv_b = np32(r["attn"]["qkv_kernel"]), np32(r["attn"]["qkv_bias"])
    out_w = np32(r["attn"]["out_kernel"])
    depth, width = qkv_w.shape[:2]
    blocks = []
    for i in range(depth):
        blocks.append({
            "ln_1.weight": np32(r["ln_1"]["scale"][i]), "ln_1.bias": np32(r["ln_1"]["bias"][i]),
            # (W, 3, H, D) -> (3, H, D, W) -> (3W, W): row index = which*W + head*D + d.
            "attn.in_proj_weight": np32(qkv_w[i].transpose(1, 2, 3, 0).reshape(3 * width, width)),
            "attn.in_proj_bias": np32(qkv_b[i].reshape(3 * width)),
            # (H, D, W) -> (H*D, W) is x @ kernel; torch's Linear stores the transpose.
            "attn.out_proj.weight": np32(out_w[i].reshape(width, width).T),
            "attn.out_proj.bias": np32(r["attn"]["out_bias"][i]),
            "ln_2.weight": np32(r["ln_2"]["scale"][i]), "ln_2.bias": np32(r["ln_2"]["bias"][i]),
            "mlp.c_fc.weight": np32(np.asarray(r["mlp"]["c_fc"]["kernel"][i]).T),
            "mlp.c_fc.bias": np32(r["mlp"]["c_fc"]["bias"][i]),
            "mlp.c_proj.weight": np32(np.asarray(r["mlp"]["c_proj"]["kernel"][i]).T),
            "mlp.c_proj.bias": np32(r["mlp"]["c_proj"]["bias"][i]),
        })
    return blocks


def blocks_from_torch(blocks: list[Mapping[str, np.ndarray]], heads: int) -> dict[str, Any]:
    """Inverse of `blocks_to_torch`; `heads` is not stored in a torch state dict."""
    def stack(key: str, fn=lambda a: a) -> np.ndarray:
        return np32(np.stack([fn(np32(b[key])) for b in blocks]))

    width = np.shape(blocks[0]["ln_1.weight"])[0]
    head_dim = width // heads
    qkv = lambda w: w.reshape(3, heads, head_dim, width).transpose(3, 0, 1, 2)
    return {"resblocks": {
        "ln_1": {"scale": stack("ln_1.weight"), "bias": stack("ln_1.bias")},
        "attn": {
            "qkv_kernel": stack("attn.in_proj_weight", qkv),
            "qkv_bias": stack("attn.in_proj_bias", lambda b: b.reshape(3, heads, head_dim)),
            "out_kernel": stack("attn.out_proj.weight", lambda w: w.T.reshape(heads, head_dim, width)),
            "out_bias": stack("attn.out_proj.bias"),
        },
        "ln_2": {"scale": stack("ln_2.weight"), "bias": stack("ln_2.bias")},
        "mlp": {
            "c_fc": {"kernel": stack("mlp.c_fc.weight", np.transpose), "bias": stack("mlp.c_fc.bias")},
            "c_proj": {"kernel": stack("mlp.c_proj.weight", np.transpose), "bias": stack("mlp.c_proj.bias")},
        },
    }}


def split_qkv(block: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fused in_proj -> ([Wq, Wk, Wv], [bq, bk, bv]) as separate torch Linear weights."""
    return (np.split(block["attn.in_proj_weight"], 3, axis=0),
            np.split(block["attn.in_proj_bias"], 3, axis=0))


def mlp_ratio(width: int, mlp_dim: int) -> float:
    """open_clip builds the MLP as int(width * mlp_ratio); make sure that gives `mlp_dim`.

    4304/1152 (So400m) is not exact in floating point and would floor to 4303."""
    ratio = mlp_dim / width
    if int(width * ratio) != mlp_dim:
        ratio = (mlp_dim + 0.5) / width
    return ratio
