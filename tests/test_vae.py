"""ov3's Flax AutoencoderKL against diffusers' torch AutoencoderKL (CPU, tiny configs, fp32)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from ov3.errors import Ov3Error
from ov3.models import vae as V
from ov3.models import vae_weights as W

TOL = 1e-5  # fp32 max abs error allowed against diffusers

# FLUX-like: 16 latent channels, no quant convs, 32 groups (what a FLUX single file implies).
FLUX_TINY = dict(
    block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=16,
    norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=0.3611, shift_factor=0.1159,
)
# SD-like: 4 latent channels, quant convs, three levels (two downsamples), no shift.
SD_TINY = dict(
    block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=4,
    norm_num_groups=8, scaling_factor=0.18215,
)


def _torch_vae(config: dict, seed: int = 0) -> TorchAutoencoderKL:
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**config).eval()
    with torch.no_grad():  # GroupNorms start at (1, 0); randomise them so a swap would show
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module", params=["flux", "sd"])
def saved(request, tmp_path_factory):
    """(config dict, torch model, diffusers folder written by diffusers' save_pretrained)."""
    config = FLUX_TINY if request.param == "flux" else SD_TINY
    model = _torch_vae(config)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return config, model, folder


def test_encode_decode_parity(saved):
    config, model, folder = saved
    vae = W.from_pretrained(folder)
    assert vae.config == V.VAEConfig.from_dict(config)
    sf, shift = config["scaling_factor"], config.get("shift_factor") or 0.0
    rng = np.random.RandomState(0)
    images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)

    # One compile each for encoder and decoder: normalisation is checked as plain arithmetic.
    mean, logvar = jax.jit(vae.posterior)(vae.params, images)
    with torch.no_grad():
        post = model.encode(_nchw(images)).latent_dist
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    assert mean.shape == (2, 16 // factor, 24 // factor, config["latent_channels"])
    assert _maxdiff(mean, _nhwc(post.mean)) <= TOL
    assert _maxdiff(logvar, _nhwc(post.logvar)) <= TOL
    assert _maxdiff(vae.normalize(mean), _nhwc(post.mean) * sf) <= TOL  # "scale": no shift

    z = rng.randn(*mean.shape).astype(np.float32)
    images_out = vae.decode(z)  # the jitted convenience path: decode_fn with vae.params
    with torch.no_grad():
        want = _nhwc(model.decode(_nchw(z / sf)).sample)
    assert images_out.shape == (2, 16, 24, 3)
    assert _maxdiff(images_out, want) <= TOL
    print(f"\nVAE {config['latent_channels']}-channel vs diffusers: posterior mean {_maxdiff(mean, _nhwc(post.mean)):.1e}, "
          f"logvar {_maxdiff(logvar, _nhwc(post.logvar)):.1e}, decode {_maxdiff(images_out, want):.1e} (max abs)")

    # "scale_shift" is diffusers' FLUX pipeline: (mean - shift) * scale, and its inverse.
    vs = V.VAE(vae.module, vae.params, vae.config, latent_norm="scale_shift")
    assert _maxdiff(vs.normalize(mean), (_nhwc(post.mean) - shift) * sf) <= TOL
    np.testing.assert_allclose(vs.denormalize(z), z / sf + shift, rtol=1e-6)


def test_flux_single_file_layout(tmp_path):
    model = _torch_vae(FLUX_TINY, seed=1)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    flux = W.state_dict_to_flux(state, num_levels=2)

    # Names as in black-forest-labs/flux src/flux/modules/autoencoder.py (decoder `up` indexed
    # from the highest resolution; attention as 1x1 convs).
    assert flux["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert flux["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    for key in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.block_2.conv1.bias",
                "encoder.norm_out.weight", "decoder.up.1.upsample.conv.weight",
                "decoder.up.0.block.1.conv2.weight", "decoder.up.0.block.0.nin_shortcut.weight",
                "decoder.norm_out.bias", "decoder.mid.attn_1.norm.weight"):
        assert key in flux, key
    assert flux["decoder.up.0.block.0.conv1.weight"].shape == (32, 64, 3, 3)  # 64 -> 32 ch
    assert not any("up.0.upsample" in k for k in flux)
    # diffusers' own LDM/FLUX converter maps our FLUX layout back to the same state dict.
    back = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in flux.items()},
                                      dict(model.config))
    assert set(back) == set(state)
    for k, v in back.items():
        np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)

    path = tmp_path / "ae.safetensors"
    W.write_safetensors(flux, path)
    model.save_pretrained(tmp_path / "diffusers")
    from_flux, from_diffusers = W.from_pretrained(path), W.from_pretrained(tmp_path / "diffusers")
    assert from_flux.config == from_diffusers.config
    same = jax.tree.map(lambda a, b: bool((a == b).all()), from_flux.params, from_diffusers.params)
    assert all(jax.tree.leaves(same))
    # A folder holding ae.safetensors loads too (as in the FLUX.1-dev repository).
    assert W.from_pretrained(tmp_path).config == from_flux.config

    # The jitted `encode` of the file-loaded VAE: posterior mean x scaling_factor.
    images = np.random.RandomState(5).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        want = _nhwc(model.encode(_nchw(images)).latent_dist.mean) * FLUX_TINY["scaling_factor"]
    assert _maxdiff(from_flux.encode(images), want) <= TOL
    print(f"\nVAE from FLUX's ae.safetensors layout: encode max abs error {_maxdiff(from_flux.encode(images), want):.1e}")


