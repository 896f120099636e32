"""launch/*.sh: syntax, and the commands their --dry-run prints."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = ("tpu_vm.sh", "gpu.sh", "slurm.sh")


def dry(script: str, *args: str) -> list[str]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # kept, GPU flags appended
    env.pop("PYTHON", None)
    out = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args], capture_output=True, text=True,
                         check=True, timeout=30, env=env)
    return out.stdout.splitlines()


@pytest.mark.parametrize("script", SCRIPTS + ("_common.sh",))
def test_syntax_and_strict_mode(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
    text = (LAUNCH / script).read_text()
    assert script == "_common.sh" or "set -euo pipefail" in text
    assert "PRIVATE KEY" not in text and "token=" not in text.lower()


def test_tpu_vm_lifecycle():
    """The commands; tests/test_launch_cloud.py runs them against a stand-in gcloud."""
    where = ("--name", "ov3-b", "--zone", "us-central2-b")
    (create,) = dry("tpu_vm.sh", "create", *where, "--type", "v4-256", "--spot")
    assert create == ("+ gcloud compute tpus tpu-vm create ov3-b --zone=us-central2-b --accelerator-type=v4-256 "
                      "--version=tpu-ubuntu2204-base --spot")
    archive, scp, *install = dry("tpu_vm.sh", "install", *where)
    assert " archive " in archive and "--worker=all" in scp and "--worker=all" in install[0]
    install = "\n".join(install)
    for part in ("python3.11 python3.11-venv", "pip install -q -c constraints.txt -e . \"jax[tpu]\"", "gcsfuse"):
        assert part in install, part
    describe, train = dry("tpu_vm.sh", "run", *where, "--model", "l", "--workdir", "gs://bkt/runs/l", "--mount",
                          "gs://data-bkt", "--", "--pretrain_config.data.path=/tmp/gcs/data-bkt/recap")
    assert describe.startswith("+ gcloud compute tpus tpu-vm describe ov3-b") and "networkEndpoints" in describe
    for part in ("--worker=0", "gcsfuse -o ro --implicit-dirs", "data-bkt /tmp/gcs/data-bkt",
                 "JAX_COORDINATOR_ADDRESS=", "JAX_PROCESS_ID=0",
                 "-m ov3.stages --pretrain_config=configs/ov3_l.py:pretrain",
                 "--finetune_config=configs/ov3_l.py:finetune --workdir=gs://bkt/runs/l",
                 "--pretrain_config.data.path=/tmp/gcs/data-bkt/recap"):
        assert part in train, part
    (delete,) = dry("tpu_vm.sh", "delete", *where)
    assert delete == "+ gcloud compute tpus tpu-vm delete ov3-b --zone=us-central2-b --quiet"


def test_tpu_vm_errors_name_the_flag():
    r = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--dry-run", "run", "--name", "x", "--zone", "z",
                        "--config", "c", "--workdir", "runs/x"], capture_output=True, text=True)
    assert r.returncode == 2 and "gs://BUCKET/PATH" in r.stderr
    r = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--dry-run", "run", "--name", "x", "--zone", "z",
                        "--config", "c", "--workdir", "gs://b/x", "--mount", "gs://b/data"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--mount takes a bucket" in r.stderr
    r = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "create", "--name", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "missing --zone" in r.stderr


@pytest.mark.parametrize("script,first", [("gpu.sh", ()), ("slurm.sh", ("--nodes", "2")),
                                          ("tpu_vm.sh", ("run", "--name", "x", "--zone", "z"))])
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
    *install, train = dry("gpu.sh", "--install", "--gpus", "0,1", "--config", "configs/ov3_b.py:pretrain",
                          "--workdir", "runs/b", "--", "--config.batch_size=64")
    (pip,) = [line for line in install if " install " in line]  # after `-m venv .venv` where there is none
    assert f"-c {LAUNCH.parent}/constraints.txt -e {LAUNCH.parent} 'jax[cuda12]'" in pip
    assert train.startswith("+ exec env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 ")
    assert train.endswith("--xla_gpu_enable_latency_hiding_scheduler=true' CUDA_VISIBLE_DEVICES=0,1 "
                          f"{LAUNCH.parent}/.venv/bin/python -m ov3.main --config=configs/ov3_b.py:pretrain "
                          "--workdir=runs/b --config.batch_size=64")


def test_slurm_multi_node():
    out = dry("slurm.sh", "--nodes", "4", "--partition", "gpu", "--model", "b", "--workdir", "/shared/b")
    text = "\n".join(out)
    for part in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=TERM@120", "set -euo pipefail",
                 "srun --kill-on-bad-exit=1 --output=/shared/b/logs/%j-$restart-%t.log "
                 f"{LAUNCH.parent}/.venv/bin/python -m ov3.stages --pretrain_config=configs/ov3_b.py:pretrain",
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert part in text, part
    assert out[-1].startswith("+ sbatch")
