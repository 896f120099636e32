"""What the objective does beyond the loss formulas (tests/test_losses.py): the logit-scale clamp,
the decoder noise, the paper's branch ablations and the no-VAE path, on tiny real parts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ov3 import losses, sharding, train
from ov3 import metrics as metrics_lib
from ov3.data import pipeline
from ov3.models.ov3 import decoder_noise
from tests.helpers import make_assets, tiny_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def first_batch(cfg, tokenizer, mesh=None):
    return next(pipeline.make_iterator(cfg.data, mesh=mesh, global_batch_size=cfg.batch_size,
                                       image_size=cfg.image_size, split="train", train=True, seed=cfg.seed,
                                       tokenizer=tokenizer, caption_sentence=True))


def test_logit_scale_past_the_bound_comes_back(assets):
    """A forward clip would give the parameter a zero gradient past log(100) and leave it there;
    the clamp after the update brings it to the bound, and the loss then moves it below."""
    data, vae = assets
    cfg = tiny_config(data, vae, **{"optim.base_lr": 0.2, "total_steps": 100})  # lr 0.0125
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    task, tokenizer = train.build_task(cfg)
    trainer = train.Trainer(cfg, mesh, task)
    state, frozen = trainer.init_state(), trainer.put_frozen(task.frozen_params())
    state = state.replace(params={**state.params, "logit_scale": jnp.float32(6.0)})
    batch = first_batch(cfg, tokenizer, mesh)
    values = []
    for _ in range(4):
        state, metrics = trainer.step(state, frozen, batch)
        values.append(float(state.params["logit_scale"]))
    assert values[0] <= losses.MAX_LOGIT_SCALE + 1e-6
    # At random init a lower scale lowers the contrastive loss: the parameter leaves the bound.
    assert values[-1] < values[0] - 0.02, values


def test_decoder_noise_is_float32_normal():
    """eps over 1e6 draws in bf16 compute: float32 statistics, not bf16's ~128 levels and +-3 tails."""
    tokens = jnp.ones((1, 1000, 1000), jnp.bfloat16)
    noise, sigma, rms = decoder_noise(jax.random.key(0), tokens, 0.8, "absolute")
    assert noise.dtype == jnp.float32 and 0 < float(sigma[0]) <= 0.8 and float(rms[0]) == 1.0
    eps = np.asarray(noise, np.float64).ravel() / float(sigma[0])
    assert abs(eps.mean()) < 0.005 and abs(eps.var() - 1) < 0.005
    assert eps.min() < -4.4 and eps.max() > 4.4  # 1e6 normal draws reach about +-4.9
    assert len(np.unique(np.asarray(noise).ravel())) > 900_000
    # "relative": sigma scales with each example's RMS of z_u.
    scaled = jnp.concatenate([tokens[:, :2], 4 * tokens[:, :2]]).reshape(2, 2, 1000)
    _, sigma_abs, _ = decoder_noise(jax.random.key(1), scaled, 0.8, "absolute")
    _, sigma_rel, rms = decoder_noise(jax.random.key(1), scaled, 0.8, "relative")
    np.testing.assert_allclose(rms, [1.0, 4.0])
    np.testing.assert_allclose(sigma_rel, sigma_abs * np.array([1.0, 4.0]), rtol=1e-6)


def branch_grads(task, params, frozen, batch, **loss_overrides):
    """{"rec": grads of L_rec, "und": grads of L_und}, both from one compiled jacobian."""
    task.cfg.loss.update(loss_overrides)

    def both(p):
        _, terms = task.loss(p, frozen, batch, jax.random.key(0))
        return jnp.stack([terms["loss/rec"], terms["loss/und"]])
    jac = jax.jit(jax.jacrev(both))(params)
    return {name: jax.tree.map(lambda g, i=i: jnp.abs(g[i]).max(), jac) for i, name in enumerate(("rec", "und"))}


def largest(tree):
    return max(float(v) for v in jax.tree.leaves(tree))


