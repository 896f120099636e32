"""`config.init_from` on tiny shapes: a 16 px run's params start a 32 px run (no train step compiled),
and a run starts from an open_clip checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ov3 import checkpoint as ckpt_lib
from ov3 import init_from, sharding, stages, train
from ov3.errors import Ov3Error
from ov3.models.layers import sincos_2d
from ov3.models.vit import cls_and_sincos
from ov3.models import vae as vae_lib
from ov3.models import vae_weights
from ov3.tools.summary import abstract_task
from tests.helpers import TINY_VAE, tiny_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(no dataset: nothing here reads one, tiny VAE architecture)."""
    root = tmp_path_factory.mktemp("assets")
    vae_weights.save_pretrained(vae_lib.init_random(TINY_VAE, seed=0), root / "vae")
    return root / "no-data", root / "vae"


def trainer_for(cfg):
    # The task without loading VAE weights or a tokenizer (vocabulary of summary.VOCAB_SIZE), on
    # one device: multi-device sharding is test_train's subject, and it makes orbax slower here.
    cfg.mesh.update(data=1)
    return train.Trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]), abstract_task(cfg))


def random_state(trainer, seed, step):
    """Random values in the trainer's state layout, without compiling its init."""
    rng = np.random.default_rng(seed)

    def leaf(a):
        x = rng.standard_normal(a.shape).astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) \
            else np.zeros(a.shape, a.dtype)
        return jax.device_put(x, a.sharding)

    state = jax.tree.map(leaf, trainer.abstract_state)
    return state.replace(step=jax.device_put(np.int32(step), trainer.abstract_state.step.sharding))


@pytest.fixture(scope="module")
def pretrained(assets, tmp_path_factory):
    """A finished 16 px 'pretraining' run dir (its last step = total_steps) and its state."""
    data, vae = assets
    cfg = tiny_config(data, vae)
    state = random_state(trainer_for(cfg), seed=0, step=cfg.total_steps)
    run_dir = tmp_path_factory.mktemp("pretrain")
    checkpointer = ckpt_lib.Checkpointer(run_dir, async_save=False)
    checkpointer.save(cfg.total_steps, state, None, force=True)
    checkpointer.wait()
    checkpointer.close()
    return run_dir, jax.device_get(state.params)


def get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_finetune_at_32px_starts_from_the_16px_params(assets, pretrained):
    data, vae = assets
    run_dir, saved = pretrained
    cfg = tiny_config(data, vae, image_size=32, **{"data.text_len": 20})  # grid 4x4 -> 8x8; text 16 -> 20
    trainer = trainer_for(cfg)
    fresh = random_state(trainer, seed=1, step=0)
    state = init_from.apply(trainer, fresh, str(run_dir))

    new, old = flat(jax.device_get(state.params)), flat(saved)
    tables = {"['encoder']['positional_embedding']", "['decoder']['positional_embedding']",
              "['text']['positional_embedding']"}
    for key, value in new.items():
        if key not in tables:
            np.testing.assert_array_equal(value, old[key], err_msg=key)
    width = 64  # "mu"
    # fixed sin-cos tables are recomputed for the 8x8 grid (class row zero)
    np.testing.assert_allclose(new["['encoder']['positional_embedding']"], cls_and_sincos(8, width), atol=1e-6)
    np.testing.assert_allclose(new["['decoder']['positional_embedding']"], sincos_2d(8, width), atol=1e-6)
    # the learned text table is interpolated to 20 positions
    assert new["['text']['positional_embedding']"].shape == (20, width)
    # optimizer state and step are the fresh ones (the schedule restarts); params stay sharded
    assert int(state.step) == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 state.opt_state, fresh.opt_state)
    conv1 = ("encoder", "conv1", "kernel")
    assert get(state.params, conv1).sharding == get(trainer.state_shardings.params, conv1)


def test_learned_tables_are_interpolated():
    # bicubic/linear resizing keeps a constant table constant; the class row is carried over
    saved = np.concatenate([np.full((1, 8), 5.0), np.full((16, 8), 2.0)]).astype(np.float32)
    grid = init_from.adapt(saved, (65, 8), "grid", fixed=False)
    assert grid.shape == (65, 8)
    np.testing.assert_allclose(grid[0], 5.0)
    np.testing.assert_allclose(grid[1:], 2.0, rtol=1e-5)
    ramp = np.linspace(0, 1, 16, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    seq = init_from.adapt(ramp, (31, 4), "seq", fixed=False)
    assert seq.shape == (31, 4) and np.all(np.diff(seq[:, 0]) >= 0)  # still monotone


def test_another_model_is_a_clear_error(pretrained):
    _, saved = pretrained
    fresh = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved)
    fresh["caption"]["head"]["kernel"] = jax.ShapeDtypeStruct((64, 99), jnp.float32)
    del fresh["logit_scale"]
    with pytest.raises(Ov3Error, match=r"2 mismatches(.|\n)*caption/head/kernel: saved \(64, 32000\), expected "
                                       r"\(64, 99\)(.|\n)*logit_scale: in the checkpoint, not in this model"):
        init_from.merge(saved, fresh, "sincos")


