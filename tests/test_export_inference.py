"""ov3.inference.Encoder, python -m ov3.embed and the workdir reader (ov3.export.load)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from ov3.errors import Ov3Error
from ov3.export import load, testing
from ov3.inference import Encoder, l2_normalize

TOL = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    tok = testing.train_tokenizer(root / "tokenizer.json")
    spec = testing.tiny_spec()
    params = testing.perturb(testing.init_params(spec), seed=4)
    older = testing.perturb(params, seed=5)
    work = root / "run"
    config = testing.tiny_config(str(root / "vae"))   # written by the `vae` fixture when needed
    testing.write_workdir(work, config, older, step=50, tokenizer=root / "tokenizer.json")
    testing.write_workdir(work, config, params, step=100)
    return {"root": root, "work": work, "tok": tok, "spec": spec, "params": params, "older": older}


@pytest.fixture(scope="module")
def vae(run):
    """A tiny random FLUX-shaped VAE (16 latent channels, x8) at the workdir's config.vae.path."""
    vae_lib = pytest.importorskip("ov3.models.vae")
    from ov3.models import vae_weights
    cfg = {**vae_lib.FLUX1_DEV_CONFIG, "block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4,
           "layers_per_block": 1, "mid_block_add_attention": False}
    vae_weights.save_pretrained(vae_lib.init_random(cfg, seed=0), run["root"] / "vae")


@pytest.fixture(scope="module")
def enc(run, vae):
    return Encoder.from_workdir(run["work"])


def test_load_params_restores_exactly(run):
    config, params = load.load_params(run["work"])
    assert config.model.encoder == "mu/2"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(run["params"])):
        np.testing.assert_array_equal(a, b)
    _, older = load.load_params(run["work"], step=50)
    np.testing.assert_array_equal(older["encoder"]["proj"]["kernel"], run["older"]["encoder"]["proj"]["kernel"])
    assert load.model_spec(config, params) == run["spec"]


def test_encoder_latents_images_text(run, enc):
    assert enc.image_size == testing.IMAGE_SIZE
    latents = testing.random_latents(seed=6)
    ids = run["tok"].encode_batch(list(testing.TEXTS[:3]), run["spec"].text_len)
    ref = testing.reference_outputs(run["spec"], run["params"], latents, ids)
    pooled, tokens = enc.encode_latents(latents)
    assert testing.max_err(pooled, ref["pooled"]) <= TOL and testing.max_err(tokens, ref["tokens"]) <= TOL
    assert testing.max_err(enc.encode_text(list(testing.TEXTS[:3])), ref["text"]) <= TOL
    images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    pooled, tokens = enc.encode_images(images)
    ref_img = testing.reference_outputs(run["spec"], run["params"], np.asarray(enc.vae.encode(images)))
    assert testing.max_err(pooled, ref_img["pooled"]) <= TOL and tokens.shape == (2, 16, 64)
    with pytest.raises(Ov3Error, match=r"\(B, 64, 64, 3\)"):
        enc.encode_images(images[:, :32])
    with pytest.raises(Ov3Error, match=r"\[-1, 1\]"):
        enc.encode_images((images + 1) * 127.5)
    with pytest.raises(Ov3Error, match=r"\(B, 8, 8, 16\)"):
        enc.encode_latents(latents[:, :4])


def test_embed_cli(run, enc, tmp_path, capsys):
    from ov3 import embed

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (80, 64, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 90, 4), np.uint8), "RGBA").save(folder / "sub" / "b.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(folder / "c.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "emb" / "x.npy"
    assert embed.main(["--workdir", str(run["work"]), "--images", str(folder), "--out", str(out),
                       "--tokens", "--normalize", "--batch-size", "2"]) == 0
    assert "broken.jpg" in capsys.readouterr().err
    emb = np.load(out)
    assert emb.shape == (3, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert out.with_suffix(".txt").read_text().split() == ["a.png", "c.jpg", "sub/b.png"]
    assert np.load(out.with_suffix(".tokens.npy")).shape == (3, 16, 64)
    # The rows are Encoder.encode_images of the preprocessed files.
    pooled, _ = enc.encode_images(np.stack([embed.load_image(folder / n, 64) for n in ("a.png", "c.jpg")]))
    assert testing.max_err(emb[:2], l2_normalize(pooled)) <= TOL
    assert embed.main(["--workdir", str(run["work"]), "--images", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_workdir_errors(run, tmp_path):
    with pytest.raises(Ov3Error, match="config.json"):
        load.load_params(tmp_path)
    with pytest.raises(Ov3Error, match=r"saved steps: \[50, 100\]"):
        load.load_params(run["work"], step=7)
    (tmp_path / "config.json").write_text(json.dumps(testing.tiny_config().to_dict()))
    with pytest.raises(Ov3Error, match="has not saved a checkpoint"):
        load.load_params(tmp_path)
    # A config whose sizes do not match the weights: every mismatch listed.
    config, params = load.load_params(run["work"])
    config.model.decoder = "S/1"
    with pytest.raises(Ov3Error, match=r"decoder.*checkpoint \(64, 64\), expected \(64, 384\)"):
        load.model_spec(config, params)
    vae_run = tmp_path / "vae_run"
    cfg = testing.tiny_config()
    cfg.task = "vae"
    testing.write_workdir(vae_run, cfg, {"encoder_blocks": {"w": np.zeros(3, np.float32)}})
    with pytest.raises(Ov3Error, match="task='vae'"):
        load.load_params(vae_run)
    enc = Encoder(testing.tiny_config(), run["params"])
    with pytest.raises(Ov3Error, match="vae_path="):
        enc.encode_images(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(Ov3Error, match="tokenizer"):
        enc.encode_text(["a cat"])


def test_reads_the_trainers_own_checkpoints(run, tmp_path):
    """Written by ov3.checkpoint.Checkpointer (TrainState with an optax state, plus the grain
    iterator item), as `python -m ov3.main` does."""
    ckpt = pytest.importorskip("ov3.checkpoint")
    optax = pytest.importorskip("optax")
    from ov3.train import TrainState

    class Iterator:
        def get_state(self):
            return {"position": 3}

    (tmp_path / "config.json").write_text(testing.tiny_config().to_json_best_effort(indent=2))
    params = jax.tree.map(jax.numpy.asarray, run["params"])
    state = TrainState(step=jax.numpy.int32(9), params=params, opt_state=optax.adamw(1e-3).init(params))
    checkpointer = ckpt.Checkpointer(tmp_path, async_save=False)
    checkpointer.save(9, state, Iterator(), force=True)
    checkpointer.close()
    config, restored = load.load_params(tmp_path)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(run["params"])):
        np.testing.assert_array_equal(a, b)
