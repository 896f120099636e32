"""PSNR / SSIM vs scikit-image, Fréchet distance vs scipy's sqrtm, and zero-shot /
retrieval metrics on embeddings whose answer is known."""

import numpy as np
import pytest
import scipy.linalg
import skimage.data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ov3.errors import Ov3Error
from ov3.evals import metrics


def _noisy_batch(scale, offset, sigma, seed):
    """astronaut / coffee / chelsea, centre-cropped to 192x256, mapped to
    `value * scale + offset`, plus Gaussian noise of `sigma` x range, clipped."""
    rng = np.random.default_rng(seed)
    crops = []
    for name in ("astronaut", "coffee", "chelsea"):
        im = getattr(skimage.data, name)().astype(np.float64)
        h, w = im.shape[0] // 2, im.shape[1] // 2
        crops.append(im[h - 96:h + 96, w - 128:w + 128])
    x = np.stack(crops) * scale + offset
    lo, hi = offset, 255 * scale + offset
    y = np.clip(x + rng.normal(0, sigma * (hi - lo), x.shape), lo, hi)
    return x, y, hi - lo


@pytest.mark.parametrize("scale,offset,sigma", [
    (1 / 255, 0.0, 0.02),   # [0, 1], reconstruction-like quality (PSNR ~ 34)
    (1.0, 0.0, 0.1),        # [0, 255], heavy noise
    (2 / 255, -1.0, 0.05),  # [-1, 1], ov3's image range
])
def test_psnr_ssim_match_skimage_on_batch(scale, offset, sigma):
    x, y, data_range = _noisy_batch(scale, offset, sigma, seed=0)
    got_p = np.asarray(metrics.psnr(x, y, data_range))
    got_s = np.asarray(metrics.ssim(x, y, data_range))
    want_p = [peak_signal_noise_ratio(a, b, data_range=data_range) for a, b in zip(x, y)]
    want_s = [structural_similarity(a, b, channel_axis=-1, data_range=data_range)
              for a, b in zip(x, y)]
    assert got_p.shape == got_s.shape == (3,)
    np.testing.assert_allclose(got_p, want_p, atol=1e-4)
    np.testing.assert_allclose(got_s, want_s, atol=1e-4)
    print(f"\nvs skimage (range {data_range:g}, noise {sigma}): PSNR {np.abs(got_p - want_p).max():.1e}, "
          f"SSIM {np.abs(got_s - want_s).max():.1e} (max abs)")


def test_single_image_and_identical_images():
    x, y, _ = _noisy_batch(1.0, 0.0, 0.05, seed=1)
    x, y = x[2], y[2]  # one [H, W, C] image, no batch axis
    np.testing.assert_allclose(float(metrics.ssim(x, y, 255.0)),
                               structural_similarity(x, y, channel_axis=-1, data_range=255.0),
                               atol=1e-4)
    assert np.isinf(float(metrics.psnr(x, x, 255.0)))
    np.testing.assert_allclose(float(metrics.ssim(x, x, 255.0)), 1.0, atol=1e-6)


