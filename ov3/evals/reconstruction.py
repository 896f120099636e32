"""`reconstruction`: PSNR, SSIM (+ LPIPS, + rFID) of held-out images through the model.

    config.evals.recon = dict(type="reconstruction", every=1000)
    config.evals.vae = dict(type="reconstruction", vae_only=True)   # the VAE's upper bound

Images go image -> VAE -> encoder -> decoder -> VAE decoder without the training noise
(`vae_only`: image -> VAE -> VAE decoder). LPIPS runs when VGG16 weights are configured
(`lpips_path`, else `config.lpips.vgg_path`); rFID when pytorch-fid's Inception weights
are (`inception_path`). The paper's numbers (ImageNet val, 256 px) sit beside ours in
`python -m ov3.evaluate`'s table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ov3 import sharding
from ov3.data import pipeline
from ov3.errors import Ov3Error
from ov3.evals import inception
from ov3.evals import metrics as metrics_lib
from ov3.evals.base import Context, Evaluator, register


def inception_features(variables: Any, images01: jax.Array) -> jax.Array:
    """pool3 features of images in [0, 1]; module-level so tests can swap in a cheap stand-in."""
    return inception.FIDInceptionV3().apply(variables, images01)


def _to_uint8_values(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> the 0..255 integers a saved PNG would hold (as float32)."""
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5)


@register("reconstruction")
class Reconstruction(Evaluator):
    KEYS = {
        "vae_only": False,       # VAE encode -> decode only: the upper bound of any encoder
        "quantize": True,        # score uint8-rounded images, as saved PNGs (the usual protocol)
        "lpips_path": "",        # VGG16 weights for LPIPS; "": config.lpips.vgg_path; none: no LPIPS
        "inception_path": "",    # pytorch-fid's pt_inception-2015-12-05-6726825d.pth: adds rFID
    }

    def __init__(self, name: str, spec: dict[str, Any], ctx: Context):
        super().__init__(name, spec, ctx)
        aux: dict[str, Any] = {}
        vgg = spec["lpips_path"] or ctx.cfg.lpips.vgg_path
        if vgg:
            from ov3.models import lpips as lpips_lib
            source = self.key("lpips_path") if spec["lpips_path"] else "config.lpips.vgg_path"
            try:
                _, aux["lpips"] = lpips_lib.load_lpips(vgg, ctx.cfg.lpips.heads_path or None)
            except Ov3Error as e:
                raise Ov3Error(f"{source}: {e}") from None
        if spec["inception_path"]:
            try:
                aux["inception"] = inception.load_fid_inception(spec["inception_path"])
            except Ov3Error as e:
                raise Ov3Error(f"{self.key('inception_path')}: {e}") from None
        # Frozen helper networks: replicated once, passed as arguments (not baked into the
        # executable as constants).
        self.aux = jax.device_put(aux, sharding.replicated(ctx.mesh))
        recon = ctx.fns.vae_reconstruct if spec["vae_only"] else ctx.fns.reconstruct
        quantize = bool(spec["quantize"])

        def predict(params, frozen, batch, aux):
            x = pipeline.image_to_float(batch["image"])
            y = recon(params, frozen, x).astype(jnp.float32)
            if quantize:
                x, y = _to_uint8_values(x), _to_uint8_values(y)
                out = {"psnr": metrics_lib.psnr(x, y, 255.0), "ssim": metrics_lib.ssim(x, y, 255.0)}
                x, y = x / 127.5 - 1.0, y / 127.5 - 1.0
            else:
                y = jnp.clip(y, -1.0, 1.0)
                out = {"psnr": metrics_lib.psnr(x, y, 2.0), "ssim": metrics_lib.ssim(x, y, 2.0)}
            if "lpips" in aux:
                from ov3.models import lpips as lpips_lib
                out["lpips"] = lpips_lib.lpips_fn(aux["lpips"], x, y)
            if "inception" in aux:
                out["inception_real"] = inception_features(aux["inception"], (x + 1.0) / 2.0)
                out["inception_recon"] = inception_features(aux["inception"], (y + 1.0) / 2.0)
            return out

        self.predict = self.jit_predict(predict)

    def run(self, params: Any, frozen: Any) -> dict[str, float]:
        sums: dict[str, float] = {}
        count = 0
        stats = {k: metrics_lib.FeatureStats(inception.FEATURE_DIM) for k in ("real", "recon")}
        for out in self.batches(self.predict, params, frozen, self.aux):
            count += len(out["psnr"])
            for k in ("psnr", "ssim", "lpips"):
                if k in out:
                    sums[k] = sums.get(k, 0.0) + float(out[k].astype(np.float64).sum())
            if "inception_real" in out:
                stats["real"].update(out["inception_real"])
                stats["recon"].update(out["inception_recon"])
        if not count:
            raise Ov3Error(f"{self.key('split')}: split {self.split!r} yielded no usable image.")
        result = {k: v / count for k, v in sums.items()}
        if "inception" in self.aux:
            if count < 2:
                raise Ov3Error(f"{self.key('max_examples')}: rFID needs at least 2 images, got {count}.")
            result["rfid"] = metrics_lib.fid_from_stats(stats["real"], stats["recon"])
        result["num_images"] = float(count)
        return result
