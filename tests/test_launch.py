"""launch/*.sh: syntax, and the commands their --dry-run prints."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = ("tpu_vm.sh", "gpu.sh", "slurm.sh")


def dry(script: str, *args: str) -> list[str]:
    out = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args], capture_output=True, text=True,
                         check=True, timeout=30)
    return out.stdout.splitlines()


@pytest.mark.parametrize("script", SCRIPTS + ("_common.sh",))
def test_syntax_and_strict_mode(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
    text = (LAUNCH / script).read_text()
    assert script == "_common.sh" or "set -euo pipefail" in text
    assert "PRIVATE KEY" not in text and "token=" not in text.lower()


def test_tpu_vm_lifecycle():
    where = ("--name", "ov3-b", "--zone", "us-central2-b")
    (create,) = dry("tpu_vm.sh", "create", *where, "--type", "v4-256", "--spot")
    assert create == ("+ gcloud compute tpus tpu-vm create ov3-b --zone=us-central2-b --accelerator-type=v4-256 "
                      "--version=tpu-ubuntu2204-base --spot")
    tar, scp, install = dry("tpu_vm.sh", "install", *where)
    assert "--exclude=.venv" in tar and "--worker=all" in scp and "--worker=all" in install
    assert "jax[tpu]==" in install and "gcsfuse" in install
    describe, train = dry("tpu_vm.sh", "stages", *where, "--model", "l", "--workdir", "gs://bkt/runs/l", "--",
                          "--pretrain_config.vae.path=/data/ae.safetensors")
    assert describe.startswith("+ gcloud compute tpus tpu-vm describe ov3-b") and "networkEndpoints" in describe
    for part in ("--worker=all", "gcsfuse --implicit-dirs bkt /gcs/bkt", "JAX_COORDINATOR_ADDRESS=",
                 "-m ov3.stages --pretrain_config=configs/ov3_l.py:pretrain",
                 "--finetune_config=configs/ov3_l.py:finetune --workdir=/gcs/bkt/runs/l",
                 "--pretrain_config.vae.path=/data/ae.safetensors"):
        assert part in train, part
    (train_one,) = dry("tpu_vm.sh", "train", *where, "--config", "configs/ov3_b.py:finetune,res=224",
                       "--workdir", "gs://bkt/x")[1:]
    assert "-m ov3.main --config=configs/ov3_b.py:finetune,res=224 --workdir=/gcs/bkt/x" in train_one
    (delete,) = dry("tpu_vm.sh", "delete", *where)
    assert delete == "+ gcloud compute tpus tpu-vm delete ov3-b --zone=us-central2-b --quiet"


def test_tpu_vm_errors_name_the_flag():
    r = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--dry-run", "train", "--name", "x", "--zone", "z",
                        "--config", "c", "--workdir", "/local/dir"], capture_output=True, text=True)
    assert r.returncode == 2 and "gs://BUCKET/PATH" in r.stderr
    r = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "create", "--name", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "missing --zone" in r.stderr


@pytest.mark.parametrize("script,first", [("gpu.sh", ()), ("slurm.sh", ("--nodes", "2")),
                                          ("tpu_vm.sh", ("stages", "--name", "x", "--zone", "z"))])
def test_every_launcher_checks_what_to_run_the_same_way(script, first):
    def err(*args):
        r = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *first, *args], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2, r
        return r.stderr
    assert "--model must be b or l" in err("--model", "xl", "--workdir", "gs://b/w")
    assert "--workdir needs a value" in err("--model", "b", "--workdir")
    assert "missing --workdir" in err("--model", "b")


def test_gpu_node():
    install, train = dry("gpu.sh", "--install", "--gpus", "0,1", "--config", "configs/ov3_b.py:pretrain",
                         "--workdir", "runs/b", "--", "--config.batch_size=64")
    assert "jax[cuda12]==" in install
    assert train == ("+ env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "
                     "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true CUDA_VISIBLE_DEVICES=0,1 "
                     ".venv/bin/python -m ov3.main --config=configs/ov3_b.py:pretrain --workdir=runs/b "
                     "--config.batch_size=64")


def test_slurm_multi_node():
    out = dry("slurm.sh", "--nodes", "4", "--partition", "gpu", "--model", "b", "--workdir", "/shared/b")
    text = "\n".join(out)
    for part in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "set -euo pipefail",
                 "srun --kill-on-bad-exit=1 .venv/bin/python -m ov3.stages "
                 "--pretrain_config=configs/ov3_b.py:pretrain"):
        assert part in text, part
    assert out[-1].startswith("+ sbatch")
