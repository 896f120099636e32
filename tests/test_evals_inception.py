"""FID Inception-v3 in Flax vs a PyTorch reference with the same random weights.

torchvision cannot be installed here, so this file carries a minimal stand-in for the
parts of `torchvision.models.inception` that pytorch-fid builds on (BasicConv2d,
InceptionA-E, Inception3 with torchvision's layer names, so state-dict keys are the
ones in pytorch-fid's .pth), plus pytorch-fid's FID patches written as torch
subclasses. When the real `pytorch_fid` package is importable, its own InceptionV3
is also built on the stand-in and compared.
"""

import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from ov3.errors import Ov3Error  # noqa: E402
from ov3.evals import inception  # noqa: E402


# ------------------------------------------------- torchvision stand-in (reference)


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def pool(self, x):
        return F.avg_pool2d(x, 3, stride=1, padding=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(self.pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def pool(self, x):
        return F.avg_pool2d(x, 3, stride=1, padding=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(self.pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def pool(self, x):
        return F.avg_pool2d(x, 3, stride=1, padding=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))], 1)


class Inception3(nn.Module):
    def __init__(self, num_classes=1008, aux_logits=False, init_weights=False, **_):
        super().__init__()
        del aux_logits, init_weights  # the stand-in never builds AuxLogits
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.fc = nn.Linear(2048, num_classes)


# pytorch-fid's patches: TF average pools ignore padding; Mixed_7c max-pools.
def _tf_avg_pool(self, x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    pool = _tf_avg_pool


class FIDInceptionC(InceptionC):
    pool = _tf_avg_pool


class FIDInceptionE_1(InceptionE):
    pool = _tf_avg_pool


class FIDInceptionE_2(InceptionE):
    def pool(self, x):
        return F.max_pool2d(x, 3, stride=1, padding=1)


def _reference_net() -> Inception3:
    """pytorch-fid's fid_inception_v3() on the stand-in, with random weights."""
    net = Inception3(num_classes=1008)
    net.Mixed_5b = FIDInceptionA(192, 32)
    net.Mixed_5c = FIDInceptionA(256, 64)
    net.Mixed_5d = FIDInceptionA(288, 64)
    net.Mixed_6b = FIDInceptionC(768, 128)
    net.Mixed_6c = FIDInceptionC(768, 160)
    net.Mixed_6d = FIDInceptionC(768, 160)
    net.Mixed_6e = FIDInceptionC(768, 192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    _randomize(net)
    return net.eval()


def _randomize(net: nn.Module, seed: int = 0) -> None:
    """He-normal convs and non-trivial BN statistics, so activations stay O(1) deep
    into the net and every BN term (mean, var, scale, shift) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


def _reference_features(net: Inception3, images_nchw: "torch.Tensor") -> np.ndarray:
    """pytorch-fid's InceptionV3 forward for output block 3 (pool3)."""
    x = F.interpolate(images_nchw, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = getattr(net, name)(x)
    x = F.max_pool2d(x, 3, stride=2)
    x = net.Conv2d_4a_3x3(net.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, stride=2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                 "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
        x = getattr(net, name)(x)
    return F.adaptive_avg_pool2d(x, 1).flatten(1).numpy()


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def parity_case():
    """Random-weight reference, the Flax variables from its state dict, and a batch of
    two 32x32 images (upsampled to 299 inside both networks)."""
    net = _reference_net()
    images = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    with torch.no_grad():
        ref = _reference_features(net, torch.from_numpy(images.transpose(0, 3, 1, 2)))
    state = {k: v for k, v in net.state_dict().items()}
    return net, state, images, ref


def test_pool3_features_match_torch_reference(parity_case):
    _, state, images, ref = parity_case
    variables = inception.variables_from_state_dict(state)
    feats = np.asarray(inception.make_feature_fn(variables)(jnp.asarray(images)))
    assert feats.shape == (2, inception.FEATURE_DIM)
    assert np.abs(ref).mean() > 0.05  # the random net did not collapse to zeros
    np.testing.assert_allclose(feats, ref, atol=1e-4, rtol=1e-4)
    print(f"\nFID-Inception pool3 vs torch stand-in: max abs error {np.abs(feats - ref).max():.1e}")


def test_matches_real_pytorch_fid_when_installed(parity_case, monkeypatch):
    """Builds pytorch-fid's own InceptionV3 on the stand-in torchvision."""
    this = sys.modules[__name__]
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.21.0"
    tv.models = types.ModuleType("torchvision.models")
    tv.models.inception = this
    tv.models.inception_v3 = lambda **kw: Inception3(**kw)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv.models)
    monkeypatch.setitem(sys.modules, "torchvision.models.inception", this)
    monkeypatch.delitem(sys.modules, "pytorch_fid.inception", raising=False)
    pfid = pytest.importorskip("pytorch_fid.inception")
    net, state, images, ref = parity_case
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *a, **k: state)
    model = pfid.InceptionV3([3]).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))[0].flatten(1).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    # And ours against pytorch-fid's network directly (not only through the stand-in reference).
    feats = np.asarray(inception.make_feature_fn(inception.variables_from_state_dict(state))(jnp.asarray(images)))
    np.testing.assert_allclose(feats, out, atol=1e-4, rtol=1e-4)
    print(f"\nFID-Inception pool3 vs pytorch-fid's InceptionV3: max abs error {np.abs(feats - out).max():.1e}")


@pytest.mark.parametrize("size", [48, 331])
def test_resize_matches_torch_interpolate(size):
    x = np.random.default_rng(1).random((1, size, size + 5, 3), dtype=np.float32)
    got = np.asarray(inception.resize_bilinear(jnp.asarray(x)))
    want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299),
                         mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_missing_weights_file_names_file_and_source(tmp_path):
    with pytest.raises(Ov3Error, match="pt_inception-2015-12-05-6726825d.pth.*pytorch-fid"):
        inception.load_fid_inception(str(tmp_path / "nope.pth"))


def test_wrong_state_dict_is_a_user_error(parity_case, tmp_path):
    _, state, _, _ = parity_case
    partial = {k: v for k, v in state.items() if not k.startswith("Mixed_7c.")}
    with pytest.raises(Ov3Error, match="Mixed_7c"):
        inception.variables_from_state_dict(partial)
    imagenet_head = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
    with pytest.raises(Ov3Error, match="1008"):  # torchvision's weights, not FID's
        inception.variables_from_state_dict(imagenet_head)
    path = tmp_path / "inception.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("Conv2d_1a")}, path)
    with pytest.raises(Ov3Error, match=str(path)):
        inception.load_fid_inception(str(path))