def test_real_configs_match_diffusers_shapes():
    """Every tensor of FLUX.1-dev, SD-1.x/SDXL and SD3 VAEs, checked on torch's meta device."""
    sd = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
              scaling_factor=0.13025, sample_size=1024, force_upcast=True)
    sd3 = dict(sd, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=1.5305, shift_factor=0.0609)
    for raw in (V.FLUX1_DEV_CONFIG, sd, sd3):
        config = V.VAEConfig.from_dict(raw)
        with torch.device("meta"):
            model = TorchAutoencoderKL(**{k: v for k, v in raw.items() if k != "_class_name"})
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert W.expected_state_shapes(config) == want
    # A FLUX single file implies exactly the FLUX.1-dev config.
    flux = V.VAEConfig.from_dict(V.FLUX1_DEV_CONFIG)
    shapes = {W.diffusers_to_flux_key(k, 4): W._flux_shape(W.diffusers_to_flux_key(k, 4), s)
              for k, s in W.expected_state_shapes(flux).items()}
    assert W._infer_flux_config(shapes, "ae.safetensors") == flux
    assert sum(int(np.prod(s)) for s in shapes.values()) == 83_819_683


def test_decoder_gradient_matches_torch():
    model = _torch_vae(FLUX_TINY, seed=2)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    config = V.VAEConfig.from_dict(FLUX_TINY)
    params = W.state_dict_to_params(sd, config, "test")
    rng = np.random.RandomState(3)
    latents = rng.randn(1, 8, 8, 16).astype(np.float32)
    weights = rng.randn(1, 16, 16, 3).astype(np.float32)

    zt = torch.from_numpy(latents).requires_grad_(True)
    out = model.decode(zt.permute(0, 3, 1, 2) / config.scaling_factor).sample
    (out * _nchw(weights)).sum().backward()
    want = zt.grad.numpy()

    for remat in (False, True):
        vae = V.VAE(V.AutoencoderKL(config, remat_decoder=remat), params, config)
        loss = lambda lat: (vae.decode_fn(params, lat) * weights).sum()  # noqa: E731
        got = jax.jit(jax.grad(loss))(latents)
        assert _maxdiff(got, want) <= TOL * max(1.0, float(np.abs(want).max())), remat
        assert float(np.abs(want).max()) > 1e-3
        print(f"\nVAE decoder gradient vs torch autograd (remat={remat}): max abs error {_maxdiff(got, want):.1e} "
              f"(largest |grad| {float(np.abs(want).max()):.2f})")


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_matches_torch_float64(silu):
    """ov3's GroupNorm (+ SiLU) and its gradients against torch autograd in float64, on
    activations centred at 0 and at 300 (|mean| >> std), where a one-pass E[x^2] - E[x]^2 cancels."""
    rng = np.random.RandomState(8)
    scale, bias = rng.randn(16).astype(np.float32), rng.randn(16).astype(np.float32)
    for centre in (0.0, 300.0):
        x = (rng.randn(2, 6, 5, 16) * 2 + centre).astype(np.float32)
        cot = rng.randn(*x.shape).astype(np.float32)
        f = lambda x, s, b: (V.group_norm(x, s, b, 4, silu) * cot).sum()  # noqa: E731
        got = [V.group_norm(x, scale, bias, 4, silu), *jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)]

        xt, st, bt = (torch.from_numpy(a).double().requires_grad_(True) for a in (x, scale, bias))
        yt = torch.nn.functional.group_norm(xt.permute(0, 3, 1, 2), 4, st, bt, 1e-6)
        yt = torch.nn.functional.silu(yt) if silu else yt
        (yt * _nchw(cot).double()).sum().backward()
        want = [_nhwc(yt), xt.grad.numpy(), st.grad.numpy(), bt.grad.numpy()]
        errors = [_maxdiff(g, w) / max(1.0, float(np.abs(w).max())) for g, w in zip(got, want)]
        print(f"\nGroupNorm(silu={silu}) centred at {centre:g} vs torch float64: relative max error of output, "
              f"d/dx, d/dscale, d/dbias: {', '.join(f'{e:.1e}' for e in errors)}")
        assert max(errors) <= (1e-6 if centre == 0 else 3e-5), errors

    # bf16 compute: output and input gradient stay bf16.
    xb = jnp.asarray(x, jnp.bfloat16)
    assert V.group_norm(xb, scale, bias, 4, silu).dtype == jnp.bfloat16
    assert jax.grad(lambda x: V.group_norm(x, scale, bias, 4, silu).astype(jnp.float32).sum())(xb).dtype == jnp.bfloat16


