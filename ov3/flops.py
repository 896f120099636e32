"""Analytic FLOPs of one training example, per component.

Counts are matmul/conv FLOPs (2 per multiply-add); elementwise work (norms, GELU, softmax,
residual adds) is left out, as in MaxText and PaLM's MFU. `ov3.tools.summary` checks the
transformer counts against XLA's `cost_analysis()` (which counts elementwise ops too, so it
reads a few percent higher).

Why analytic and not the compiled step's `cost_analysis()`: XLA counts the body of a while
loop once, and every tower here is an `nn.scan` over its blocks, so the compiled step reports
about one block per tower whatever the depth (measured on jax 0.10.2); it would also count the
recomputation that remat adds, which MFU must not.

What a training step executes, per component, as a multiple of its forward pass:
  trainable towers (encoder, decoder, text, caption)   3x  forward + grads of inputs and weights
  VAE decoder, LPIPS on x_hat (frozen, grads flow)      2x  forward + grads of inputs only
  VAE encoder, LPIPS on x (no gradient)                 1x
The contrastive logits (2 * global_batch * embed_dim per example) are < 0.01 % and left out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ov3.models import registry


@dataclasses.dataclass(frozen=True)
class Cost:
    forward: float          # FLOPs of one forward pass of one example
    train_factor: float     # forward passes' worth executed per training step (see module doc)

    @property
    def train(self) -> float:
        return self.forward * self.train_factor


# ----------------------------------------------------------------------------- transformers

def block_flops(tokens: int, width: int, mlp_dim: int) -> float:
    """One pre-LN block: qkv 6TW^2, attention logits + weighted sum 4T^2W, out 2TW^2, MLP 4TWM."""
    t, w = tokens, width
    return 8 * t * w * w + 4 * t * t * w + 4 * t * w * mlp_dim


def stack_flops(tokens: int, size: registry.Size) -> float:
    return size.depth * block_flops(tokens, size.width, size.mlp_dim)


def encoder_flops(name: str, latent_grid: int, latent_channels: int) -> float:
    """ViT over the latents: patch conv, class token + patch tokens through the blocks, proj."""
    size, patch = registry.vit_size(name, "model.encoder")
    grid = latent_grid // patch
    embed = registry.embed_dim(name.split("/")[0], "model.encoder")
    conv = 2 * grid * grid * patch * patch * latent_channels * size.width
    return conv + stack_flops(grid * grid + 1, size) + 2 * size.width * embed


def decoder_flops(name: str, encoder: str, latent_grid: int, latent_channels: int) -> float:
    """Per-token embed from the encoder width, blocks, head to p*p*C latent values per token."""
    size, _ = registry.vit_size(name, "model.decoder")
    enc, patch = registry.vit_size(encoder, "model.encoder")
    tokens = (latent_grid // patch) ** 2
    return (2 * tokens * enc.width * size.width + stack_flops(tokens, size)
            + 2 * tokens * size.width * patch * patch * latent_channels)


def text_flops(name: str, encoder: str, text_len: int) -> float:
    size = registry.text_size(name)
    embed = registry.embed_dim(encoder.split("/")[0], "model.encoder")
    return stack_flops(text_len, size) + 2 * size.width * embed


def caption_flops(name: str, encoder: str, latent_grid: int, caption_len: int, vocab_size: int) -> float:
    """Image-token projection, prefix-LM blocks over image + caption tokens, vocabulary head.
    The prefix-LM mask does not save work: attention is computed densely and masked."""
    size = registry.text_size(name)
    enc, patch = registry.vit_size(encoder, "model.encoder")
    image_tokens = (latent_grid // patch) ** 2
    return (2 * image_tokens * enc.width * size.width + stack_flops(image_tokens + caption_len, size)
            + 2 * caption_len * size.width * vocab_size)


# ----------------------------------------------------------------------------- convnets

def conv_flops(side: int, cin: int, cout: int, kernel: int) -> float:
    """A 'same' conv producing a side x side map."""
    return 2 * side * side * kernel * kernel * cin * cout


def _resnet(side: int, cin: int, cout: int) -> float:
    shortcut = conv_flops(side, cin, cout, 1) if cin != cout else 0
    return conv_flops(side, cin, cout, 3) + conv_flops(side, cout, cout, 3) + shortcut


def _attention(side: int, c: int) -> float:
    t = side * side  # one head of width c over every pixel: q, k, v, out + logits + weighted sum
    return 8 * t * c * c + 4 * t * t * c


def vae_encode_flops(vae: Any, image_size: int) -> float:
    """diffusers AutoencoderKL encoder (see ov3/models/vae.py), one image of image_size^2."""
    chans, layers = vae.block_out_channels, vae.layers_per_block
    side, cin = image_size, chans[0]
    total = conv_flops(side, vae.in_channels, chans[0], 3)
    for i, ch in enumerate(chans):
        for _ in range(layers):
            total += _resnet(side, cin, ch)
            cin = ch
        if i < len(chans) - 1:
            side //= 2
            total += conv_flops(side, ch, ch, 3)  # stride-2 conv
    total += 2 * _resnet(side, cin, cin) + (_attention(side, cin) if vae.mid_block_add_attention else 0)
    total += conv_flops(side, cin, 2 * vae.latent_channels, 3)
    if vae.use_quant_conv:
        total += conv_flops(side, 2 * vae.latent_channels, 2 * vae.latent_channels, 1)
    return total


def vae_decode_flops(vae: Any, image_size: int) -> float:
    """diffusers AutoencoderKL decoder, latents of one image_size^2 image back to pixels."""
    chans, layers = vae.block_out_channels[::-1], vae.layers_per_block + 1
    side = image_size // vae.downsample_factor
    total = conv_flops(side, vae.latent_channels, vae.latent_channels, 1) if vae.use_post_quant_conv else 0
    total += conv_flops(side, vae.latent_channels, chans[0], 3)
    total += 2 * _resnet(side, chans[0], chans[0]) + (
        _attention(side, chans[0]) if vae.mid_block_add_attention else 0)
    cin = chans[0]
    for i, ch in enumerate(chans):
        for _ in range(layers):
            total += _resnet(side, cin, ch)
            cin = ch
        if i < len(chans) - 1:
            # nearest x2 + 3x3 conv, in the sub-pixel form (ov3/models/vae.py SubpixelConv):
            # a 2x2 conv to 4 * ch channels over the low-res map padded by 1
            total += conv_flops(side + 1, ch, 4 * ch, 2)
            side *= 2
    return total + conv_flops(side, cin, vae.out_channels, 3)


# LPIPS-VGG16 trunk up to relu5_3 (`ov3/models/lpips.py`): (channels, convs) per stage, a 2x2
# max-pool between stages.
_VGG_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def lpips_flops(image_size: int) -> float:
    """VGG16 features of one image; the 1x1 heads are negligible."""
    total, side, cin = 0.0, image_size, 3
    for stage, (ch, convs) in enumerate(_VGG_STAGES):
        if stage:
            side //= 2
        for _ in range(convs):
            total += conv_flops(side, cin, ch, 3)
            cin = ch
    return total


# ----------------------------------------------------------------------------- one example

def ov3_costs(spec: Any, image_size: int, vae: Any, lpips: bool, num_texts: int = 1) -> dict[str, Cost]:
    """Per-component costs of one example of the OV3 objective.

    spec: `ov3.models.ov3.ModelSpec`; vae: `ov3.models.vae.VAEConfig`, or `PixelSpace` for the
    no-VAE ablation (no VAE terms); lpips: whether the LPIPS term is on (config.loss.lpips > 0);
    num_texts: contrastive positives per image (len(config.loss.contrastive_texts))."""
    from ov3.models.vae import PixelSpace
    grid = image_size // vae.downsample_factor
    c = spec.latent_channels
    pixels = isinstance(vae, PixelSpace)
    costs = {
        "vae_encode": None if pixels else Cost(vae_encode_flops(vae, image_size), 1),
        "encoder": Cost(encoder_flops(spec.encoder, grid, c), 3),
        "text": Cost(num_texts * text_flops(spec.text, spec.encoder, spec.text_len), 3),
        "caption": Cost(caption_flops(spec.text, spec.encoder, grid, spec.caption_len, spec.vocab_size), 3),
        "decoder": Cost(decoder_flops(spec.decoder, spec.encoder, grid, c), 3),
        "vae_decode": None if pixels else Cost(vae_decode_flops(vae, image_size), 2),
    }
    if lpips:  # VGG on x (forward) and on x_hat (forward + input grads): 3 forward passes' worth
        costs["lpips"] = Cost(lpips_flops(image_size), 3)
    return {k: v for k, v in costs.items() if v is not None}


def vae_task_costs(vae: Any, image_size: int, lpips: bool) -> dict[str, Cost]:
    """task="vae": the autoencoder itself is trained (encoder and decoder 3x)."""
    costs = {"vae_encode": Cost(vae_encode_flops(vae, image_size), 3),
             "vae_decode": Cost(vae_decode_flops(vae, image_size), 3)}
    if lpips:
        costs["lpips"] = Cost(lpips_flops(image_size), 3)
    return costs


def task_costs(cfg: Any, task: Any, cached_latents: bool = False) -> dict[str, Cost]:
    """Costs for a built task (`ov3.train.build_task`): what the train loop's MFU is based on.
    cached_latents: batches carry VAE latents, so the VAE encoder does not run."""
    lpips = cfg.loss.lpips > 0
    if cfg.task == "vae":
        return vae_task_costs(task.vae.config, cfg.image_size, lpips)
    costs = ov3_costs(task.spec, cfg.image_size, task.vae.config, lpips, len(cfg.loss.contrastive_texts))
    if cached_latents:
        costs.pop("vae_encode", None)
    return costs


def train_flops_per_example(costs: dict[str, Cost]) -> float:
    return sum(c.train for c in costs.values())
