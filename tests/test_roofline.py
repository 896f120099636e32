"""ov3.tools.roofline: costs read off compiled HLO, checked against counts done by hand (small
programs) and against the analytic FLOP count (the tiny train step). CPU-compiled programs:
the parser is the same for libtpu's output (ov3.tools.summary --topology)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ov3.tools import roofline
from tests.helpers import TINY_VAE


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from ov3.models import vae as vae_lib
    from ov3.models import vae_weights
    path = tmp_path_factory.mktemp("vae")
    vae_weights.save_pretrained(vae_lib.init_random(TINY_VAE, seed=0), path)
    return path


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def _scan_of_matmuls(x, ws):
    def body(c, w):
        with jax.named_scope("encoder"):
            return jnp.tanh(c @ w), None
    return jax.lax.scan(body, x, ws)[0].sum()


def test_scan_of_8_matmuls_counts_8_bodies_forward_and_backward():
    x, ws = jnp.ones((64, 128)), jnp.ones((8, 128, 128))
    text = _hlo(jax.grad(_scan_of_matmuls, argnums=1), x, ws)
    matmul = 2 * 64 * 128 * 128
    for program in (text, re.sub(r',"known_trip_count":\{"n":"\d+"\}', "", text)):  # annotation, or the counter
        ops = roofline.op_costs(program)
        assert sum(o.count * o.flops for o in ops) == 3 * 8 * matmul  # forward, grad of x, grad of w
        assert {o.component for o in ops if o.flops} == {"encoder"}
        assert sum(o.count * o.flops for o in ops if o.backward) == 2 * 8 * matmul
    # XLA's own cost_analysis counts the loop body once.
    xla = jax.jit(jax.grad(_scan_of_matmuls, argnums=1)).lower(x, ws).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert xla["flops"] < 0.2 * 3 * 8 * matmul


def test_convolution_and_its_input_gradient_under_a_scope():
    def loss(x, k):
        with jax.named_scope("vae_decode"):
            y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * y)
    x, k = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 32))
    ops = roofline.op_costs(_hlo(jax.grad(loss), x, k))  # input gradient only, as for the frozen VAE
    conv = 2 * (2 * 16 * 16 * 32) * (3 * 3 * 8)
    assert sum(o.count * o.flops for o in ops) == 2 * conv
    assert sum(o.count * o.flops for o in ops if o.component == "vae_decode" and o.backward) == conv


# Two instructions as libtpu wrote them (compiling ov3's train step for v4): an einsum with batch
# dims lowered to a convolution whose batch dims are padded spatial dims; one window tap in 12
# touches data. And a stacked-weights operand read one layer at a time inside a scanned loop.
TPU_MODULE = """HloModule m, is_scheduled=true
%fused (param_0: f32[8,80,64,1,1], param_1: bf16[8,64,3,4,16,1], param_2: s32[]) -> f32[8,80,3,4,16] {
  %param_0 = f32[8,80,64,1,1]{1,2,4,3,0:T(8,128)} parameter(0)
  %param_1 = bf16[8,64,3,4,16,1]{0,3,2,1,4,5:T(8,128)(2,1)} parameter(1)
  %param_2 = s32[]{:T(128)S(6)} parameter(2)
  %constant.1 = s32[]{:T(128)} constant(0)
  %dynamic-slice.1 = bf16[1,64,3,4,16,1]{0,3,2,1,4,5:T(8,128)(2,1)} dynamic-slice(%param_1, %param_2, %constant.1, %constant.1, %constant.1, %constant.1, %constant.1), dynamic_slice_sizes={1,64,3,4,16,1}
  %bitcast.1 = bf16[64,3,4,16,1]{0,3,2,1,4:T(8,128)(2,1)} bitcast(%dynamic-slice.1)
  ROOT %convolution.1 = f32[8,80,3,4,16]{1,4,3,2,0:T(8,128)} convolution(%param_0, %bitcast.1), window={size=1x3x4 pad=0_0x2_2x3_3 rhs_reversal=0x1x1}, dim_labels=0bf12_i12o0->0b12f, metadata={op_name="jit(_train_step)/jvp(OV3Model)/caption/transformer/while/body/closed_call/resblocks/attn/btw,wihd->btihd/dot_general"}
}
ENTRY %main (p0: f32[8,80,64,1,1], p1: bf16[8,64,3,4,16,1], p2: s32[]) -> f32[8,80,3,4,16] {
  %p0 = f32[8,80,64,1,1]{1,2,4,3,0:T(8,128)} parameter(0)
  %p1 = bf16[8,64,3,4,16,1]{0,3,2,1,4,5:T(8,128)(2,1)} parameter(1)
  %p2 = s32[]{:T(128)} parameter(2)
  ROOT %fusion.1 = f32[8,80,3,4,16]{1,4,3,2,0:T(8,128)} fusion(%p0, %p1, %p2), kind=kOutput, calls=%fused
}
"""


def test_tpu_convolution_counts_taps_on_data_and_slices_of_stacked_weights():
    (op,) = roofline.op_costs(TPU_MODULE)
    assert op.flops == 2 * 8 * 80 * 64 * (3 * 4 * 16)  # btw,wihd->btihd: contract w only
    assert op.component == "caption" and not op.backward
    # read: the activations, one layer of the 8 stacked kernels (and the index); write: the result
    assert op.bytes == 8 * 80 * 64 * 4 + 64 * 3 * 4 * 16 * 2 + 4 + 8 * 80 * 3 * 4 * 16 * 4


def test_allocate_buffer_moves_no_bytes():
    # libtpu allocates a scan's stacked residuals this way (as written for ov3's v4 step); the
    # loop fills them in place, where the bytes are costed.
    module = """HloModule m, is_scheduled=true