def _fid_scipy(mu1, s1, mu2, s2):
    """pytorch-fid's calculate_frechet_distance: scipy sqrtm of S1 S2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


def test_frechet_distance_and_streaming_stats_match_scipy():
    rng = np.random.default_rng(0)
    d = 64
    # ReLU-like, correlated features, as Inception pool3 features are.
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    a = np.maximum(rng.normal(size=(1000, d)) @ mix, 0)
    b = np.maximum(rng.normal(size=(700, d)) @ mix * 1.1 + 0.05, 0)
    stats_a = metrics.FeatureStats(d)
    for chunk in np.array_split(a, 7):  # uneven batches
        stats_a.update(chunk.astype(np.float32))
    # Two "hosts", one with padding rows masked out.
    pad = np.concatenate([b[350:], np.full((5, d), 1e3)])
    mask = np.arange(len(pad)) < 350
    stats_b = metrics.FeatureStats(d).update(b[:350]).merge(
        metrics.FeatureStats(d).update(pad, mask=mask))
    mu_a, cov_a = stats_a.mean_cov()
    mu_b, cov_b = stats_b.mean_cov()
    a32 = a.astype(np.float32).astype(np.float64)  # what update() was given
    np.testing.assert_allclose(mu_a, a32.mean(0), atol=1e-12)
    np.testing.assert_allclose(cov_a, np.cov(a32, rowvar=False), atol=1e-12)
    np.testing.assert_allclose(cov_b, np.cov(b, rowvar=False), atol=1e-12)
    want = _fid_scipy(mu_a, cov_a, mu_b, cov_b)
    got = metrics.fid_from_stats(stats_a, stats_b)
    assert want > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-9)
    print(f"\nFrechet distance {got:.6f} vs scipy sqrtm {want:.6f}: relative error {abs(got - want) / want:.1e}")
    np.testing.assert_allclose(metrics.frechet_distance(mu_a, cov_a, mu_a, cov_a), 0.0,
                               atol=1e-9)


def test_frechet_distance_closed_form():
    # Commuting covariances: d = |dmu|^2 + sum (sqrt(l1) - sqrt(l2))^2.
    l1, l2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    want = 9.0 + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    np.testing.assert_allclose(
        metrics.frechet_distance(mu1, np.diag(l1), mu2, np.diag(l2)), want, rtol=1e-12)


def test_zero_shot_topk_known_ranks():
    k = 8
    classes = np.eye(k) * 3.0  # norms differ from 1: the metric normalises
    ranks = np.array([0, 0, 1, 4, 5, 7, 2, 0])
    labels = np.arange(k)
    images = np.zeros((k, k))
    for i, (label, rank) in enumerate(zip(labels, ranks)):
        # Scores fall with position; the true class is put at position `rank`.
        order = [c for c in range(k) if c != label]
        order.insert(rank, label)
        images[i, order] = np.linspace(1.0, 0.2, k) * (i + 1)
    acc = metrics.zero_shot_topk(images, classes, labels, ks=(1, 5))
    np.testing.assert_allclose(float(acc["top1"]), 3 / 8)
    np.testing.assert_allclose(float(acc["top5"]), 6 / 8)
    mask = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)  # padding rows drop out
    acc = metrics.zero_shot_topk(images, classes, labels, ks=(1, 2), mask=mask)
    np.testing.assert_allclose(float(acc["top1"]), 2 / 4)
    np.testing.assert_allclose(float(acc["top2"]), 3 / 4)


def test_retrieval_recall_hand_computed():
    # 3 images (the basis vectors), 2 captions each. Cosine scores by hand:
    #   t2i ranks of each caption's own image: [0, 1, 0, 1, 0, 2]
    #   i2t: image 0 best own caption t0 (1.0) is top; image 1's best own caption
    #   (t2, .894) loses to t1 (.981); image 2's (t4, .802) loses to t3 (.958).
    images = np.eye(3)
    texts = np.array([[1, 0, 0], [0.2, 1, 0], [0, 1, 0.5], [0, 0.3, 1], [0.1, 0.2, 0.3],
                      [1, 0.5, 0.4]])
    idx = np.array([0, 0, 1, 1, 2, 2])
    r = metrics.retrieval_recall(images, texts, text_to_image=idx, ks=(1, 2, 3), chunk=2)
    np.testing.assert_allclose([r["t2i_R@1"], r["t2i_R@2"], r["t2i_R@3"]], [3 / 6, 5 / 6, 1])
    np.testing.assert_allclose([r["i2t_R@1"], r["i2t_R@2"], r["i2t_R@3"]], [1 / 3, 1, 1])


def _recall_by_sorting(img, txt, idx, ks):
    """Brute-force reference: full argsort of the float64 similarity matrix."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sim = img @ txt.T
    i2t = np.array([np.where(np.isin(np.argsort(-sim[i]), np.where(idx == i)[0]))[0].min()
                    for i in range(len(img))])
    t2i = np.array([np.where(np.argsort(-sim[:, t]) == idx[t])[0][0] for t in range(len(txt))])
    return {**{f"i2t_R@{k}": (i2t < k).mean() for k in ks},
            **{f"t2i_R@{k}": (t2i < k).mean() for k in ks}}


def test_retrieval_recall_karpathy_layout_matches_sorting():
    rng = np.random.default_rng(0)
    n_img, dim = 50, 16
    img = rng.normal(size=(n_img, dim))
    idx = np.repeat(np.arange(n_img), 5)  # 5 captions per image, Karpathy layout
    txt = img[idx] + 1.2 * rng.normal(size=(len(idx), dim))
    got = metrics.retrieval_recall(img, txt, text_to_image=idx, chunk=16)
    want = _recall_by_sorting(img, txt, idx, (1, 5, 10))
    assert 0.1 < want["t2i_R@1"] < 0.9  # neither trivial nor hopeless
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, err_msg=key)


def test_retrieval_recall_rejects_bad_index():
    with pytest.raises(Ov3Error, match="text_to_image"):
        metrics.retrieval_recall(np.eye(3), np.eye(3)[:2], text_to_image=np.array([0, 1]))
    with pytest.raises(Ov3Error, match="text_to_image"):
        metrics.retrieval_recall(np.eye(3), np.eye(3), text_to_image=np.array([0, 1, 1, 2]))


def test_ranking_ties_and_nan_are_not_hits():
    """Collapsed embeddings tie everywhere: chance-or-worse, not 100 %; NaN gives NaN."""
    same = np.ones((6, 4))
    labels = np.arange(6) % 3
    assert metrics.zero_shot_topk(same, np.ones((3, 4)), labels, ks=(1, 3)) == {"top1": 0.0, "top3": 1.0}
    r = metrics.retrieval_recall(same, same, text_to_image=np.arange(6), ks=(1, 6))
    assert r == {"i2t_R@1": 0.0, "t2i_R@1": 0.0, "i2t_R@6": 1.0, "t2i_R@6": 1.0}
    nan = np.full((6, 4), np.nan)
    assert all(np.isnan(v) for v in metrics.zero_shot_topk(nan, np.eye(3, 4), labels).values())
    for mapping in ({"text_to_image": np.arange(6)}, {"image_to_text": np.arange(6)}):
        assert all(np.isnan(v) for v in metrics.retrieval_recall(nan, np.eye(6, 4), **mapping).values())
