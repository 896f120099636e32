"""Shapes and parameter counts of every module (abstract init: no memory, no compute)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ov3.models import registry
from ov3.models.caption import prefix_lm_mask
from ov3.models.layers import sincos_2d
from ov3.models.ov3 import ModelSpec, OV3Model

VOCAB, TEXT_LEN, CAPTION_LEN = 32000, 80, 128


def abstract_params(encoder, decoder, text, image_size):
    spec = ModelSpec(encoder=encoder, decoder=decoder, text=text, vocab_size=VOCAB, text_len=TEXT_LEN,
                     caption_len=CAPTION_LEN, latent_channels=16, noise_tau=0.8)
    model = OV3Model(spec)
    g = image_size // 8
    args = (jnp.zeros((2, g, g, 16)), jnp.zeros((2, TEXT_LEN), jnp.int32), jnp.zeros((2, CAPTION_LEN), jnp.int32))
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init({"params": jax.random.key(0), "noise": jax.random.key(0)},
                                                              *args)["params"]))
    out = jax.eval_shape(lambda p: model.apply({"params": p}, *args, rngs={"noise": jax.random.key(0)}), params)
    return params, out


def count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def standard_openclip_vit(width, depth, mlp, patch, grid, embed):
    """open_clip VisionTransformer (pixel patches, ln_pre) parameter count."""
    block = (width * 3 * width + 3 * width) + (width * width + width) + 4 * width + (width * mlp + mlp) + (mlp * width + width)
    return depth * block + 3 * patch * patch * width + width + (grid * grid + 1) * width + 2 * width + 2 * width + width * embed


@pytest.mark.parametrize("name,image_size", [("B/2", 128), ("B/2", 256), ("L/2", 128), ("L/2", 256)])
def test_encoder_params_match_standard_vit(name, image_size):
    size, _ = registry.vit_size(name)
    embed = registry.embed_dim(name.split("/")[0])
    params, out = abstract_params(name, "B/1", "B", image_size)
    tokens = (image_size // 16) ** 2
    # Standard ViT (B/16: 86,192,640 with open_clip's 224 px head, L/14: 303,966,208) minus the
    # 3-channel pixel patch embedding and ln_pre, plus the 16-channel latent patch embedding.
    ref_patch, ref_grid = (16, 14) if name == "B/2" else (14, 16)
    standard = standard_openclip_vit(size.width, size.depth, size.mlp_dim, ref_patch, ref_grid, embed)
    if name == "B/2":
        assert standard == 86_192_640
    else:
        assert standard == 303_966_208
    expected = (standard - 3 * ref_patch ** 2 * size.width - 2 * size.width - (ref_grid ** 2 + 1) * size.width
                + 16 * 2 * 2 * size.width + (tokens + 1) * size.width)
    assert count(params["encoder"]) == expected
    assert out["image_emb"].shape == (2, embed)
    assert out["latents_hat"].shape == (2, image_size // 8, image_size // 8, 16)
    assert out["caption_logits"].shape == (2, CAPTION_LEN, VOCAB)
    assert out["text_emb"].shape == (2, embed)


def test_module_shapes_b2():
    params, _ = abstract_params("B/2", "B/1", "B", 128)
    enc = params["encoder"]
    assert enc["conv1"]["kernel"].shape == (2, 2, 16, 768)
    assert enc["positional_embedding"].shape == (65, 768)
    assert enc["transformer"]["resblocks"]["attn"]["qkv_kernel"].shape == (12, 768, 3, 12, 64)
    assert enc["proj"]["kernel"].shape == (768, 512)
    dec = params["decoder"]
    assert dec["embed"]["kernel"].shape == (768, 768)
    assert dec["head"]["kernel"].shape == (768, 2 * 2 * 16)
    assert params["text"]["token_embedding"]["embedding"].shape == (VOCAB, 512)
    assert params["text"]["text_projection"]["kernel"].shape == (512, 512)
    assert params["caption"]["head"]["kernel"].shape == (512, VOCAB)
    assert params["logit_scale"].shape == ()
    # decoder B/1: 12 blocks of ViT-B + embed/head/ln; text towers: 12 blocks of width 512
    block_b = 7_087_872
    assert count(dec) == 12 * block_b + (768 * 768 + 768) + 64 * 768 + 2 * 768 + (768 * 64 + 64)


def test_sincos_matches_mae_convention():
    pe = sincos_2d(4, 8)
    # position (row 0, col 1): first half encodes the column -> sin(1*omega_0)=sin(1)
    assert pe.shape == (16, 8)
    np.testing.assert_allclose(pe[1, 0], np.sin(1.0), rtol=1e-6)
    np.testing.assert_allclose(pe[1, 4], 0.0, atol=1e-7)   # row 0 -> sin(0)
    np.testing.assert_allclose(pe[4, 4], np.sin(1.0), rtol=1e-6)  # (row 1, col 0)


def test_prefix_lm_mask():
    m = np.asarray(prefix_lm_mask(2, 3))[0, 0]
    expected = np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(m, expected)


def test_unknown_size_is_a_clear_error():
    from ov3.errors import Ov3Error
    with pytest.raises(Ov3Error, match="model.encoder='Q/2'"):
        registry.vit_size("Q/2", "model.encoder")


def test_attention_matches_torch_sdpa_and_cudnn_is_a_config_choice():
    """model.attention_impl="xla" (the default) against torch's scaled_dot_product_attention,
    with the caption decoder's prefix-LM mask; "cudnn" needs bfloat16 (one config error)."""
    torch = pytest.importorskip("torch")
    from ov3 import config as config_lib
    from ov3.errors import Ov3Error
    from ov3.models.layers import Attention
    b, heads, width = 2, 4, 32
    mask = prefix_lm_mask(4, 8)  # 4 image tokens, 8 caption tokens
    x = jax.random.normal(jax.random.key(0), (b, 12, width))
    attn = Attention(heads, implementation="xla")
    p = nn.meta.unbox(attn.init(jax.random.key(1), x, mask))["params"]
    p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), p)  # non-zero biases
    got = np.asarray(attn.apply({"params": p}, x, mask))
    qkv = np.einsum("btw,wihd->btihd", x, p["qkv_kernel"]) + np.asarray(p["qkv_bias"])
    q, k, v = (torch.from_numpy(np.ascontiguousarray(qkv[:, :, i].transpose(0, 2, 1, 3))) for i in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(np.asarray(mask)))
    want = np.einsum("bhtd,hdw->btw", out.numpy(), p["out_kernel"]) + np.asarray(p["out_bias"])
    np.testing.assert_allclose(got, want, atol=2e-5)
    cfg = config_lib.base_config()
    cfg.model.attention_impl = "cudnn"
    with pytest.raises(Ov3Error, match="attention_impl='cudnn' needs config.model.dtype='bfloat16'"):
        config_lib.validate(cfg)
    cfg.model.attention_impl = "flash"
    with pytest.raises(Ov3Error, match="attention_impl='flash' must be one of"):
        config_lib.validate(cfg)


def test_caption_head_in_bfloat16_moves_the_loss_by_under_0_1_percent():
    """The vocabulary head computes in the model dtype (bf16 in the paper's configs); the loss
    takes its logits to float32. Against the same head in float32, at OpenVision's vocabulary."""
    from ov3 import losses
    vocab, width = 32000, 256
    x = jax.random.normal(jax.random.key(0), (2, 32, width)).astype(jnp.bfloat16)  # LayerNorm'd input
    ids = jax.random.randint(jax.random.key(1), (2, 32), 1, vocab)
    params = nn.Dense(vocab).init(jax.random.key(2), x.astype(jnp.float32))
    params = jax.tree.map(lambda a: 8 * a, params)  # logits spread like a trained head's, not init's
    l32 = float(losses.caption(nn.Dense(vocab, dtype=jnp.float32).apply(params, x), ids))
    l16 = float(losses.caption(nn.Dense(vocab, dtype=jnp.bfloat16).apply(params, x), ids))
    print(f"\ncaption loss, head in float32 {l32:.5f}, in bfloat16 {l16:.5f} (relative {abs(l16 - l32) / l32:.1e})")
    assert abs(l16 - l32) < 1e-3 * l32
