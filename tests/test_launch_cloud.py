"""launch/tpu_vm.sh and launch/slurm.sh executed for real against stand-in `gcloud` and
`sbatch`/`srun`/`scontrol`/`scancel` (tests/standins/): a 2-worker TPU slice and a 2-node SLURM
allocation played by local processes, each with the tiny config on fake CPU devices. Covered:
create -> install (both sides of the Python >= 3.11 check) -> a failing run showing every
worker's error -> run -> spot preemption mid-run -> `run --until-done` recreates the slice and
resumes -> logs -> stop -> delete; and sbatch -> srun tasks joined by jax.distributed's SLURM
detection -> SIGTERM -> save -> requeue -> resume. Every process is killed when a test ends."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from ov3 import metrics as metrics_lib
from ov3 import paths
from tests.helpers import make_assets
from tests import test_reliability
from tests.test_reliability import free_port, started

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
STANDINS = REPO / "tests" / "standins"
STEPS = test_reliability.STEPS  # the same tiny config and 2 x 4 layout: compiled once for both files


def steps_logged(workdir: pathlib.Path) -> list[int]:
    return sorted({r["step"] for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl")})


def wait_for_file(path: pathlib.Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and re.search(pattern, path.read_text(errors="replace"))):
        assert proc.poll() is None, f"exited ({proc.returncode}) before {pattern!r} in {path}"
        assert time.time() < deadline, f"no {pattern!r} in {path} within {timeout}s"
        time.sleep(0.5)


# ----------------------------------------------------------------------------- TPU VM

def running(pid: int) -> bool:
    """`pid` is a live process with ov3 on its command line (a zombie's is empty)."""
    try:
        return b"ov3" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


def gcloud(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(STANDINS / "gcloud"), "compute", "tpus", "tpu-vm", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=200)


@pytest.fixture
def slice_env(tmp_path):
    """The stand-in cloud: state folder, a bucket holding the data, the VAE and the config."""
    root = tmp_path / "cloud"
    bucket = f"ov3-test-{os.getpid()}"
    (root / "buckets" / bucket).mkdir(parents=True)
    make_assets(root / "buckets" / bucket)
    mounted = pathlib.Path("/tmp/gcs") / bucket  # where tpu_vm.sh mounts gs://BUCKET on every worker
    (root / "buckets" / bucket / "tiny.py").write_text(test_reliability.CONFIG.format(
        data=str(mounted / "data"), vae=str(mounted / "vae"), steps=STEPS, every=test_reliability.EVERY))
    env = {"PATH": f"{STANDINS}:{os.environ['PATH']}", "GCLOUD_STANDIN_DIR": str(root),
           "GCLOUD_STANDIN_PYTHON": sys.executable, "GCLOUD_STANDIN_GRACE_S": "120"}
    port = free_port()
    env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"  # the workers' coordinator: loopback only
    state = dict(env=env, root=root, bucket=bucket, mounted=mounted, port=port, tmp=tmp_path)
    yield state
    gcloud(env, "delete", "s", "--zone=z", "--quiet")  # kills whatever still runs on the slice
    if running(stale := state.get("stale", 0)):
        os.kill(stale, signal.SIGKILL)
    if mounted.is_symlink():
        mounted.unlink()


def test_tpu_vm_slice_lifecycle_with_preemption(slice_env, gcs):
    env, tmp = slice_env["env"], slice_env["tmp"]
    # The workdir is in the GCS stand-in, as on a real slice; a quote and a space: every value is quoted.
    logs, workdir = tmp / "logs", paths.path(gcs.bucket("ov3-runs")) / f"tpu-{os.getpid()}" / "run's dir"
    where = ["--name", "s", "--zone", "z"]

    def tpu(*args, extra_env=None, timeout=300):
        r = subprocess.run(["bash", str(REPO / "launch" / "tpu_vm.sh"), *where, *args], cwd=REPO,
                           env={**os.environ, **env, **(extra_env or {})}, capture_output=True, text=True,
                           timeout=timeout)
        return r.returncode, r.stdout + r.stderr

    def workers() -> list[pathlib.Path]:  # the slice's workers now (a recreated slice has new ones)
        return [pathlib.Path(p) for p in json.loads((slice_env["root"] / "tpus.json").read_text())["s"]["workers"]]

    # An image with python3.11 (custom image): found, no apt.
    rc, out = tpu("create", "--type", "v4-16", extra_env={"GCLOUD_STANDIN_IMAGE_PYTHON311": "1"})
    assert rc == 0, out
    rc, out = tpu("install", "--skip-pip")
    assert rc == 0, out
    assert out.count("ov3: installed with Python 3.11") == 2, out
    assert len(workers()) == 2 and not any((w / "apt.log").exists() for w in workers())
    assert not (workers()[0] / "home" / "ov3" / ".git").exists()
    assert (workers()[0] / "home" / "ov3" / "constraints.txt").exists()  # tracked files only

    job = ["--config", str(slice_env["mounted"] / "tiny.py"), "--workdir", str(workdir), "--mount",
           f"gs://{slice_env['bucket']}", "--port", str(slice_env["port"]), "--logs", str(logs)]
    # One broken worker: the launcher stops the others, shows that worker's error, exits with its status.
    broken = slice_env["root"] / "buckets" / slice_env["bucket"] / "broken.py"
    broken.write_text("import os, sys\nif os.environ['JAX_PROCESS_ID'] == '1':\n"
                      "    sys.exit('ov3: error: this host has no space left')\n" + (broken.parent / "tiny.py").read_text())
    rc, out = tpu("run", *job, "--config", str(slice_env["mounted"] / "broken.py"))
    assert rc == 1, out
    assert "[worker 1] ov3: error: this host has no space left" in out, out

    # A stale run on worker 0 (a process of an earlier launch, still holding the chips): stopped first.
    stale = gcloud(env, "ssh", "s", "--zone=z", "--worker=0", "--command=nohup python3.11 -c 'import time; "
                   "time.sleep(900)' ov3-stale >/dev/null 2>&1 & echo $! > ~/ov3.pid; echo $!; sleep 2")  # nohup: set up
    stale_pid = slice_env["stale"] = int(stale.stdout)

    # The run: spot preemption at step >= 2, --until-done recreates the slice (an image with
    # Python 3.10 this time: apt installs 3.11), reinstalls and resumes.
    cmd = ["bash", str(REPO / "launch" / "tpu_vm.sh"), "run", *where, *job, "--until-done", "--type", "v4-16",
           "--spot", "--skip-pip"]
    with started(cmd, env) as run:
        wait_for_file(logs / "worker-0.log", r"step 2/", run.proc)
        subprocess.run([str(STANDINS / "gcloud"), "_preempt", "s"], env={**os.environ, **env}, check=True,
                       timeout=200)
        assert run.finish(600) == 0, run.tail()
    assert f"ov3: stopping the stale run on this worker (pid {stale_pid})" in (logs / "worker-0.log").read_text()
    assert not running(stale_pid)
    assert "s is PREEMPTED after attempt 1: recreating and resuming" in run.output, run.tail()
    assert "finished on every worker (attempt 2)" in run.output, run.tail()
    assert steps_logged(workdir) == list(range(1, STEPS + 1))
    w0, w1 = ((logs / f"worker-{i}.log").read_text() for i in (0, 1))
    stop = int(re.search(r"stop requested: saved step (\d+)", w0).group(1))
    assert f"stop requested: saved step {stop}" in w1 and 2 <= stop < STEPS
    assert f"resumed from {workdir / 'checkpoints' / str(stop)}" in w0
    for w in workers():  # the recreated slice: Python 3.10 image -> apt's python3.11; data mounted read-only
        apt = (w / "apt.log").read_text()
        assert "add-apt-repository -y ppa:deadsnakes/ppa" in apt and "install -y -q python3.11 python3.11-venv" in apt
        fuse = (w / "gcsfuse.log").read_text()
        assert "-o ro --implicit-dirs" in fuse and "--metadata-cache-ttl-secs=-1" in fuse

    rc, out = tpu("logs", "--logs", str(logs), "--lines", "5")
    assert rc == 0 and "worker-0.log <==" in out and "worker-1.log <==" in out, out
    assert tpu("stop")[0] == 0
    assert gcloud(env, "describe", "s", "--zone=z", "--format=value(state)").stdout.strip() == "STOPPED"
    rc, out = tpu("delete")
    assert rc == 0, out
    r = gcloud(env, "describe", "s", "--zone=z")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


# ----------------------------------------------------------------------------- SLURM and one GPU node

@pytest.fixture
def tiny(tmp_path) -> pathlib.Path:
    data, vae = make_assets(tmp_path)
    path = tmp_path / "tiny.py"
    path.write_text(test_reliability.CONFIG.format(data=str(data), vae=str(vae), steps=STEPS,
                                                   every=test_reliability.EVERY))
    return path


def test_slurm_two_nodes_sigterm_requeue_resumes(tiny, tmp_path):
    env = {**os.environ, "PATH": f"{STANDINS}:{os.environ['PATH']}", "SLURM_STANDIN_DIR": str(tmp_path / "slurm"),
           "PYTHON": sys.executable}
    workdir = tmp_path / "run"
    r = subprocess.run(["bash", str(REPO / "launch" / "slurm.sh"), "--nodes", "2", "--gpus-per-node", "1",
                        "--config", str(tiny), "--workdir", str(workdir)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    job = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)

    def show() -> str:
        return subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout

    logs = workdir / "logs"
    try:
        deadline = time.time() + 600
        while not re.search(r"step 2/", (logs / f"{job}-0-0.log").read_text() if (logs / f"{job}-0-0.log").exists()
                            else ""):
            assert "JobState=RUNNING" in show() and time.time() < deadline, show()
            time.sleep(0.5)
        # What preemption or --signal=TERM@120 does: SIGTERM to every task of the job.
        subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True)
        while "JobState=RUNNING" in show() or "JobState=PENDING" in show():
            assert time.time() < deadline, show()
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], env=env)  # the job runner and its tasks, if still there
    assert "JobState=COMPLETED" in show() and "Restarts=1" in show(), show()
    first = [(logs / f"{job}-0-{t}.log").read_text() for t in (0, 1)]
    stop = int(re.search(r"stop requested: saved step (\d+)", first[0]).group(1))
    assert f"stop requested: saved step {stop}" in first[1] and stop < STEPS
    assert f"resumed from {workdir / 'checkpoints' / str(stop)}" in (logs / f"{job}-1-0.log").read_text()
    assert (logs / f"{job}-1-1.log").exists()
    assert "requeueing" in (logs / f"slurm-{job}.out").read_text()
    # One process group of 2 (jax's SLURM detection): only process 0 writes metrics, every step once.
    assert sorted(test_reliability.rows(workdir)) == list(range(1, STEPS + 1))


def test_gpu_node_sigterm_saves_and_logs(tiny, tmp_path):
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    cmd = ["bash", str(REPO / "launch" / "gpu.sh"), "--logs", str(logs), "--config", str(tiny), "--workdir",
           str(workdir)]
    with started(cmd, {"PYTHON": sys.executable}) as run:  # the test's 8 CPU devices play the node's GPUs
        run.wait_for(r"^step 2/")
        run.proc.send_signal(signal.SIGTERM)  # to the script's pid: ov3 replaced it
        assert run.finish() == 0, run.tail()
    (log,) = logs.glob("gpu-*.log")
    stop = int(re.search(r"stop requested: saved step (\d+)", log.read_text()).group(1))
    assert (workdir / "checkpoints" / str(stop)).exists()
