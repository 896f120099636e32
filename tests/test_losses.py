"""Each loss term against an independent numpy computation."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ov3 import losses, sharding


def np_logsumexp(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_contrastive(img, txt, logit_scale):
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = np.exp(logit_scale) * img @ txt.T
    diag = np.diag(logits)
    i2t = np_logsumexp(logits, 1) - diag
    t2i = np_logsumexp(logits, 0) - diag
    return (i2t.mean() + t2i.mean()) / 2


def test_contrastive_matches_numpy():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(16, 8)), rng.normal(size=(16, 8))
    for scale in (np.log(1 / 0.07), 6.0):  # no clip in the loss: the parameter is clamped after updates
        got = losses.contrastive(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(scale))
        np.testing.assert_allclose(got, np_contrastive(img, txt, scale), rtol=1e-5)


def test_two_positive_contrastive_matches_numpy():
    """OpenVision's two positives: the mean of CLIP(image, alt-text) and CLIP(image, sentence)."""
    rng = np.random.default_rng(4)
    img, txt = rng.normal(size=(12, 8)), rng.normal(size=(12, 2, 8))
    got = losses.contrastive(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(2.5))
    want = (np_contrastive(img, txt[:, 0], 2.5) + np_contrastive(img, txt[:, 1], 2.5)) / 2
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_contrastive_is_minimal_for_aligned_pairs():
    emb = jnp.eye(8)
    aligned = losses.contrastive(emb, emb, jnp.float32(np.log(100.0)))
    shuffled = losses.contrastive(emb, jnp.roll(emb, 1, axis=0), jnp.float32(np.log(100.0)))
    assert aligned < 1e-3 < shuffled


def test_caption_masks_padding():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
    ids = np.array([[1, 5, 7, 2, 0, 0], [1, 3, 2, 0, 0, 0], [1, 4, 4, 4, 4, 2]])
    # independent: loop over every real target token
    logp = logits - np_logsumexp(logits, 2)[..., None]
    nll = [-logp[b, t, ids[b, t + 1]] for b in range(3) for t in range(5) if ids[b, t + 1] != 0]
    got = losses.caption(jnp.asarray(logits), jnp.asarray(ids), pad_id=0)
    np.testing.assert_allclose(got, np.mean(nll), rtol=1e-5)
    # gradient: (softmax - one-hot) / #targets at positions with a real next token, 0 elsewhere
    want = np.zeros_like(logits)
    for b in range(3):
        for t in range(5):
            if ids[b, t + 1] != 0:
                want[b, t] = np.exp(logp[b, t]) - np.eye(11)[ids[b, t + 1]]
    grad = jax.grad(losses.caption)(jnp.asarray(logits), jnp.asarray(ids), 0)
    np.testing.assert_allclose(grad, want / len(nll), atol=1e-6)
    # bf16 logits (the caption head's dtype): the same loss to bf16's rounding of the logits
    bf16 = losses.caption(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(ids), pad_id=0)
    np.testing.assert_allclose(bf16, np.mean(nll), rtol=1e-2)


def test_l1_and_kl():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
    np.testing.assert_allclose(losses.l1(jnp.asarray(x), jnp.asarray(y)), np.abs(x - y).mean(), rtol=1e-5)
    mean, logvar = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 3, 3, 4)) * 0.1
    kl = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).reshape(2, -1).sum(1).mean()
    np.testing.assert_allclose(losses.kl_to_standard_normal(jnp.asarray(mean), jnp.asarray(logvar)), kl, rtol=1e-5)


def test_contrastive_over_sharded_global_batch_equals_single_device():
    """The loss sees all B x B pairs when the batch is split over 8 devices."""
    import ml_collections
    rng = np.random.default_rng(3)
    img, txt = rng.normal(size=(32, 16)).astype(np.float32), rng.normal(size=(32, 16)).astype(np.float32)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, tensor=1)))
    spec = NamedSharding(mesh, P(sharding.BATCH_AXES))
    fn = jax.jit(losses.contrastive)
    sharded = fn(jax.device_put(img, spec), jax.device_put(txt, spec), jnp.float32(2.0))
    single = fn(jnp.asarray(img), jnp.asarray(txt), jnp.float32(2.0))
    assert len(jax.device_put(img, spec).sharding.device_set) == 8
    np.testing.assert_allclose(sharded, single, rtol=1e-6)
    np.testing.assert_allclose(single, np_contrastive(img, txt, 2.0), rtol=1e-5)
