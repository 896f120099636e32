"""The OV3-B/-L configs: Table 1 schedules in steps, variants, overrides, placeholders."""

from __future__ import annotations

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from ov3 import config as config_lib
from ov3 import recipes, train
from ov3.errors import Ov3Error

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load(spec: str, *overrides: str):
    """A config the way ov3.main gets it: `--config=FILE:ARG --config.key=value ...`."""
    argv = ["prog", f"--config={CONFIGS / spec}", *overrides]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return holder.value


def test_table1_schedules_in_steps():
    assert recipes.EPOCH_SAMPLES == 1_281_167
    pre, fine = load("ov3_b.py:pretrain"), load("ov3_b.py:finetune")
    # 4000 epochs x 1,281,167 / 8192 = 625,569.8 -> 625,570 steps; 40 warmup epochs -> 6,256
    assert (pre.image_size, pre.batch_size, pre.total_steps, pre.optim.warmup_steps) == (128, 8192, 625_570, 6_256)
    # 400 epochs / 4096 = 125,113.96 -> 125,114 steps; 20 warmup epochs -> 6,256
    assert (fine.image_size, fine.batch_size, fine.total_steps, fine.optim.warmup_steps) == (256, 4096, 125_114, 6_256)
    assert pre.optim.base_lr * pre.batch_size / 256 == pytest.approx(2.56e-4)
    assert fine.optim.base_lr * fine.batch_size / 256 == pytest.approx(6.4e-6)
    for c in (pre, fine):
        assert (c.loss.beta, c.loss.alpha, c.loss.w_rec, c.loss.w_und) == (0.4, 1.0, 0.5, 1.0)
        assert (c.model.dtype, c.vae.dtype, c.mesh.fsdp) == ("bfloat16", "bfloat16", -1)
        data = (c.data.text_key, c.data.caption_key, c.data.text_len, c.data.caption_len)
        assert data == ("alt_text", "caption", 80, 128)
        config_lib.validate(c)
    assert (pre.loss.lpips, fine.loss.lpips) == (0.0, 0.5)
    assert (pre.model.remat, pre.vae.remat_decoder, fine.model.remat, fine.vae.remat_decoder) == (
        "dots", False, "dots", False)
    # the schedule the optimizer sees: peak lr at the end of warmup, zero at the end
    schedule = train.learning_rate(pre)
    assert float(schedule(pre.optim.warmup_steps)) == pytest.approx(2.56e-4, rel=1e-4)
    assert float(schedule(pre.total_steps)) == pytest.approx(0.0, abs=1e-12)


def test_batch_override_keeps_the_sample_budget():
    c = load("ov3_b.py:pretrain", "--config.batch_size=2048")
    assert c.total_steps == recipes.steps(4000, 2048) == 2_502_280
    assert c.optim.warmup_steps == recipes.steps(40, 2048)
    assert (c.total_steps - 1) * 2048 < 4000 * recipes.EPOCH_SAMPLES <= c.total_steps * 2048
    # an explicit step count still wins (smoke runs)
    assert load("ov3_b.py:pretrain", "--config.total_steps=10").total_steps == 10


@pytest.mark.parametrize("spec,encoder,decoder,text,size", [
    ("ov3_b.py", "B/2", "B/1", "B", 128),
    ("ov3_l.py", "L/2", "B/1", "L", 128),
    ("ov3_b.py:finetune,res=224", "B/2", "B/1", "B", 224),
    ("ov3_l.py:pretrain,encoder=So400m/2,decoder=L/1", "So400m/2", "L/1", "So400m", 128),
    ("ov3_b.py:pretrain,encoder=H/2", "H/2", "B/1", "H", 128),
    ("ov3_b.py:pretrain,encoder=S/2,decoder=M/1,text=B", "S/2", "M/1", "B", 128),
])
def test_variants(spec, encoder, decoder, text, size):
    c = load(spec)
    assert (c.model.encoder, c.model.decoder, c.model.text, c.image_size) == (encoder, decoder, text, size)
    config_lib.validate(c)


def test_bad_arguments_name_the_fix():
    with pytest.raises(Ov3Error, match="keys .*res.*encoder"):
        recipes.parse_arg("pretrain,resolution=224")
    with pytest.raises(Ov3Error, match="stage 'pretrian' is not one of"):
        recipes.parse_arg("pretrian")
    with pytest.raises(Ov3Error, match="config argument encoder='Q/2'"):
        recipes.ov3_config("pretrain,encoder=Q/2", encoder="B/2")


def test_placeholders_say_where_to_get_the_files():
    c = load("ov3_b.py:finetune")
    with pytest.raises(Ov3Error, match=r"--config\.vae\.path.*black-forest-labs/FLUX\.1-dev ae\.safetensors"):
        train.build_task(c)
    assert "--config.data.path" in c.data.path and "--config.data.tokenizer" in c.data.tokenizer
    assert "--config.lpips.vgg_path" in c.lpips.vgg_path
