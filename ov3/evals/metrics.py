"""Evaluation metrics: reconstruction (PSNR, SSIM, Fréchet distance) and CLIP-style
understanding (zero-shot top-k, retrieval recall@K).

Image metrics take channel-last images `[..., H, W, C]` and return one value per image,
so a sharded batch stays sharded and the caller decides how to average (and mask
padding). They match scikit-image's `peak_signal_noise_ratio` and
`structural_similarity(channel_axis=-1, data_range=R)` (7x7 uniform window, sample
covariance, K1=0.01, K2=0.03).

The Fréchet distance is host-side numpy in float64: its matrix square root is
ill-conditioned and float32 moves rFID in the digits the paper reports (0.187).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ov3.errors import Ov3Error

_SSIM_WIN = 7
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


# ----------------------------------------------------------------------------- images


def _mean_hwc(x: jax.Array) -> jax.Array:
    """Mean over the last three axes, one axis at a time: short float32 sums lose
    fewer digits than one long one (PSNR must agree with float64 to 1e-4 dB)."""
    n = x.shape[-3] * x.shape[-2] * x.shape[-1]
    return x.sum(axis=-2).sum(axis=-2).sum(axis=-1) / n


@jax.jit
def psnr(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image; `x, y: [..., H, W, C]` -> `[...]`.

    `data_range` is max - min of the value range (2.0 for images in [-1, 1], 255 for
    uint8 values). Identical images give +inf, as in scikit-image.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    mse = _mean_hwc(jnp.square(x - y))
    return 10.0 * jnp.log10(data_range**2 / mse)


def _box_valid(x: jax.Array, k: int) -> jax.Array:
    """Mean over the k x k windows that fit inside the image (`[..., H, W, C]`).

    scikit-image filters with reflect padding and then crops (k - 1) // 2 pixels off
    every border before averaging, so only windows entirely inside the image count:
    a 'valid' box filter gives exactly those values. Two 1-D window sums (k adds per
    pixel each, not k^2); one reduce_window op each keeps XLA's compile time short.
    """
    ones = (1,) * (x.ndim - 3)
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, ones + (k, 1, 1), (1,) * x.ndim, "VALID")
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, ones + (1, k, 1), (1,) * x.ndim, "VALID")
    return x / (k * k)


@jax.jit
def ssim(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
    """Mean structural similarity per image; `x, y: [..., H, W, C]` -> `[...]`.

    Matches `skimage.metrics.structural_similarity(x, y, channel_axis=-1,
    data_range=data_range)`: per-channel SSIM maps with a 7x7 uniform window and
    sample (N - 1) covariance, averaged over the valid region and then over channels.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.shape != y.shape or x.ndim < 3:
        raise ValueError(f"ssim wants two [..., H, W, C] arrays, got {x.shape}, {y.shape}")
    if min(x.shape[-3], x.shape[-2]) < _SSIM_WIN:
        raise ValueError(f"ssim needs images of at least {_SSIM_WIN}x{_SSIM_WIN}, got {x.shape}")
    # Variances are shift-invariant, so take them on per-image, per-channel centred
    # values: E[x^2] - E[x]^2 in float32 cancels badly when the mean dwarfs the contrast.
    mx = x.mean(axis=(-3, -2), keepdims=True)
    my = y.mean(axis=(-3, -2), keepdims=True)
    xc, yc = x - mx, y - my
    # One filter pass over the five stacked moments instead of five.
    ux_c, uy_c, uxx, uyy, uxy = _box_valid(
        jnp.stack([xc, yc, xc * xc, yc * yc, xc * yc]), _SSIM_WIN)
    cov_norm = _SSIM_WIN**2 / (_SSIM_WIN**2 - 1)
    vx = cov_norm * (uxx - ux_c * ux_c)
    vy = cov_norm * (uyy - uy_c * uy_c)
    vxy = cov_norm * (uxy - ux_c * uy_c)
    ux, uy = ux_c + mx, uy_c + my
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return _mean_hwc(s)


# ------------------------------------------------------------------- Fréchet distance


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2). S1 S2 has the eigenvalues
    of sqrt(S1) S2 sqrt(S1), which is symmetric PSD, so two `eigh` calls replace
    scipy's general `sqrtm` (no imaginary round-off to drop, no eps retry, faster).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance shapes disagree: mu {mu1.shape}, {mu2.shape}; "
                         f"sigma {s1.shape}, {s2.shape}")
    evals1, evecs1 = np.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (evecs1 * np.sqrt(np.clip(evals1, 0, None))) @ evecs1.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


