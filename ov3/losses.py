"""The OpenVision 3 objective (paper Eq. 3-6) as pure functions of arrays.

    L_rec = L1(x, x_hat) + beta * L1(z_vae, z_hat) + lambda * LPIPS(x, x_hat)
    L_und = L_caption + alpha * L_contrastive,  L_contrastive = mean_k CLIP(image, text_k)
    L     = w_rec * L_rec + w_und * L_und

Every function reduces over the *global* batch: under `jit` with a sharded batch XLA inserts
the cross-device reductions, so the contrastive softmax sees all B x B pairs without a Python
loop, a second mesh or a manual all-gather.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

# open_clip's bound on exp(logit_scale), applied to the parameter after each update
# (`ov3.tasks.OV3Task.constrain`), never in the forward pass: a forward clip has zero gradient
# past the bound, so the parameter could stay there for good.
MAX_LOGIT_SCALE = math.log(100.0)


def l1(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def contrastive(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Symmetric CLIP softmax loss; row i of each embedding is a positive pair.

    text_emb (B, E), or (B, K, E) for K positives per image (OpenVision: the alt-text and a
    sentence of the synthetic caption): the mean of the K CLIP losses against the same images,
    each text set with its own in-batch negatives."""
    if text_emb.ndim == 3:
        return jnp.mean(jnp.stack([contrastive(image_emb, text_emb[:, k], logit_scale)
                                   for k in range(text_emb.shape[1])]))
    img = image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True)
    txt = text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True)
    logits = jnp.exp(logit_scale) * img @ txt.T
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return (i2t.mean() + t2i.mean()) / 2


def caption(logits: jax.Array, ids: jax.Array, pad_id: int = 0) -> jax.Array:
    """Next-token cross-entropy: logits[:, t] predicts ids[:, t+1]; pad targets are masked.
    Averaged over the real target tokens of the whole batch.

    logsumexp in fp32 minus the target's logit, over all T positions with the last one's target
    padded (it predicts nothing): slicing the logits to T-1 and converting them to fp32 as a
    whole made the TPU program write and re-read an fp32 copy of the (B, T-1, vocab) logits
    (the loss and its gradient: 2.12 -> 1.68 ms for OV3-B's caption head on a v4 chip)."""
    targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)), constant_values=pad_id)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) - picked.astype(jnp.float32)
    mask = (targets != pad_id).astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dims, averaged over the batch
    (diffusers' DiagonalGaussianDistribution.kl)."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.mean(jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1))