def test_checkpoint_dir(pretrained, tmp_path):
    run_dir, _ = pretrained
    assert init_from.checkpoint_dir(str(run_dir)).name == "4"  # tiny_config: total_steps 4
    assert init_from.checkpoint_dir(str(run_dir / "checkpoints" / "4")).name == "4"
    with pytest.raises(Ov3Error, match="has no finished checkpoint"):
        init_from.checkpoint_dir(str(tmp_path))


def test_one_command_runs_both_stages(assets, pretrained, tmp_path, monkeypatch):
    data, vae = assets
    calls = []
    monkeypatch.setattr(train, "train", lambda cfg, workdir: calls.append((cfg.image_size, cfg.init_from,
                                                                             str(workdir))) or {})
    pre, fine = tiny_config(data, vae), tiny_config(data, vae, image_size=32)
    stages.run(pre, fine, str(tmp_path))
    assert calls == [(16, "", str(tmp_path / "pretrain")),
                     (32, str(tmp_path / "pretrain"), str(tmp_path / "finetune"))]
    # a finished pretraining run (last step == total_steps) is not trained again
    calls.clear()
    run_dir, _ = pretrained
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "pretrain").symlink_to(run_dir)
    stages.run(tiny_config(data, vae), tiny_config(data, vae, image_size=32), str(tmp_path / "again"))
    assert [c[0] for c in calls] == [32]


def test_init_from_open_clip_checkpoint_trains_from_its_weights(tmp_path):
    """--config.init_from=<open_clip file>: a released-layout checkpoint (written here by the open_clip
    export of random weights) starts a run; one step at learning rate 0 keeps the params the step
    used, whose tokens equal real open_clip's on the same latents (2 steps: optax needs a decay step)."""
    from ov3.data.tokenizer import Tokenizer
    from ov3.export import import_open_clip, load
    from ov3.export import open_clip as oc_export
    from ov3.inference import Encoder
    from ov3.models.ov3 import ModelSpec
    from tests.helpers import make_assets
    from tests.test_export_open_clip import real_open_clip
    torch = pytest.importorskip("torch")
    data, vae = make_assets(tmp_path / "assets")
    cfg = tiny_config(data, vae, total_steps=2, checkpoint_every=2, **{"optim.base_lr": 0.0})
    grid = cfg.image_size // 2   # the tiny VAE downsamples x2
    spec = ModelSpec.from_config(cfg.model, vocab_size=Tokenizer.from_file(str(data / "tokenizer.json")).vocab_size,
                                 text_len=cfg.data.text_len, caption_len=cfg.data.caption_len, latent_channels=16)
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                          load.abstract_params(spec, grid))
    released = tmp_path / "released"
    card_cfg = ml_collections.ConfigDict(cfg.to_dict())
    card_cfg.vae_config = dict(TINY_VAE)   # what the card states about the VAE (ov3.export.card)
    oc_export.export(released, card_cfg, params, spec, None)
    cfg.init_from = str(released / oc_export.WEIGHTS_NAME)
    assert init_from.open_clip_file(str(released)) == released / oc_export.WEIGHTS_NAME   # the folder works too

    last = train.train(cfg, tmp_path / "run")
    assert np.isfinite(last["loss"]) and last["nonfinite_skipped"] == 0
    encoder = Encoder.from_workdir(tmp_path / "run")
    imported = import_open_clip.load(released / oc_export.WEIGHTS_NAME, spec, grid)
    for tower in ("encoder", "text"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(encoder.params[tower]), imported[tower])

    open_clip = real_open_clip()
    import importlib.util   # the loader file shipped in the folder
    loader_spec = importlib.util.spec_from_file_location("load_ov3_open_clip", released / oc_export.LOADER_NAME)
    loader = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(loader)
    assert loader.open_clip is open_clip
    model = loader.load(released)
    latents = rng.standard_normal((2, grid, grid, 16)).astype(np.float32)
    _, tokens = encoder.encode_latents(latents)
    with torch.no_grad():
        _, want = loader.encode_image_tokens(model, torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()))
    err = float(np.max(np.abs(np.asarray(tokens) - want.numpy())))
    print(f"first-step tokens vs open_clip: max abs error {err:.2e}")
    assert err <= 1e-4