@dataclasses.dataclass
class FeatureStats:
    """Running count, sum and sum of outer products of feature vectors, in float64.

    Accumulate batch by batch (`update`), combine hosts or shards (`merge`), then read
    `mean_cov()`; the covariance equals `np.cov(all_features, rowvar=False)`.
    """

    dim: int
    count: int = 0
    total: Optional[np.ndarray] = None
    outer: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.total is None:
            self.total = np.zeros((self.dim,), np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features, mask=None) -> "FeatureStats":
        """Adds `features: [B, dim]`; rows where `mask` is False (padding) are skipped."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"FeatureStats(dim={self.dim}) got features of shape {f.shape}")
        if mask is not None:
            f = f[np.asarray(mask, bool).reshape(-1)]
        self.count += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Adds another accumulator's features (e.g. from another host)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge FeatureStats of dim {self.dim} and {other.dim}")
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased (n - 1) covariance, as `np.mean` / `np.cov(rowvar=False)`."""
        if self.count < 2:
            raise ValueError(f"FeatureStats needs at least 2 features, has {self.count}")
        mu = self.total / self.count
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, cov


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID (or rFID) between two accumulated feature sets."""
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


# -------------------------------------------------------------- zero-shot, retrieval
# Ties count against the model (pessimistic): the true item's rank is the number of wrong
# items scoring >= it, so collapsed embeddings score chance or worse, never 100 %. Scores are
# taken from one similarity matrix (true and wrong alike), so exact ties stay exact.
# Non-finite embeddings (a diverged model) give NaN metrics and a warning, not a number.


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _finite(name: str, *arrays: np.ndarray) -> bool:
    """False (and a warning) if any of the arrays holds a NaN or an infinity."""
    if all(np.isfinite(np.asarray(a)).all() for a in arrays):
        return True
    logging.warning("%s: the embeddings hold NaN or inf values (a diverged model?); "
                    "reporting NaN.", name)
    return False


@functools.partial(jax.jit, static_argnames=("ks",))
def _zero_shot_topk(image_emb, class_text_emb, labels, ks, mask):
    logits = _l2_normalize(image_emb) @ _l2_normalize(class_text_emb).T
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)
    rank = (logits >= true).sum(axis=1) - 1  # other classes scoring at least the true one
    denom = jnp.maximum(mask.sum(), 1.0)
    return {f"top{k}": ((rank < k) * mask).sum() / denom for k in ks}


def zero_shot_topk(image_emb: jax.Array, class_text_emb: jax.Array, labels: jax.Array,
                   ks: Sequence[int] = (1, 5),
                   mask: Optional[jax.Array] = None) -> dict[str, float]:
    """Zero-shot top-k accuracy over a batch, by cosine similarity.

    Args:
      image_emb: `[B, E]` image embeddings (normalised here).
      class_text_emb: `[K, E]`, one embedding per class, usually the normalised mean
        over prompt templates (normalised again here).
      labels: `[B]` int class indices.
      ks: which top-k accuracies to report.
      mask: optional `[B]` bool; False rows (batch padding) are left out.

    Returns:
      `{"top1": acc, "top5": acc, ...}`, fractions in [0, 1]. A tie with the true class
      counts as a miss (rank = #other classes scoring >= it); NaN if an embedding is not
      finite.
    """
    w = np.ones(np.shape(labels), np.float32) if mask is None else np.asarray(mask, np.float32)
    if not _finite("zero_shot_topk", np.asarray(image_emb)[w > 0], class_text_emb):
        return {f"top{k}": float("nan") for k in ks}
    acc = _zero_shot_topk(image_emb, class_text_emb, jnp.asarray(labels, jnp.int32), tuple(ks), w)
    return {k: float(v) for k, v in acc.items()}


@jax.jit
def _block_scores(img, txt, img_ids, txt_ids):
    """One block of image rows: the similarity matrix and which pairs match."""
    # HIGHEST: TPU/GPU default float32 matmuls round to bf16/TF32, enough to reorder near ties.
    sim = jnp.matmul(img, txt.T, precision=jax.lax.Precision.HIGHEST)  # [chunk, T]
    return sim, img_ids[:, None] == txt_ids[None, :]


@jax.jit
def _best_positive(img, txt, img_ids, txt_ids):
    """Per text: its best matching image's score in this block (-inf where none)."""
    sim, pos = _block_scores(img, txt, img_ids, txt_ids)
    return jnp.where(pos, sim, -jnp.inf).max(axis=0)


@jax.jit
def _block_ranks(img, txt, img_ids, txt_ids, best_t2i):
    """Per image row: non-matching texts scoring >= its best match; per text: non-matching
    images of this block scoring >= its best matching image."""
    sim, pos = _block_scores(img, txt, img_ids, txt_ids)
    best_i2t = jnp.where(pos, sim, -jnp.inf).max(axis=1)
    valid = img_ids >= 0  # padding rows have id -1
    neg = ~pos & valid[:, None]
    return ((sim >= best_i2t[:, None]) & neg).sum(axis=1), ((sim >= best_t2i[None, :]) & neg).sum(axis=0)


def retrieval_recall(image_emb: jax.Array, text_emb: jax.Array, *,
                     text_to_image: Optional[np.ndarray] = None,
                     image_to_text: Optional[np.ndarray] = None,
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Image->text and text->image recall@K; exactly one of the mappings is given.

    Args:
      image_emb: `[I, E]`, one row per image (normalised here).
      text_emb: `[T, E]`, one row per text (normalised here).
      text_to_image: `[T]` ints; text t describes image `text_to_image[t]` (Karpathy
        COCO / Flickr30k: 5 captions per image).
      image_to_text: `[I]` ints; image i's text is `image_to_text[i]` (several images
        sharing one alt-text, stored once).
      ks: the K of recall@K.
      chunk: image rows per similarity block; bounds memory to `chunk x T` floats.

    Returns:
      `{"i2t_R@1": .., "t2i_R@1": .., ...}` in [0, 1]. Image->text is a hit when the best
      of the image's texts has fewer than K non-matching texts scoring >= it; text->image
      likewise over images. NaN if an embedding is not finite.
    """
    n_img, n_txt = np.shape(image_emb)[0], np.shape(text_emb)[0]
    if (text_to_image is None) == (image_to_text is None):
        raise ValueError("retrieval_recall: give exactly one of text_to_image, image_to_text")
    own, other, n_own, n_other, name = ((text_to_image, n_img, n_txt, n_img, "text_to_image")
                                        if text_to_image is not None else
                                        (image_to_text, n_txt, n_img, n_txt, "image_to_text"))
    own = np.asarray(own).astype(np.int32).reshape(-1)
    if own.shape[0] != n_own:
        raise Ov3Error(f"retrieval_recall: {name} has {own.shape[0]} entries for {n_own} rows; "
                       "give one index per row.")
    if own.min() < 0 or own.max() >= n_other or np.unique(own).size != n_other:
        raise Ov3Error(f"retrieval_recall: {name} must map onto every index in [0, {n_other}), "
                       f"got values in [{own.min()}, {own.max()}] covering {np.unique(own).size}; "
                       "fix the caption <-> image mapping.")
    if not _finite("retrieval_recall", image_emb, text_emb):
        return {f"{d}_R@{k}": float("nan") for k in ks for d in ("i2t", "t2i")}
    # Match ids: image i and text t match when their ids are equal.
    if text_to_image is not None:
        img_ids, txt_ids = np.arange(n_img, dtype=np.int32), own
    else:
        img_ids, txt_ids = own, np.arange(n_txt, dtype=np.int32)
    img = np.asarray(_l2_normalize(image_emb))
    txt = _l2_normalize(text_emb)
    chunk = min(chunk, n_img)
    pad = -n_img % chunk  # equal blocks: one compiled program, the same sums in both passes
    img = np.concatenate([img, np.zeros((pad, img.shape[1]), np.float32)])
    img_ids = np.concatenate([img_ids, np.full((pad,), -1, np.int32)])
    blocks = [slice(s, s + chunk) for s in range(0, n_img + pad, chunk)]
    txt_ids_j = jnp.asarray(txt_ids)
    best_t2i = np.full((n_txt,), -np.inf, np.float32)
    for b in blocks:
        best_t2i = np.maximum(best_t2i, np.asarray(_best_positive(img[b], txt, img_ids[b], txt_ids_j)))
    i2t_rank, t2i_rank = [], np.zeros((n_txt,), np.int64)
    for b in blocks:
        r_i2t, r_t2i = _block_ranks(img[b], txt, img_ids[b], txt_ids_j, best_t2i)
        i2t_rank.append(np.asarray(r_i2t))
        t2i_rank += np.asarray(r_t2i)
    i2t_rank = np.concatenate(i2t_rank)[:n_img]
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t_rank < k).mean())
        out[f"t2i_R@{k}"] = float((t2i_rank < k).mean())
    return out
