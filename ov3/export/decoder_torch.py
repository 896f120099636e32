"""ov3's latent decoder (unified tokens z_u -> VAE latents) as a self-contained PyTorch module.

Plain torch + safetensors + huggingface_hub; no JAX. `python -m ov3.export --format decoder`
writes `config.json` + `model.safetensors` (the layout of huggingface_hub's PyTorchModelHubMixin)
and copies this file next to them as `ov3_latent_decoder.py`.

    from ov3.export.decoder_torch import LatentDecoder      # or: from ov3_latent_decoder import ...
    decoder = LatentDecoder.from_pretrained("EXPORT_DIR")   # a folder or a Hub repo id; eval mode
    latents = decoder(tokens)                # (B, N, W_enc) -> (B, 16, h, w), the encoder's input space
    images = vae.decode(decoder.to_vae(latents)).sample      # diffusers AutoencoderKL, in [-1, 1]

Architecture (= ov3/models/decoder.py): per-token Linear (a patch-1 ViT over the token grid),
fixed 2-D sin-cos positions (stored in the weights), pre-LN blocks (exact GELU, LayerNorm eps
1e-6), a final LayerNorm and a Linear head emitting patch x patch x C latent values per token,
unpatchified to NCHW.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

CONFIG_NAME = "config.json"          # PyTorchModelHubMixin's file names
WEIGHTS_NAME = "model.safetensors"


class Block(nn.Module):
    """Pre-LN transformer block; the same parameter names as open_clip's ResidualAttentionBlock."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_dim))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_dim, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class LatentDecoder(nn.Module, PyTorchModelHubMixin, library_name="ov3", license="apache-2.0",
                    tags=["ov3", "openvision3", "latent-decoder"]):
    def __init__(self, in_width: int, width: int, depth: int, heads: int, mlp_dim: int, grid: int,
                 patch: int, latent_channels: int, layer_norm_eps: float = 1e-6,
                 scaling_factor: float = 0.3611, shift_factor: float = 0.0, **_: object):
        super().__init__()
        self.grid, self.patch, self.latent_channels = grid, patch, latent_channels
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.embed = nn.Linear(in_width, width)
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid, width), requires_grad=False)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_dim, layer_norm_eps) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(width, eps=layer_norm_eps)
        self.head = nn.Linear(width, patch * patch * latent_channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, grid*grid, in_width), e.g. z_u (noisy or not) -> latents (B, C, g*p, g*p)."""
        b, n, _ = tokens.shape
        if n != self.grid * self.grid:
            raise ValueError(f"expected {self.grid * self.grid} tokens ({self.grid}x{self.grid} grid), got {n}")
        x = self.embed(tokens) + self.positional_embedding
        for block in self.blocks:
            x = block(x)
        x = self.head(self.ln_post(x))
        g, p, c = self.grid, self.patch, self.latent_channels
        # token (h, w) carries a p x p x C patch: (B, h, w, p, q, C) -> (B, C, h, p, w, q).
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (the encoder's input space) -> what AutoencoderKL.decode takes."""
        return latents / self.scaling_factor + self.shift_factor

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs: Any) -> "LatentDecoder":
        # Strict by default: a tensor missing from the file must fail, not stay at its random init.
        return super()._from_pretrained(strict=strict, **kwargs)
