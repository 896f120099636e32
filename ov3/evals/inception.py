"""The FID Inception-v3 (pytorch-fid's network) in Flax, for FID / rFID features.

pytorch-fid patches torchvision's Inception3 to reproduce the TensorFlow graph the
FID paper used (inception-2015-12-05): Mixed_5b-5d, 6b-6e and 7b average-pool
without counting the zero padding, and Mixed_7c max-pools in its pool branch. The
feature is the 2048-d global average of Mixed_7c ("pool3"). Module names follow
torchvision exactly, so the weights load from pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` by renaming keys only.

Layout is NHWC. Convolutions run at HIGHEST precision: on TPU/GPU the default
float32 convolution uses bf16/TF32 passes, which moves FID in the reported digits.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ov3 import paths
from ov3.errors import Ov3Error

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                   "fid_weights/" + FID_WEIGHTS_FILE)
FEATURE_DIM = 2048
INPUT_SIZE = 299
_BN_EPS = 1e-3  # torchvision BasicConv2d: BatchNorm2d(eps=0.001)

Pair = tuple[int, int]


def _pair(v: int | Pair) -> Pair:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics) -> ReLU."""

    features: int
    kernel: int | Pair
    stride: int = 1
    padding: int | Pair = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False,
                    precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool divides by the number of real (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (torchvision's Mixed_6a, unpatched)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (torchvision's Mixed_7a, unpatched)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """`max_pool=False`: pytorch-fid's FIDInceptionE_1; True: FIDInceptionE_2."""

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:  # the TF graph's Mixed_7c pools with max, not average
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """NHWC bilinear resize like torch `F.interpolate(mode='bilinear',
    align_corners=False)`: half-pixel centres and no antialiasing (jax's default
    antialias=True would blur when downsampling, unlike pytorch-fid)."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, size, size, c), method="bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
    """Images `[B, H, W, 3]` in [0, 1] (pytorch-fid's convention) -> pool3 `[B, 2048]`."""

    resize_input: bool = True
    normalize_input: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x)
        if self.normalize_input:
            x = 2.0 * x - 1.0  # the TF graph expects [-1, 1]
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


# ------------------------------------------------------------------------ weights

# torch state-dict leaf -> (flax collection, flax leaf, how to convert the array).
_LEAF_MAP: dict[str, tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = {
    "conv.weight": ("params", "kernel", lambda w: w.transpose(2, 3, 1, 0)),  # OIHW->HWIO
    "bn.weight": ("params", "scale", lambda w: w),
    "bn.bias": ("params", "bias", lambda w: w),
    "bn.running_mean": ("batch_stats", "mean", lambda w: w),
    "bn.running_var": ("batch_stats", "var", lambda w: w),
}


@functools.lru_cache(maxsize=1)
def _expected_variables() -> Any:
    """Shapes of every variable the network needs (tracing it takes seconds on CPU)."""
    return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))


def variables_from_state_dict(state_dict: Mapping[str, Any],
                              source: str = "state dict") -> dict[str, Any]:
    """Maps a pytorch-fid / torchvision Inception3 state dict to Flax variables.

    The classifier (`fc.*`), `AuxLogits.*` and `num_batches_tracked` are not needed
    for pool3 features and are ignored. Every variable the Flax network needs must be
    present with the right shape; otherwise Ov3Error names `source` and the key.
    """
    fc = state_dict.get("fc.weight")
    if fc is not None and tuple(fc.shape)[0] != 1008:
        # torchvision's ImageNet Inception (1000 classes) has the same conv shapes but
        # other weights: it would load and silently give FIDs nobody can compare to.
        raise Ov3Error(f"{source} has a {tuple(fc.shape)[0]}-class classifier; the FID "
                       f"network has 1008 (TF's graph). Use {FID_WEIGHTS_FILE} from "
                       f"{FID_WEIGHTS_URL}, not torchvision's inception_v3 weights.")
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, value in state_dict.items():
        leaf = next((l for l in _LEAF_MAP if key.endswith("." + l)), None)
        if leaf is None or key.startswith(("fc.", "AuxLogits.")):
            continue
        collection, name, convert = _LEAF_MAP[leaf]
        node = variables[collection]
        for part in key[: -len(leaf) - 1].split(".") + leaf.split(".")[:1]:
            node = node.setdefault(part, {})
        arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        node[name] = jnp.asarray(convert(arr.astype(np.float32)))

    expected = _expected_variables()
    def name(path) -> str:
        return "/".join(str(k.key) for k in path)

    want = {name(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {name(p): v for p, v in jax.tree_util.tree_leaves_with_path(variables)}
    missing = sorted(set(want) - set(got))
    if missing:
        raise Ov3Error(f"{source} is not pytorch-fid's Inception-v3: {len(missing)} "
                       f"variables missing, e.g. {missing[:3]}. Use the file "
                       f"{FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL}.")
    bad = [k for k in want if got[k].shape != want[k]]
    if bad:
        raise Ov3Error(f"{source}: wrong shape for {bad[0]}: {got[bad[0]].shape}, "
                       f"expected {want[bad[0]]}. Use {FID_WEIGHTS_FILE} from "
                       f"{FID_WEIGHTS_URL}.")
    # Rebuild in the network's own tree structure, dropping anything it does not use.
    return jax.tree_util.tree_map_with_path(lambda p, _: got[name(p)], expected)


def load_fid_inception(path: str) -> dict[str, Any]:
    """Loads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` as Flax variables.

    The file is a torch pickle, so reading it needs torch (CPU build is enough); a
    `.npz` holding the same state-dict keys is read with numpy alone.
    """
    if not paths.path(path).is_file():
        raise Ov3Error(f"FID Inception weights not found at '{path}'. Download "
                       f"{FID_WEIGHTS_FILE} (pytorch-fid's port of TF inception-2015-12-05) "
                       f"from {FID_WEIGHTS_URL} and point the evaluator's inception path "
                       f"at it; nothing is downloaded at run time.")
    if path.endswith(".npz"):
        with np.load(paths.readable(path)) as f:
            return variables_from_state_dict(dict(f), source=path)
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise Ov3Error(f"reading '{path}' needs torch (the CPU wheel is enough), or "
                       "convert it once to a .npz of the same state-dict keys.") from e
    try:
        state_dict = torch.load(paths.readable(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download or an HTML error page
        raise Ov3Error(f"could not read '{path}' as a torch state dict ({e}); download "
                       f"it again from {FID_WEIGHTS_URL}.") from e
    return variables_from_state_dict(state_dict, source=path)


def make_feature_fn(variables: Mapping[str, Any]) -> Callable[[jax.Array], jax.Array]:
    """Jitted `images [B, H, W, 3] in [0, 1] -> pool3 features [B, 2048] float32`."""
    # Weights go in as an argument, not a closure: closed-over arrays would be baked
    # into the executable as ~95 MB of constants.
    apply = jax.jit(FIDInceptionV3().apply)
    return lambda images: apply(variables, images)
