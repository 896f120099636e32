"""FLOP counts against XLA's cost analysis, the peak table and MFU, summary and bench pieces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ov3 import flops, perf
from ov3.models import vae as vae_lib
from ov3.models import vae_weights
from ov3.models.layers import Transformer
from ov3.tools import bench, summary
from tests.helpers import TINY_VAE, tiny_config


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    vae_weights.save_pretrained(vae_lib.init_random(TINY_VAE, seed=0), path)
    return path


@pytest.mark.parametrize("tokens,width,mlp,heads", [(65, 768, 3072, 12), (192, 512, 2048, 8)])
def test_block_flops_match_xla(tokens, width, mlp, heads):
    analytic = flops.block_flops(tokens, width, mlp)
    xla = summary.xla_block_flops(tokens, width, mlp, heads)
    # XLA also counts norms, GELU, softmax and residual adds: a few percent on top, never less
    assert 1.0 <= xla / analytic < 1.03, (xla, analytic)


def test_xla_counts_a_scanned_stack_once():
    """Why MFU uses the analytic count: cost_analysis() ignores the scan's trip count."""
    x = jax.ShapeDtypeStruct((1, 16, 64), jnp.float32)

    def cost(depth):
        m = Transformer(depth, 4, 256)
        return summary.xla_flops(lambda p, x: m.apply(p, x), jax.eval_shape(m.init, jax.random.key(0), x), x)

    assert cost(1) == pytest.approx(cost(4), rel=1e-6)


def test_vae_flops_match_xla():
    # FLUX.1's layout (resnets, mid attention, no quant convs) at fewer levels and channels: the
    # same formulas, a fraction of the tracing time.
    config = vae_lib.VAEConfig.from_dict(dict(
        vae_lib.FLUX1_DEV_CONFIG, block_out_channels=[32, 64], norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2))
    module = vae_lib.AutoencoderKL(config)
    image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    side = 64 // config.downsample_factor
    latents = jax.ShapeDtypeStruct((1, side, side, 16), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), image)
    enc = summary.xla_flops(lambda p, x: module.apply(p, x, method=vae_lib.AutoencoderKL.encode), params, image)
    dec = summary.xla_flops(lambda p, z: module.apply(p, z, method=vae_lib.AutoencoderKL.decode), params, latents)
    # XLA skips the taps that fall on padding (a few percent at these small maps)
    assert enc / flops.vae_encode_flops(config, 64) == pytest.approx(1.0, abs=0.08)
    assert dec / flops.vae_decode_flops(config, 64) == pytest.approx(1.0, abs=0.08)


def test_peak_table_and_mfu():
    assert perf.peak_tflops("TPU v4") == 275 and perf.peak_tflops("TPU v5 lite") == 197
    assert perf.peak_tflops("TPU v5") == 459 and perf.peak_tflops("TPU v6 lite") == 918
    assert perf.peak_tflops("NVIDIA H100 80GB HBM3") == 989 and perf.peak_tflops("NVIDIA H200") == 989
    assert perf.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert perf.peak_tflops("cpu") is None and perf.peak_tflops("TPU v4 lite") is None
    got = perf.utilisation(step_flops=2.75e15, step_time_s=1.0, num_devices=10, device_kind="TPU v4")
    assert got == {"model_tflops_per_s_per_device": pytest.approx(275.0), "mfu": pytest.approx(1.0)}
    assert "mfu" not in perf.utilisation(1e12, 1.0, 1, "cpu")


def test_summary_of_the_tiny_model(tiny_vae):
    cfg = tiny_config(tiny_vae.parent / "no-data", tiny_vae)
    task = summary.abstract_task(cfg)
    counts = summary.param_counts(task)
    assert counts["other (logit scale)"] == 1 and counts["VAE (frozen)"] > 0
    rows = {r["component"]: r for r in summary.flop_rows(cfg, task, xla_check=True)}
    assert set(rows) == {"vae_encode", "encoder", "text", "caption", "decoder", "vae_decode", "total"}
    for name in ("encoder", "text", "caption", "decoder"):  # tiny widths: elementwise work weighs more
        assert 1.0 <= rows[name]["xla_forward"] / rows[name]["forward"] < 1.5, name
    assert rows["total"]["train"] == pytest.approx(sum(r["train"] for k, r in rows.items() if k != "total"))
    assert TINY_VAE["block_out_channels"] == list(task.vae.config.block_out_channels)


