"""gs:// workdirs, end to end, against a real GCS API on loopback (fake-gcs-server: tests/gcs.py).

One uninterrupted run trains the tiny config with --workdir gs://ov3-test/stages/pretrain, its VAE
and tokenizer read from the bucket too (config.vae.path, config.data.tokenizer). Another run of
the same config is SIGKILLed while committing its last checkpoint (everything written, no
commit_success.txt yet): meanwhile another process (this one) reads its metrics.jsonl and
TensorBoard events from the bucket; the restart ignores the uncommitted step, resumes the one
before and ends bit-identical to the uninterrupted run. Then evaluate / export / embed / stages
read the uninterrupted run from the bucket and give what they give on a local copy of it.
ArrayRecord shards in a bucket: tests/test_data_convert.py (array_record reads gs:// itself).
"""

from __future__ import annotations

import io
import json
import os
import signal

import jax
import numpy as np
import pytest
from PIL import Image

from ov3 import checkpoint as ckpt_lib
from ov3 import metrics as metrics_lib
from ov3 import paths
from tests.helpers import make_assets
from tests.test_reliability import (EVERY, STEPS, assert_same_losses, launch_cmd, load_config, rows,
                                    run_to_end, saved_state, started)

pytestmark = pytest.mark.slow

BUCKET = "ov3-test"
# tests/test_reliability.py's config (so its compiled steps are reused) with the VAE and tokenizer in the bucket.
CONFIG = """
import pathlib
from tests.helpers import tiny_config

def get_config():
    return tiny_config(pathlib.Path({data!r}), "{bucket}/assets/vae", total_steps={steps}, checkpoint_every={every},
                       keep_checkpoints=3, **{{"optim.base_lr": 0.004, "data.read_threads": 1,
                                              "data.tokenizer": "{bucket}/assets/tokenizer.json"}})
"""


def upload(local: str | os.PathLike, remote: str) -> None:
    """A local file or folder (recursively) to gs://..."""
    local = paths.path(local)
    if local.is_file():
        paths.copy(local, remote)
        return
    for f in paths.files_under(local):
        paths.copy(f, f"{remote}/{f.relative_to(local)}")


def download(remote: str, local: str | os.PathLike) -> None:
    """gs://... (a folder, recursively) to a local folder."""
    root = paths.path(remote)
    for f in paths.files_under(root):
        target = paths.path(local) / f.relative_to(root)
        paths.makedirs(target.parent)
        paths.copy(f, target)


@pytest.fixture(scope="module")
def setup(gcs, tmp_path_factory):
    """(config file, bucket URL): the tiny config with its VAE and tokenizer in the bucket."""
    bucket = gcs.bucket(BUCKET)
    root = tmp_path_factory.mktemp("gcs")
    data, vae = make_assets(root)
    upload(vae, f"{bucket}/assets/vae")
    upload(data / "tokenizer.json", f"{bucket}/assets/tokenizer.json")
    path = root / "gcs_config.py"
    path.write_text(CONFIG.format(data=str(data), bucket=bucket, steps=STEPS, every=EVERY))
    return str(path), bucket


@pytest.fixture(scope="module")
def reference(setup) -> str:
    """The uninterrupted run, 1 process x 8 devices, written straight to the bucket."""
    config, bucket = setup
    workdir = f"{bucket}/stages/pretrain"
    run_to_end(1, 8, "--config", config, "--workdir", workdir)
    assert ckpt_lib.finished_steps(workdir) == [EVERY, STEPS]
    assert sorted(rows(paths.path(workdir))) == list(range(1, STEPS + 1))
    names = {p.name for p in paths.path(workdir).iterdir()}
    assert {"config.json", "tokenizer.json", "parameters.txt", f"reconstructions_{STEPS:06d}.png", "metrics.jsonl",
            "tensorboard", "checkpoints"} <= names, names
    return workdir