def test_branch_stop_gradients(assets):
    """loss.rec_to_encoder / und_to_encoder = False: no gradient reaches the encoder from that
    branch, while the branch's own heads still get one (paper Sec. 5.1)."""
    data, vae = assets
    cfg = tiny_config(data, vae, **{"loss.contrastive_texts": ("alt_text", "caption_sentence")})
    task, tokenizer = train.build_task(cfg)
    params = nn.meta.unbox(task.init(jax.random.key(0)))
    frozen, batch = task.frozen_params(), first_batch(cfg, tokenizer)
    trunk = ("conv1", "transformer", "class_embedding")
    for cut in (False, True):
        g = branch_grads(task, params, frozen, batch, rec_to_encoder=not cut, und_to_encoder=not cut)
        # Each branch's own heads train either way.
        for k in ("embed", "transformer", "head"):
            assert largest(g["rec"]["decoder"][k]) > 0, k
        for k in ("text", "caption", "logit_scale"):
            assert largest(g["und"][k]) > 0, k
        for k in ("ln_post", "proj"):  # the contrastive pooling head sits on top of z_u
            assert largest(g["und"]["encoder"][k]) > 0, k
        # The encoder's trunk: gradient from both branches, or from neither when cut.
        for branch in ("rec", "und"):
            for k in trunk:
                assert (largest(g[branch]["encoder"][k]) == 0) == cut, (cut, branch, k)


def test_no_vae_trains_and_encodes_through_inference(assets, tmp_path):
    """model.input="pixels": the encoder patchifies pixels (mu/4 on 16 px: the same 16 tokens as
    the tiny VAE x2 + patch 2), no latent term; ov3.inference takes pixels straight."""
    from ov3.export import load
    from ov3.inference import Encoder
    from ov3.models.ov3 import OV3Model
    data, _ = assets
    cfg = tiny_config(data, "", **{"model.input": "pixels", "model.encoder": "mu/4", "total_steps": 6,
                                   "checkpoint_every": 6})
    train.train(cfg, tmp_path)
    rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert "loss/rec_latent_l1" not in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["loss/rec_pixel_l1"] < rows[0]["loss/rec_pixel_l1"]

    enc = Encoder.from_workdir(tmp_path)
    assert enc.image_size == 16
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    pooled, tokens = enc.encode_images(images)
    config, params = load.load_params(tmp_path)
    want_pooled, want_tokens = OV3Model(load.model_spec(config, params)).apply(
        {"params": params}, jnp.asarray(images), method=OV3Model.encode_image)
    assert tokens.shape == (2, 16, 64)
    np.testing.assert_allclose(tokens, want_tokens, atol=1e-5)
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-5)


def test_config_rejects_a_decoder_patch_and_unknown_texts():
    from ov3.config import base_config, validate
    from ov3.errors import Ov3Error
    cfg = base_config()
    cfg.model.decoder = "B/2"  # was silently a B/1
    cfg.loss.contrastive_texts = ("alt_text", "caption")
    with pytest.raises(Ov3Error, match=r"(?s)contrastive_texts.*model.decoder='B/2'.*use 'B/1'"):
        validate(cfg)


def test_ov3_b_no_vae_config_is_the_pixel_baseline():
    """`configs/ov3_b.py:pretrain,ablation=no_vae`: ViT-B/16 on pixels (64 tokens at 128 px, as
    VAE x8 + B/2), no VAE terms in the step's FLOPs, the same two contrastive positives."""
    from ov3 import flops
    from ov3.config import validate
    from ov3.tools import summary
    from tests.test_family import load
    cfg = load("ov3_b.py:pretrain,ablation=no_vae")
    validate(cfg)
    assert (cfg.model.input, cfg.model.encoder, cfg.model.decoder) == ("pixels", "B/16", "B/1")
    task = summary.abstract_task(cfg)
    assert task.pixels and task.latent_size == 128
    costs = flops.task_costs(cfg, task)
    assert set(costs) == {"encoder", "text", "caption", "decoder"}
    assert flops.train_flops_per_example(costs) / 1e9 == pytest.approx(163.47, abs=0.01)