def test_save_pretrained_loads_in_diffusers(tmp_path):
    vae = V.init_random(SD_TINY, seed=0)
    W.save_pretrained(vae, tmp_path / "demo")
    model = TorchAutoencoderKL.from_pretrained(tmp_path / "demo").eval()
    assert list(model.config.block_out_channels) == SD_TINY["block_out_channels"]
    z = np.random.RandomState(4).randn(1, 4, 4, 4).astype(np.float32)
    with torch.no_grad():
        want = _nhwc(model.decode(_nchw(z / vae.config.scaling_factor)).sample)
    assert _maxdiff(vae.decode(z), want) <= TOL
    again = W.from_pretrained(tmp_path / "demo")
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()),
                                            vae.params, again.params)))


def test_bf16_file_subfolder_and_bf16_compute(tmp_path):
    # FLUX.1-dev's diffusers weights are stored in bf16; ov3 reads them without torch, as fp32.
    model = _torch_vae(FLUX_TINY).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "repo" / "vae")  # the FLUX.1-dev repository's layout
    vae = W.from_pretrained(tmp_path / "repo", dtype=jnp.bfloat16)
    want = model.state_dict()["decoder.conv_in.weight"].float().numpy().transpose(2, 3, 1, 0)
    got = vae.params["decoder"]["conv_in"]["kernel"]
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)

    # bf16 compute (params stay fp32) against the same weights run in fp32 torch: loose.
    z = np.random.RandomState(6).randn(1, 8, 8, 16).astype(np.float32)
    with torch.no_grad():
        ref = _nhwc(model.float().decode(_nchw(z / FLUX_TINY["scaling_factor"])).sample)
    out = vae.decode(z)
    assert out.dtype == jnp.float32
    assert _maxdiff(out, ref) <= 0.05 * float(np.abs(ref).max())