@pytest.fixture(scope="module")
def local_copy(reference, tmp_path_factory) -> str:
    """The same run downloaded: what every reader must agree with."""
    workdir = tmp_path_factory.mktemp("local_copy") / "run"
    download(reference, workdir)
    return str(workdir)


def test_sigkill_on_gcs_resumes_bit_identically_and_metrics_are_visible_mid_run(setup, reference):
    config, bucket = setup
    workdir = f"{bucket}/killed"
    args = ("--config", config, "--workdir", workdir)
    env = {"OV3_FAULTS": json.dumps({"pause_commit_step": STEPS})}
    with started(launch_cmd(1, 8, *args, module="tests.fault_injection"), env) as run:
        p0 = run.pid(0)
        run.wait_for(rf"^\[p0\] FAULT: pausing before committing checkpoint {STEPS}")
        # Another process (this one) watches the running job through the bucket.
        live = metrics_lib.read_jsonl(f"{workdir}/metrics.jsonl")
        events = list(paths.path(f"{workdir}/tensorboard").glob("events.out.tfevents.*"))
        step_dir = paths.path(workdir) / "checkpoints" / str(STEPS)
        written = {p.name for p in step_dir.iterdir()}
        assert run.proc.poll() is None, run.tail()
        os.kill(p0, signal.SIGKILL)
        run.finish(60)
    assert [r["step"] for r in live] == list(range(1, STEPS + 1))
    assert len(events) == 1 and events[0].stat().length > 1000, events
    # Checkpoint 8 was written in place, not committed: only step 4 counts.
    assert {"state", "data"} <= written and "commit_success.txt" not in written, written
    assert ckpt_lib.finished_steps(workdir) == [EVERY]
    assert_same_losses(rows(paths.path(workdir)), rows(paths.path(reference)), range(1, STEPS + 1), exact=True)

    again = run_to_end(1, 8, *args)
    assert f"resumed from {workdir}/checkpoints/{EVERY}" in again.output, again.tail()
    assert ckpt_lib.finished_steps(workdir) == [EVERY, STEPS]
    assert (step_dir / "commit_success.txt").exists()
    # The killed run's rows after step 4 were dropped from the object at the restart.
    assert_same_losses(rows(paths.path(workdir)), rows(paths.path(reference)), range(1, STEPS + 1), exact=True)
    got, want = saved_state(paths.path(workdir), STEPS), saved_state(paths.path(reference), STEPS)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_evaluate_reads_and_writes_the_bucket(reference, local_copy):
    from ov3 import evaluate
    step, remote, files = evaluate.evaluate(reference)
    _, local, _ = evaluate.evaluate(local_copy)
    assert step == STEPS and sorted(remote) == ["reconstruction", "retrieval"]
    assert [str(f) for f in files] == [f"{reference}/eval_{STEPS}.json", f"{reference}/eval_{STEPS}.md"]
    assert json.loads(files[0].read_text())["results"] == remote
    for name in local:
        for metric, value in local[name].items():
            if metric != "time_s":
                assert remote[name][metric] == value, (name, metric)


def test_export_from_the_bucket_equals_export_from_a_local_copy(reference, local_copy, tmp_path):
    from ov3.export.__main__ import export
    export(reference, tmp_path / "remote", "open_clip")
    export(local_copy, tmp_path / "local", "open_clip")
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert "open_clip_model.safetensors" in {str(f) for f in files}, files
    for f in files:
        if f.name != "README.md":  # the card names the workdir it came from
            assert (tmp_path / "remote" / f).read_bytes() == (tmp_path / "local" / f).read_bytes(), f