ENTRY %main () -> bf16[12,32,192,2048] {
  ROOT %custom-call.7 = bf16[12,32,192,2048]{3,2,1,0:T(8,128)(2,1)} custom-call(), custom_call_target="AllocateBuffer", metadata={op_name="broadcast.581"}
}
"""
    assert roofline.op_costs(module) == []


def test_bytes_roofline_and_memory_bound_share():
    x = jnp.ones((1024, 1024), jnp.float32)
    ops = roofline.op_costs(_hlo(lambda a: a * 2 + 1, x))
    moved = sum(o.count * o.bytes for o in ops)
    assert moved == 2 * 1024 * 1024 * 4  # read once, write once: one fused elementwise op
    result = roofline.bound(ops, peak=100e12, hbm=1e12, ici=1e11, per_device_batch=4)
    assert result["memory_bound_share"] == 1.0
    assert result["bound_s"] == pytest.approx(moved / 1e12)
    assert result["images_per_s_per_device"] == pytest.approx(4 / result["bound_s"])


def test_all_reduce_is_costed_on_the_interconnect():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    x = jax.device_put(jnp.ones((2, 256), jnp.float32), sharded)
    ops = roofline.op_costs(_hlo(lambda a: jnp.sum(a, axis=0), x))
    comm = [o for o in ops if o.component == "collectives"]
    assert [o.opcode for o in comm] == ["all-reduce"] and comm[0].collective_bytes == 2 * 256 * 4


def test_tiny_train_step_matches_the_analytic_count(tiny_vae):
    from ov3 import flops
    from ov3.tools import summary
    from tests.helpers import tiny_config
    # OpenVision's two contrastive positives (the paper configs'): the text tower runs on both.
    cfg = tiny_config(tiny_vae.parent / "no-data", tiny_vae,
                      **{"loss.contrastive_texts": ("alt_text", "caption_sentence")})
    task = summary.abstract_task(cfg)
    compiled, _, _ = summary.compile_step(cfg, task, jax.devices()[:1], per_device_batch=4)
    ops = roofline.op_costs(compiled.as_text())
    per_example = {k: c.train for k, c in flops.task_costs(cfg, task).items()}
    got = {}
    for o in ops:
        got[o.component] = got.get(o.component, 0) + o.count * o.flops / 4
    print("\ncompiled / analytic FLOPs per example:",
          {k: round(got.get(k, 0) / v, 3) for k, v in per_example.items()})
    # Below the analytic count by what XLA drops as unused: the logvar half of the VAE encoder's
    # last convs (8% of this tiny VAE), the class token's last-block work nothing reads.
    for name in ("vae_encode", "vae_decode", "encoder", "decoder", "text", "caption"):
        assert 0.9 <= got[name] / per_example[name] <= 1.01, name
    total = sum(o.count * o.flops for o in ops) / 4
    assert total == pytest.approx(sum(per_example.values()), rel=0.05)
    assert "optimizer" in {o.component for o in ops}


def test_each_component_compiles_alone_with_the_analytic_flops(tiny_vae):
    # summary --component: one part of the step on one device, FLOPs as in the whole step
    from ov3 import flops
    from ov3.tools import summary
    from tests.helpers import tiny_config
    cfg = tiny_config(tiny_vae.parent / "no-data", tiny_vae, **{
        "loss.contrastive_texts": ("alt_text", "caption_sentence"), "loss.lpips": 0.5})
    task = summary.abstract_task(cfg)  # abstract LPIPS weights: nothing is read
    analytic = flops.task_costs(cfg, task)
    for name in summary.COMPONENTS:
        compiled, _ = summary.compile_component(cfg, task, name, jax.devices()[0], per_device_batch=2)
        ops = roofline.op_costs(compiled.as_text())
        got = sum(o.count * o.flops for o in ops) / 2
        assert 0.9 <= got / analytic[name].train <= 1.05, (name, got / analytic[name].train)
        assert name in {o.component for o in ops if o.flops}, name
