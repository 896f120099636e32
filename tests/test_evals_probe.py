"""Linear probe: optimum vs scipy's L-BFGS on the same objective (float64), known
accuracies on separable features, sklearn's LogisticRegression when installed.

Every fit uses the same shapes (400 train / 200 test, 16-d, 5 classes) so the jitted
L-BFGS loop compiles once for the whole file.
"""

import numpy as np
import pytest
import scipy.optimize

from ov3.errors import Ov3Error
from ov3.evals import linear_probe

N_TRAIN, N_TEST, DIM, K = 400, 200, 16, 5


def _overlapping_classes(seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(K, DIM)) * 0.6
    y = rng.integers(0, K, N_TRAIN + N_TEST)
    x = (centers[y] + rng.normal(size=(len(y), DIM))).astype(np.float32)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _scipy_fit(x, y, l2):
    """Same objective, float64, scipy's L-BFGS-B run to a tight tolerance."""
    x = x.astype(np.float64)
    n = len(y)

    def f(theta):
        w, b = theta[:DIM * K].reshape(DIM, K), theta[DIM * K:]
        z = x @ w + b
        z -= z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        loss = (lse - z[np.arange(n), y]).mean() + 0.5 * l2 * np.sum(w * w)
        g = np.exp(z - lse[:, None])
        g[np.arange(n), y] -= 1
        g /= n
        return loss, np.concatenate([(x.T @ g + l2 * w).ravel(), g.sum(axis=0)])

    r = scipy.optimize.minimize(f, np.zeros(DIM * K + K), jac=True, method="L-BFGS-B",
                                options=dict(maxiter=5000, gtol=1e-12, ftol=1e-15))
    return r.x[:DIM * K].reshape(DIM, K), r.x[DIM * K:], r.fun


def test_optimum_matches_scipy():
    x, y, xt, yt = _overlapping_classes()
    l2 = 1e-2
    params, info = linear_probe.fit_logistic_regression(x, y, num_classes=K, l2=l2,
                                                        max_iters=500, tol=1e-6)
    w, b, loss = _scipy_fit(x, y, l2)
    np.testing.assert_allclose(float(info["loss"]), loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(params["w"]), w, atol=1e-4)
    np.testing.assert_allclose(np.asarray(params["b"]), b, atol=1e-4)
    # The accuracies linear_probe reports are those of the scipy solution.
    res = linear_probe.linear_probe(x, y, xt, yt, l2=l2, max_iters=500, tol=1e-6,
                                    standardize=False)
    np.testing.assert_allclose(res["train_top1"], np.mean(np.argmax(x @ w + b, 1) == y))
    np.testing.assert_allclose(res["test_top1"], np.mean(np.argmax(xt @ w + b, 1) == yt))
    assert 0.5 < res["test_top1"] < 0.95  # a genuinely noisy problem


def test_separable_features_known_accuracy():
    # Class c lights up dimension c (+ small noise): separable. The first 10% of test
    # labels are deliberately wrong, so test top-1 must be exactly 0.9.
    rng = np.random.default_rng(1)
    y = np.arange(N_TRAIN + N_TEST) % K
    x = 0.1 * rng.normal(size=(len(y), DIM)).astype(np.float32)
    x[np.arange(len(y)), y] += 1.0
    yt = y[N_TRAIN:].copy()
    yt[:N_TEST // 10] = (yt[:N_TEST // 10] + 1) % K
    res = linear_probe.linear_probe(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], yt,
                                    l2=1e-3, max_iters=500, tol=1e-6)
    assert res["train_top1"] == 1.0
    np.testing.assert_allclose(res["test_top1"], 0.9)


def test_matches_sklearn_when_installed():
    sklearn_lm = pytest.importorskip("sklearn.linear_model")
    x, y, xt, yt = _overlapping_classes(seed=2)
    l2 = 1e-2
    # sklearn minimises C * sum CE + |W|^2 / 2  ==  (C n) * (mean CE + l2 |W|^2 / 2).
    clf = sklearn_lm.LogisticRegression(C=1.0 / (l2 * N_TRAIN), tol=1e-10, max_iter=5000)
    clf.fit(x.astype(np.float64), y)
    res = linear_probe.linear_probe(x, y, xt, yt, l2=l2, max_iters=500, tol=1e-6,
                                    standardize=False)
    np.testing.assert_allclose(res["train_top1"], clf.score(x, y))
    np.testing.assert_allclose(res["test_top1"], clf.score(xt, yt))


def test_too_few_classes_is_a_user_error():
    x, y, xt, yt = _overlapping_classes()
    with pytest.raises(Ov3Error, match="num_classes"):
        linear_probe.linear_probe(x, y, xt, yt, num_classes=3)