def test_embed_images_and_output_on_the_bucket(reference, local_copy, setup, tmp_path):
    from ov3 import embed
    _, bucket = setup
    rng = np.random.default_rng(0)
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(buf, format="PNG")
        (tmp_path / "images" / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / f"sub{i % 2}" / f"{i}.png").write_bytes(buf.getvalue())
    upload(tmp_path / "images", f"{bucket}/images")
    assert embed.embed(reference, f"{bucket}/images", f"{bucket}/emb/out.npy", tokens=True) == 3
    assert embed.embed(local_copy, tmp_path / "images", tmp_path / "out.npy", tokens=True) == 3
    for suffix in (".npy", ".tokens.npy"):
        got = np.load(io.BytesIO(paths.path(f"{bucket}/emb/out{suffix}").read_bytes()))
        np.testing.assert_array_equal(got, np.load(tmp_path / f"out{suffix}"))
    assert paths.path(f"{bucket}/emb/out.txt").read_text() == (tmp_path / "out.txt").read_text()


def test_stages_finetunes_from_the_bucket(setup, reference, capsys):
    """ov3.stages with DIR on gs://: the finished pretraining run (the reference) is skipped, and
    the fine-tuning run starts from its params, read from the bucket, and writes there too."""
    from ov3 import stages
    config, bucket = setup
    # The same config for both stages: the compiled step comes from the persistent cache.
    stages.run(load_config(config), load_config(config), f"{bucket}/stages")
    out = capsys.readouterr().out
    assert f"{reference} already reached step {STEPS}; skipping pretraining" in out
    assert f"initialised from {reference}/checkpoints/{STEPS}" in out
    finetune = f"{bucket}/stages/finetune"
    assert ckpt_lib.finished_steps(finetune) == [EVERY, STEPS]
    assert [r["step"] for r in metrics_lib.read_jsonl(f"{finetune}/metrics.jsonl")] == list(range(1, STEPS + 1))
    # It started from the pretrained params, not from scratch: its first loss is the one the
    # pretraining run reached, not the one it started with.
    first, pre = rows(paths.path(finetune))[1]["loss"], rows(paths.path(reference))
    assert abs(first - pre[STEPS]["loss"]) < abs(first - pre[1]["loss"]), (first, pre[1]["loss"], pre[STEPS]["loss"])


def test_lpips_weights_from_the_bucket(gcs, tmp_path):
    import torch

    from ov3.models import lpips, vae_weights
    bucket = gcs.bucket(BUCKET)
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(s).astype(np.float32) for k, s in lpips._expected().items()}
    vae_weights.write_safetensors(state, f"{bucket}/lpips/vgg.safetensors")
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, buf)
    paths.path(f"{bucket}/lpips/vgg.pth").write_bytes(buf.getvalue())
    for name in ("vgg.safetensors", "vgg.pth"):
        _, params = lpips.load_lpips(f"{bucket}/lpips/{name}")
        np.testing.assert_array_equal(np.asarray(params["features_0"]["kernel"]),
                                      state["features.0.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(np.asarray(params["lin4"]["kernel"])[:, 0],
                                      state["lin4.model.1.weight"].reshape(-1))


def test_resume_step_moves_later_checkpoints_aside_in_the_bucket(gcs):
    """config.resume_step on gs://: the later steps move to DIR/discarded_checkpoints (copied in
    the bucket, then deleted: GCS has no rename), and the resumed run sees only the earlier ones."""
    workdir = f"{gcs.bucket(BUCKET)}/resume"
    state = {"w": np.arange(6, dtype=np.float32)}
    checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
    for step in (1, 2, 3):
        checkpointer.save(step, jax.tree.map(lambda x: x * step, state), None)
    assert checkpointer.resume_step(1) == 1
    checkpointer.close()
    assert ckpt_lib.finished_steps(workdir) == [1]
    aside = paths.path(workdir) / "discarded_checkpoints"
    assert sorted(p.name for p in aside.iterdir()) == ["2", "3"]
    assert (aside / "3" / "commit_success.txt").exists()


def test_workdir_in_a_missing_bucket_is_one_message(gcs):
    from ov3 import train
    from ov3.errors import Ov3Error
    with pytest.raises(Ov3Error, match="gs://no-such-bucket/run is not writable"):
        train.prepare_workdir("gs://no-such-bucket/run")
    assert not paths.path("gs://no-such-bucket").exists()  # never created behind the user's back