def test_ov3_b_flops_at_128px():
    """The numbers the report quotes: OV3-B pretraining, per example (GFLOPs)."""
    from ov3.models.ov3 import ModelSpec
    from tests.test_family import load
    cfg = load("ov3_b.py:pretrain")
    spec = ModelSpec.from_config(cfg.model, vocab_size=summary.VOCAB_SIZE, text_len=cfg.data.text_len,
                                 caption_len=cfg.data.caption_len, latent_channels=16)
    costs = flops.ov3_costs(spec, cfg.image_size, summary.vae_config(cfg), lpips=cfg.loss.lpips > 0)
    assert costs["encoder"].forward / 1e9 == pytest.approx(11.20, abs=0.01)
    # The decoder's upsampling convs in the sub-pixel form: 310.34 GFLOPs with nearest x2 + 3x3.
    assert costs["vae_decode"].train / 1e9 == pytest.approx(264.21, abs=0.01)
    assert flops.train_flops_per_example(costs) / 1e9 == pytest.approx(476.50, abs=0.01)
    assert "lpips" not in costs
    # OpenVision's second contrastive positive (the recipe's default) runs the text tower twice.
    assert cfg.loss.contrastive_texts == ("alt_text", "caption_sentence")
    two = flops.ov3_costs(spec, cfg.image_size, summary.vae_config(cfg), lpips=False, num_texts=2)
    assert two["text"].train == 2 * costs["text"].train
    assert flops.train_flops_per_example(two) / 1e9 == pytest.approx(476.50 + costs["text"].train / 1e9, abs=0.01)


def test_bench_reference_and_grid(tiny_vae):
    ref = bench.reference()
    assert ref["images_per_s"] == pytest.approx(12037, abs=1)
    assert ref["per_chip"] == pytest.approx(94.0, abs=0.1) and ref["per_tensorcore"] == pytest.approx(47.0, abs=0.1)
    grid = bench.settings(tiny_config(tiny_vae.parent, tiny_vae), [8, 16], ["none", "full"], ["float32", "bfloat16"])
    assert len(grid) == 8
    assert {(g["batch_size"], g["model"]["remat"], g["vae"]["remat_decoder"], g["vae"]["dtype"]) for g in grid} >= {
        (8, "none", False, "float32"), (16, "full", True, "bfloat16")}


def test_bench_measures_a_step_with_and_without_cached_latents(tiny_vae):
    cfg = tiny_config(tiny_vae.parent, tiny_vae, batch_size=8)
    rows = {}
    for cached in (False, True):
        cfg.data.use_cached_latents = cached
        rows[cached] = bench.measure(cfg.to_dict(), steps=1, warmup=1)
    for r in rows.values():
        assert r["batch"] == 8 and r["step_s"] > 0 and np.isfinite(r["loss"]) and r["peak_gib"] > 0
        assert r["images_per_s"] == pytest.approx(8 / r["step_s"])
    # The cached batch carries latents, so the step (and its FLOP count) leaves out the VAE encoder.
    encoder = flops.task_costs(cfg, bench.build_task(cfg))["vae_encode"]
    assert rows[False]["flops_per_example"] - rows[True]["flops_per_example"] == pytest.approx(encoder.train, rel=1e-6)


def test_vocab_size_is_the_config_tokenizers_when_on_disk(tmp_path, tiny_vae):
    from ov3.data.tokenizer import train_wordpiece
    cfg = tiny_config(tmp_path, tiny_vae)  # data.path = tmp_path: no tokenizer.json yet
    assert summary.vocab_size(cfg) == summary.VOCAB_SIZE == 32000
    tok = train_wordpiece(["a red circle", "two blue squares"] * 4, vocab_size=100,
                          out_path=str(tmp_path / "tokenizer.json"))
    assert summary.vocab_size(cfg) == tok.vocab_size <= 100


def test_plot_overlays_runs_one_panel_per_term(tmp_path):
    """Two runs written by the real MetricWriter (a resumed step logged twice, evaluations in rows
    of their own): every loss, stats and eval key gets a panel, both runs in it."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from ov3 import metrics as metrics_lib
    from ov3.tools import plot
    for name, slope in (("full", 1.0), ("only_rec", 0.0)):
        (tmp_path / name).mkdir()
        writer = metrics_lib.MetricWriter(tmp_path / name)
        for step in (10, 20, 20, 30):
            writer.scalars(step, {"loss": 5 - slope * step / 10, "loss/contrastive": 4 - slope * step / 10,
                                  "stats/z_u_rms": 1.0, "lr": 1e-3, "images_per_s": 100.0})
        writer.scalars(30, {"eval/retrieval/i2t_r1": 0.1 + slope * 0.2, "eval/retrieval/time_s": 3.0})
        writer.close()
    runs = {name: plot.read_run(tmp_path / name) for name in ("full", "only_rec")}
    assert runs["full"]["loss/contrastive"] == [(10, 3.0), (20, 2.0), (30, 1.0)]  # step 20 once
    out = tmp_path / "curves.png"
    plot.main(["--workdir", str(tmp_path / "full"), "--workdir", str(tmp_path / "only_rec"), "--out", str(out)])
    keys = plot.plot(runs, out)
    assert keys == ["loss", "loss/contrastive", "stats/z_u_rms", "eval/retrieval/i2t_r1"]
    assert Image.open(out).size == (4 * 4 * 110, 3 * 110)
    with pytest.raises(SystemExit):
        plot.main(["--workdir", str(tmp_path / "nope"), "--out", str(out)])


def test_program_text_is_none_where_jax_cannot_read_the_program_back():
    # jax 0.10.2 cannot parse libtpu's v5p program ("async-update instruction should have 1
    # operands but sees 3"): summary then reports the memory and says why there is no bound.
    class Compiled:
        def as_text(self):
            raise jax.errors.JaxRuntimeError("INTERNAL: RET_CHECK failure: async-update instruction")
    assert summary.program_text(Compiled()) is None