def _write_folder(folder, config, state):
    folder.mkdir(parents=True, exist_ok=True)
    config = V.VAEConfig.from_dict(config).to_diffusers_dict()
    (folder / "config.json").write_text(json.dumps(config))
    W.write_safetensors(state, folder / W.WEIGHTS_NAME)


def test_bad_checkpoints_raise_ov3error(tmp_path):
    config = V.VAEConfig.from_dict(SD_TINY)
    good = {k: np.zeros(s, np.float32) for k, s in W.expected_state_shapes(config).items()}

    bad = dict(good)
    del bad["decoder.conv_out.bias"]
    bad["encoder.extra.weight"] = np.zeros(3, np.float32)
    bad["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    _write_folder(tmp_path / "bad", SD_TINY, bad)
    with pytest.raises(Ov3Error) as e:
        W.from_pretrained(tmp_path / "bad")
    msg = str(e.value)
    assert W.WEIGHTS_NAME in msg and "decoder.conv_out.bias" in msg
    assert "encoder.extra.weight" in msg and "quant_conv.weight" in msg and "[8, 8, 3, 3]" in msg

    # FLUX layout: problems are named with FLUX's own key names.
    flux_state = W.state_dict_to_flux(
        {k: np.zeros(s, np.float32)
         for k, s in W.expected_state_shapes(V.VAEConfig.from_dict(FLUX_TINY)).items()}, 2)
    del flux_state["decoder.up.1.upsample.conv.bias"]
    W.write_safetensors(flux_state, tmp_path / "ae.safetensors")
    with pytest.raises(Ov3Error, match=r"ae\.safetensors.*decoder\.up\.1\.upsample\.conv\.bias"):
        W.from_pretrained(tmp_path / "ae.safetensors")

    with pytest.raises(Ov3Error, match=r"nowhere.*does not exist.*huggingface-cli"):
        W.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(Ov3Error, match=r"noweights/diffusion_pytorch_model\.safetensors is miss"):
        W.from_pretrained(tmp_path / "noweights")
    with pytest.raises(Ov3Error, match=r"not a valid \.safetensors"):
        (tmp_path / "junk.safetensors").write_bytes(b"\x01")
        W.from_pretrained(tmp_path / "junk.safetensors")


def test_bad_configs_raise_ov3error():
    with pytest.raises(Ov3Error, match="unknown or unsupported key.*'bogus'"):
        V.VAEConfig.from_dict(dict(SD_TINY, bogus=1))
    with pytest.raises(Ov3Error, match="down_block_types"):
        V.VAEConfig.from_dict(dict(SD_TINY, down_block_types=["AttnDownEncoderBlock2D"] * 3))
    with pytest.raises(Ov3Error, match="act_fn"):
        V.VAEConfig.from_dict(dict(SD_TINY, act_fn="gelu"))
    with pytest.raises(Ov3Error, match="norm_num_groups"):
        V.VAEConfig.from_dict(dict(SD_TINY, norm_num_groups=12))
    with pytest.raises(Ov3Error, match="_class_name"):
        V.VAEConfig.from_dict(dict(SD_TINY, _class_name="AutoencoderTiny"))
    with pytest.raises(Ov3Error, match="latent_norm"):
        V.init_random(SD_TINY, latent_norm="shift")


def test_deprecated_attention_names_load(tmp_path):
    # Many SD-1.x diffusers files predate the to_q/to_k/to_v/to_out.0 names; diffusers renames
    # query/key/value/proj_attn on load, and so does ov3.
    config = V.VAEConfig.from_dict(SD_TINY)
    rng = np.random.RandomState(7)
    state = {k: rng.randn(*s).astype(np.float32)
             for k, s in W.expected_state_shapes(config).items()}
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.").replace(".to_out.0.", ".proj_attn."): v
           for k, v in state.items()}
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    _write_folder(tmp_path / "old", SD_TINY, old)
    loaded = W.params_to_state_dict(W.from_pretrained(tmp_path / "old").params)
    assert set(loaded) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)
