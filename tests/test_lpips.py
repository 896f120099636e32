"""LPIPS-VGG parity against the real `lpips` package (its own network code and v0.1 heads).

The VGG16 trunk is random (torchvision's init, via tests/torchvision_shim.py) because the
ImageNet file cannot be downloaded here; the heads are lpips' shipped vgg.pth.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest
import torch

from ov3.errors import Ov3Error
from ov3.models.lpips import _inverse_norm, load_lpips, lpips_fn, save_lpips
from tests import torchvision_shim


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch LPIPS, path of its trunk saved as a torchvision-style VGG16 state dict)."""
    with torchvision_shim.installed():
        import lpips

        torch.manual_seed(0)
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    # lpips' slices hold torchvision's `features` modules under their original indices.
    state = {}
    for k in range(1, 6):
        for name, layer in getattr(model.net, f"slice{k}").named_children():
            if isinstance(layer, torch.nn.Conv2d):
                state[f"features.{name}.weight"] = layer.weight.detach().clone()
                state[f"features.{name}.bias"] = layer.bias.detach().clone()
    state["classifier.0.weight"] = torch.zeros(4, 4)  # the real file has a classifier too
    path = tmp_path_factory.mktemp("lpips") / "vgg16-397923af.pth"
    torch.save(state, path)
    return model, path


def _images(seed, shape=(2, 32, 32, 3)):
    rng = np.random.RandomState(seed)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    y = np.clip(x + 0.3 * rng.randn(*shape), -1, 1).astype(np.float32)
    return x, y


def _nchw(a):
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def test_parity(reference):
    model, vgg_path = reference
    _, params = load_lpips(vgg_path)  # heads from the installed lpips package
    x, y = _images(0)
    got = np.asarray(jax.jit(lpips_fn)(params, x, y))
    with torch.no_grad():
        want = model(_nchw(x), _nchw(y)).flatten().numpy()
    assert got.shape == (2,)
    assert np.abs(got - want).max() <= 1e-4, (got, want)
    assert want.min() > 1e-2  # a real signal, not two zeros
    print(f"\nLPIPS vs the lpips package: {got} vs {want}, max abs error {np.abs(got - want).max():.1e}")


def test_zero_feature_gradient_is_finite():
    # ReLU can zero every channel of a pixel; lpips' ||f|| then has no gradient (NaN in JAX).
    # A full-network gradient check costs ~20 s of XLA compile on CPU, so test the guard alone.
    f = np.zeros((1, 2, 2, 4), np.float32)
    f[0, 0, 0] = [1.0, 2.0, 0.0, 2.0]
    def unit(a):
        return a * _inverse_norm(a)
    out = unit(jax.numpy.asarray(f))
    np.testing.assert_allclose(np.asarray(out)[0, 0, 0], [1 / 3, 2 / 3, 0, 2 / 3], atol=1e-7)
    g = jax.grad(lambda a: (unit(a) ** 2).sum())(jax.numpy.asarray(f))
    assert np.isfinite(np.asarray(g)).all()


def test_safetensors_roundtrip_needs_no_torch(reference, tmp_path, monkeypatch):
    _, vgg_path = reference
    _, params = load_lpips(vgg_path)
    out = tmp_path / "lpips_vgg.safetensors"
    save_lpips(params, out)
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    _, again = load_lpips(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors_name_the_file_or_key(reference, tmp_path):
    _, vgg_path = reference
    with pytest.raises(Ov3Error, match=r"vgg16-397923af\.pth does not exist.*download\.pytorch"):
        load_lpips(tmp_path / "vgg16-397923af.pth")
    with pytest.raises(Ov3Error, match=r"heads\.pth does not exist"):
        load_lpips(vgg_path, heads_path=tmp_path / "heads.pth")

    state = torch.load(vgg_path, weights_only=True)
    del state["features.28.bias"]
    state["features.2.weight"] = state["features.2.weight"][:, :32]
    state["features.99.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(Ov3Error) as e:
        load_lpips(bad)
    msg = str(e.value)
    assert "features.28.bias" in msg and "features.2.weight" in msg and "features.99.weight" in msg


def test_bfloat16_trunk_stays_within_2_percent_of_the_lpips_package(reference):
    """model.dtype="bfloat16" runs the VGG trunk in bf16 (heads, normalisation, distance fp32)."""
    model, vgg_path = reference
    _, params = load_lpips(vgg_path)
    x, y = _images(1, (2, 64, 64, 3))
    got = np.asarray(jax.jit(lpips_fn, static_argnames="dtype")(params, x, y, dtype=jax.numpy.bfloat16))
    with torch.no_grad():
        want = model(_nchw(x), _nchw(y)).flatten().numpy()
    print(f"\nLPIPS with a bf16 trunk vs the lpips package (fp32): {got} vs {want}, "
          f"relative {np.abs(got / want - 1).max():.1e}")
    assert np.abs(got / want - 1).max() < 0.02
