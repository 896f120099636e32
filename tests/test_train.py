"""The train step and loop on tiny real parts: sharding invariance, exact resume, NaN guard."""

from __future__ import annotations

import json
import re
import shutil

import jax
import numpy as np
import pytest

from ov3 import checkpoint as ckpt_lib
from ov3 import metrics as metrics_lib
from ov3 import sharding, train
from ov3.data import pipeline
from ov3.errors import Ov3Error
from tests.helpers import make_assets, tiny_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def run_steps(cfg, mesh_axes, devices, num_steps=3):
    """Losses of `num_steps` steps and the final params, on a mesh over `devices`."""
    cfg.mesh.update(mesh_axes)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    task, tokenizer = train.build_task(cfg)
    trainer = train.Trainer(cfg, mesh, task)
    state, frozen = trainer.init_state(), trainer.put_frozen(task.frozen_params())
    data = pipeline.make_iterator(cfg.data, mesh=mesh, global_batch_size=cfg.batch_size,
                                  image_size=cfg.image_size, split="train", train=True, seed=cfg.seed,
                                  tokenizer=tokenizer)
    losses = []
    for _ in range(num_steps):
        state, metrics = trainer.step(state, frozen, next(data))
        losses.append({k: float(v) for k, v in metrics.items()})
    return losses, jax.device_get(state.params)


def test_sharded_equals_unsharded(assets):
    data, vae = assets
    base_lr = 0.004  # small steps: Adam turns float-rounding noise in near-zero grads into +-lr
    devices = jax.devices()
    assert len(devices) == 8, "conftest sets 8 fake CPU devices"
    ref_losses, ref_params = run_steps(tiny_config(data, vae, **{"optim.base_lr": base_lr}), dict(data=1, fsdp=1, tensor=1), devices[:1])
    for axes in (dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)):
        losses, params = run_steps(tiny_config(data, vae, **{"optim.base_lr": base_lr}), axes, devices)
        for got, want in zip(losses, ref_losses):
            for key in ("loss", "loss/contrastive", "loss/caption", "loss/rec_pixel_l1", "loss/rec_latent_l1"):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=f"{axes} {key}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params, ref_params)
    # and the loss moved: the step really updates every tower
    assert ref_losses[-1]["loss"] < ref_losses[0]["loss"]


def test_params_are_sharded_by_the_rules(assets):
    data, vae = assets
    cfg = tiny_config(data, vae)
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), train.build_task(cfg)[0])
    qkv = trainer.state_shardings.params["encoder"]["transformer"]["resblocks"]["attn"]["qkv_kernel"]
    assert tuple(qkv.spec) == (None, "fsdp", None, "tensor", None)
    # the optimizer's moments follow their params; the VAE is not in the optimizer state
    mu = trainer.state_shardings.opt_state[1][0].mu["encoder"]["conv1"]["kernel"]
    assert tuple(mu.spec) == (None, None, None, "fsdp")
    assert "vae" not in str(jax.tree_util.tree_structure(trainer.abstract_state))


def test_a_mesh_that_cannot_split_the_model_says_so(assets, capsys):
    """tensor=8 cannot split the tiny model's 4 heads: the attention weights stay whole on every
    device, and the trainer says how much and why (a divisible mesh says nothing)."""
    data, vae = assets
    cfg = tiny_config(data, vae)
    for axes, warned in ((dict(data=1, fsdp=1, tensor=8), True), (dict(data=2, fsdp=2, tensor=2), False)):
        cfg.mesh.update(axes)
        train.Trainer(cfg, sharding.make_mesh(cfg.mesh), train.build_task(cfg)[0])
        out = capsys.readouterr().out
        assert bool(re.search(r"warning: \S+ GiB \(\d+%\) of the train state is not split where the rules say "
                              r"\(dim 4 over tensor=8[,:]", out)) == warned, out


def read_losses(workdir):
    return {row["step"]: row for row in metrics_lib.read_jsonl(workdir / "metrics.jsonl")}


def test_resume_is_exact(assets, tmp_path):
    """4 steps straight == 2 steps, a fresh start from that checkpoint, 2 more steps (the straight run
    also writes a reconstruction grid every 2 steps: it changes nothing the run computes)."""
    data, vae = assets
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train(tiny_config(data, vae, recon_grid_every=2), straight)
    # The interrupted run: the same directory as it stood after step 2's checkpoint.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    rows = [r for r in metrics_lib.read_jsonl(resumed / "metrics.jsonl") if r["step"] <= 2]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ckpt_lib.Checkpointer(resumed).latest_step() == 2
    train.train(tiny_config(data, vae), resumed)

    a, b = read_losses(straight), read_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "loss/contrastive", "loss/caption", "loss/rec_pixel_l1", "lr", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    trainer_cfg = tiny_config(data, vae)
    abstract = train.Trainer(trainer_cfg, sharding.make_mesh(trainer_cfg.mesh),
                             train.build_task(trainer_cfg)[0]).abstract_state
    pa = ckpt_lib.Checkpointer(straight).restore(4, abstract, None)
    pb = ckpt_lib.Checkpointer(resumed).restore(4, abstract, None)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), pa, pb)
    assert (straight / "reconstructions_000002.png").exists() and (straight / "reconstructions_000004.png").exists()
    assert json.loads((straight / "config.json").read_text())["model"]["encoder"] == "mu/2"
    # clu's parameter table: one row per trainable tensor (the VAE is frozen: not there), with its mesh axes.
    table = (straight / "parameters.txt").read_text()
    n = sum(x.size for x in jax.tree.leaves(abstract.params))
    assert f"Total: {n:,}" in table and "vae" not in table
    assert re.search(r"\| encoder/transformer/resblocks/attn/qkv_kernel +\| \(2, 64, 3, 4, 16\) .*\| \(None, 'fsdp', None, 'tensor', None\) +\|", table), table[:2000]


def test_checkpoint_of_another_model_is_a_clear_error(assets, tmp_path):
    data, vae = assets
    train.train(tiny_config(data, vae, total_steps=2), tmp_path)
    before = {f: (tmp_path / f).read_text() for f in ("config.json", "config.0.json", "parameters.txt")}
    bigger = tiny_config(data, vae, total_steps=3, **{"model.text": "S"})
    with pytest.raises(Ov3Error, match=r"(?s)does not fit the configured model .*params/text/.*saved \(.*expected"):
        train.train(bigger, tmp_path)
    # The refused resume wrote nothing: the error's advice (DIR/config.json) and export still hold.
    assert {f: (tmp_path / f).read_text() for f in before} == before
    assert json.loads(before["config.json"])["model"]["text"] == "mu"
    assert sorted(p.name for p in tmp_path.glob("config.*.json")) == ["config.0.json"]


def test_damaged_checkpoint_is_named_and_resume_step_goes_back(assets, tmp_path):
    """A committed step whose array files lost their second half: one Ov3Error naming the step
    and the fix; resume_step=2 then continues from step 2, the damaged step moved aside."""
    data, vae = assets
    train.train(tiny_config(data, vae), tmp_path)
    straight = read_losses(tmp_path)
    for f in (tmp_path / "checkpoints" / "4" / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    with pytest.raises(Ov3Error, match=rf"^checkpoint {tmp_path / 'checkpoints' / '4'} is damaged \(.+\); "
                                       r"resume from an earlier one with --config.resume_step=2 \(complete: \[2\]\)\.$"):
        train.train(tiny_config(data, vae, total_steps=6), tmp_path)
    train.train(tiny_config(data, vae, resume_step=2), tmp_path)
    assert (tmp_path / "discarded_checkpoints" / "4").is_dir()
    assert ckpt_lib.Checkpointer(tmp_path).latest_step() == 4
    # The log was cut back to step 2 before the resumed run wrote steps 3 and 4 again.
    assert [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    resumed = read_losses(tmp_path)
    for step in (3, 4):
        assert resumed[step]["loss"] == straight[step]["loss"], step
    assert (tmp_path / "config.2.json").is_file()
    with pytest.raises(Ov3Error, match=r"config.resume_step=3: .* has no complete checkpoint 3; it has \[2, 4\]"):
        train.train(tiny_config(data, vae, resume_step=3), tmp_path)


def test_evaluator_crash_at_a_checkpoint_step_loses_nothing(assets, tmp_path):
    """The step is saved before its evaluators run: one that fails there (here: a registered
    evaluator raising, as a probe running out of memory would) ends the run with step 2 saved."""
    from ov3.evals import base

    @base.register("test_crash")
    class Crash(base.Evaluator):
        def run(self, params, frozen):
            raise RuntimeError("RESOURCE_EXHAUSTED: injected evaluator failure")

    data, vae = assets
    cfg = tiny_config(data, vae)
    cfg.evals.boom = dict(type="test_crash", every=2)
    try:
        with pytest.raises(RuntimeError, match="injected evaluator failure"):
            train.train(cfg, tmp_path)
    finally:
        del base.REGISTRY["test_crash"]
    assert ckpt_lib.Checkpointer(tmp_path).latest_step() == 2


def test_out_of_memory_and_full_disk_are_one_line(assets, tmp_path):
    """A real XLA allocation failure (a 1 TiB buffer on the CPU backend) and a real ENOSPC
    (metrics.jsonl on /dev/full) in the middle of a run: each explained in one line."""
    data, vae = assets
    cfg = tiny_config(data, vae, batch_size=16, **{"model.remat": "none"})
    try:
        jax.jit(lambda: jax.numpy.ones((2 ** 38,), jax.numpy.float32))().block_until_ready()
    except Exception as e:  # noqa: BLE001 - whatever XLA raises is what the CLI sees
        oom = train.explain_failure(e, cfg, str(tmp_path))
    assert oom is not None and "\n" not in oom, oom
    assert re.match(r"out of device memory \(RESOURCE_EXHAUSTED: Out of memory allocating 1099511627776 bytes\.?\) "
                    r"with batch_size=16 \(2 per device over 8 batch-sharded devices\) and model.remat='none': ", oom), oom
    train.train(tiny_config(data, vae, total_steps=2), tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(OSError) as raised:
        train.train(tiny_config(data, vae), tmp_path)
    full = train.explain_failure(raised.value, cfg, str(tmp_path))
    assert full == (f"disk full while writing to {tmp_path} ([Errno 28] No space left on device); the last complete "
                    "checkpoint, step 2, stays: free space there and run the same command to resume from it."), full


def test_nonfinite_loss_stops_with_the_terms(assets, tmp_path):
    data, vae = assets
    with pytest.raises(Ov3Error, match=r"non-finite loss or gradient at step 1: .*lr=nan"):
        train.train(tiny_config(data, vae, **{"optim.base_lr": float("nan")}), tmp_path)


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Ov3Error, match="is not writable"):
        train.prepare_workdir(blocker / "sub")
    with pytest.raises(Ov3Error, match="only local paths and gs://"):  # gs:// itself: tests/test_gcs.py
        train.prepare_workdir("s3://bucket/run")
