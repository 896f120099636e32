"""Reliability at pod scale, proven on CPU with real processes on 127.0.0.1 (launch/local.sh).

One straight 1 process x 8 devices run is the reference for every comparison: a run on
2 processes x 4 devices gives the same losses; SIGTERM to one process stops all of them at one
step with a checkpoint and the restart continues the same trace; SIGKILL while a checkpoint is
being committed leaves the previous one, which a restart continues from; a checkpoint restores
on other meshes and process counts with the same params; user mistakes end every process with
one message and exit status 2; a non-finite step stops (or is skipped and counted).

Every run is bounded (RUN_TIMEOUT_S) and its whole process group is killed when a test ends,
however it ends. Subprocesses inherit the persistent compilation cache from conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from ov3 import metrics as metrics_lib
from tests.helpers import free_port, make_assets

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "local.sh"
RUN_TIMEOUT_S = 420  # per run; a run takes ~15-60 s on 2 idle cores
STEPS, EVERY = 8, 4  # total_steps, checkpoint_every of every run here
LOSS_KEYS = ("loss", "loss/contrastive", "loss/caption", "loss/rec_pixel_l1", "loss/rec_latent_l1", "grad_norm")
TOL = dict(rtol=1e-5, atol=1e-6)

CONFIG = """
import pathlib
from tests.helpers import tiny_config

def get_config():
    # base_lr 0.004: Adam turns float-rounding noise in near-zero grads into +-lr (see test_train).
    return tiny_config(pathlib.Path({data!r}), pathlib.Path({vae!r}), total_steps={steps}, checkpoint_every={every},
                       keep_checkpoints=3, **{{"optim.base_lr": 0.004, "data.read_threads": 1}})
"""


# ----------------------------------------------------------------------------- harness

class Run:
    """A launched command in its own process group; output collected line by line."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None):
        self.cmd = cmd
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def tail(self, n: int = 60) -> str:
        shown = [line for line in self.lines if not re.match(r"(\[p\d+\] )?[IW]\d{4} ", line)]  # absl INFO/WARN
        return "\n".join(shown[-n:])

    def wait_for(self, pattern: str, timeout: float = RUN_TIMEOUT_S) -> re.Match:
        deadline, seen = time.time() + timeout, 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := re.search(pattern, line):
                        return m
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"exited ({self.proc.returncode}) before {pattern!r}:\n{self.tail()}")
                if time.time() > deadline:
                    raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.tail()}")
                self._cond.wait(1.0)

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout}s: {self.cmd}\n{self.tail()}") from None
        self._reader.join(30)
        return rc

    def pid(self, process: int) -> int:
        return int(self.wait_for(rf"^\[launch\] p{process} pid (\d+)", 60).group(1))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def started(cmd: list[str], env: dict[str, str] | None = None):
    run = Run(cmd, env)
    try:
        yield run
    finally:
        run.kill()  # the launcher, its workers and anything they started: one process group
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.proc.wait(30)


def launch_cmd(processes: int, devices: int, *args: str, module: str | None = None) -> list[str]:
    extra = ["--module", module] if module else []
    return ["bash", str(LAUNCH), "--processes", str(processes), "--devices-per-process", str(devices), *extra,
            "--", *args]


def run_to_end(processes: int, devices: int, *args: str, env: dict | None = None, module: str | None = None,
               expect: int = 0) -> Run:
    with started(launch_cmd(processes, devices, *args, module=module), env) as run:
        rc = run.finish()
    assert rc == expect, f"exit status {rc}, expected {expect}:\n{run.tail()}"
    return run


def rows(workdir: pathlib.Path, unique: bool = True) -> dict[int, dict]:
    """metrics.jsonl by step; `unique`: every step logged once (only process 0 writes)."""
    table = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    steps = [r["step"] for r in table]
    if unique:
        assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r for r in table}  # the last row of a step wins (a crashed run's are overwritten)


def assert_same_losses(got: dict, want: dict, steps, exact: bool = False) -> float:
    """Per-step loss terms equal (exactly, or to TOL); returns the largest relative difference."""
    worst = 0.0
    for step in steps:
        for key in LOSS_KEYS:
            a, b = got[step][key], want[step][key]
            if exact:
                assert a == b, (step, key, a, b)
            else:
                np.testing.assert_allclose(a, b, **TOL, err_msg=f"step {step} {key}")
            worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    return worst


def saved_state(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """The train state of checkpoint `step` as host arrays, by parameter path (no model needed)."""
    import jax
    import orbax.checkpoint as ocp
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def steps_on_disk(workdir: pathlib.Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name[0].isdigit())


def copy_run(src: pathlib.Path, dst: pathlib.Path, upto: int) -> pathlib.Path:
    """`src` as it stood after checkpoint `upto`: later checkpoints and metrics rows dropped."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tensorboard", "*.png"))
    for p in (dst / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > upto:
            shutil.rmtree(p)
    kept = [r for r in metrics_lib.read_jsonl(dst / "metrics.jsonl") if r["step"] <= upto]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return dst


def load_config(path: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def no_traceback(run: Run) -> None:
    assert "Traceback" not in run.output, run.tail()


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("reliability")
    data, vae = make_assets(root)
    path = root / "tiny_config.py"
    path.write_text(CONFIG.format(data=str(data), vae=str(vae), steps=STEPS, every=EVERY))
    return str(path)


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> pathlib.Path:
    """The straight run every other run is compared with: 1 process x 8 devices (data=8)."""
    workdir = tmp_path_factory.mktemp("reference")
    run = run_to_end(1, 8, "--config", config, "--workdir", str(workdir))
    assert steps_on_disk(workdir) == ["4", "8"]
    # Two checkpoint saves, yet no absl INFO line (orbax logs dozens per save): off by default.
    assert not re.search(r"^\[p0\] I\d{4} ", run.output, re.M), run.output[:3000]
    assert sorted(rows(workdir)) == list(range(1, STEPS + 1))
    return workdir


# ----------------------------------------------------------------------------- 1. the launcher

SLEEPER = """
import os, pathlib, signal, sys, time
me, fail = int(os.environ["JAX_PROCESS_ID"]), sys.argv[1:] == ["fail"]
# With "fail", process 0 ignores SIGTERM (the launcher must SIGKILL it) and process 1 exits 3
# once process 0 is set up.
signal.signal(signal.SIGTERM, (lambda *_: None) if fail else (lambda *_: (print("bye", flush=True), sys.exit(0))))
print("ready", me, os.environ["JAX_NUM_PROCESSES"], os.environ["JAX_COORDINATOR_ADDRESS"],
      os.environ["JAX_PLATFORMS"], os.environ["XLA_FLAGS"], flush=True)
flag = pathlib.Path(os.environ["SLEEPER_DIR"]) / "p0_ready"
if me == 0:
    flag.touch()
elif fail:
    while not flag.exists():
        time.sleep(0.05)
    sys.exit(3)
while True:
    time.sleep(0.1)
"""


def test_launcher_streams_forwards_signals_and_stops_all_on_failure(tmp_path):
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    env = {"PYTHONPATH": str(tmp_path), "OV3_KILL_GRACE_S": "1", "SLEEPER_DIR": str(tmp_path)}
    with started(launch_cmd(2, 3, module="sleeper"), env) as run:
        for p in (0, 1):
            m = run.wait_for(rf"^\[p{p}\] ready {p} 2 127\.0\.0\.1:(\d+) cpu "
                             r".*--xla_force_host_platform_device_count=3$", 60)
        assert run.output.count("device_count") == 2  # the test env's own device flag (8) was replaced
        run.proc.send_signal(signal.SIGTERM)  # preemption notice to the launcher: every process gets it
        assert run.finish(60) == 0, run.tail()
        assert "[p0] bye" in run.output and "[p1] bye" in run.output
        assert int(m.group(1)) > 0
    (tmp_path / "p0_ready").unlink()
    t0 = time.time()
    with started(launch_cmd(2, 1, "fail", module="sleeper"), env) as run:
        assert run.finish(60) == 3, run.tail()  # p1's own status, though p0 had to be SIGKILLed
    assert "[launch] p1 exited with status 3" in run.output
    assert "[launch] p0 exited with status 137" in run.output
    assert time.time() - t0 < 30


SLOW_EXIT = """
import time
import jax
from ov3 import sharding
sharding.maybe_initialize_distributed()
me = jax.process_index()
print("skipped", sharding.sum_over_processes({"corrupt_image": me + 1, "empty_text": 10 * me}), flush=True)
sharding.sync_processes("work_done")
t0 = time.monotonic()
sharding.shutdown_distributed()
if me == 0:
    print(f"service stopped after {time.monotonic() - t0:.2f}s", flush=True)
else:
    time.sleep(2)  # a slow exit: process 0 must keep serving until this process has gone
"""


def test_coordinator_outlives_the_other_processes_at_shutdown(tmp_path):
    """Process 0 stops the coordination service only once the others have left (stopping it
    under a last RPC aborts process 0 in gRPC: a finished run exiting 134); counts sum over
    processes."""
    (tmp_path / "slow_exit.py").write_text(SLOW_EXIT)
    run = run_to_end(2, 1, module="slow_exit", env={"PYTHONPATH": str(tmp_path)})
    waited = float(run.wait_for(r"^\[p0\] service stopped after ([\d.]+)s", 5).group(1))
    assert 1.5 < waited < 10, run.tail()
    # Per-process counts (e.g. skipped examples) are logged as their sum over processes.
    for p in (0, 1):
        assert f"[p{p}] skipped {{'corrupt_image': 3, 'empty_text': 10}}" in run.output, run.tail()


def test_process_share_is_its_block_of_every_global_batch(config):
    """Step 3 of ov3.data.pipeline: process p reads rows [p*B/P, (p+1)*B/P) of each global batch."""
    from ov3.data import pipeline
    data_cfg = load_config(config).data

    def batches(p, count, n=6):
        it = pipeline.make_process_iterator(data_cfg, mesh=None, global_batch_size=16, image_size=16,
                                            split="train", train=True, seed=0, tokenizer=None,
                                            process_index=p, process_count=count)
        return [next(it) for _ in range(n)]  # 6 x 16 > 64 examples: crosses an epoch

    whole = batches(0, 1)
    for count in (2, 4):
        shares = [batches(p, count) for p in range(count)]
        for k, batch in enumerate(whole):
            for key in batch:
                np.testing.assert_array_equal(np.concatenate([s[k][key] for s in shares]), batch[key])


# ----------------------------------------------------------------------------- 2 + 3. equivalence, SIGTERM

def test_two_processes_match_one_and_sigterm_resumes_exactly(config, reference, tmp_path):
    """2 x 4 from scratch, SIGTERM to process 1 only: both stop at one step, save, exit 0. The
    2 x 4 losses equal the 1 x 8 ones; the checkpoint restarts on 1 x 8 and continues the trace."""
    workdir = tmp_path / "run"
    args = ("--config", config, "--workdir", str(workdir))
    with started(launch_cmd(2, 4, *args)) as run:
        p1 = run.pid(1)
        run.wait_for(r"^\[p0\] step 2/")
        os.kill(p1, signal.SIGTERM)
        assert run.finish() == 0, run.tail()
    stops = {int(s) for s in re.findall(r"^\[p[01]\] stop requested: saved step (\d+)", run.output, re.M)}
    assert len(stops) == 1, run.tail()  # both processes, one step
    stop = stops.pop()
    assert len(re.findall(r"stop requested", run.output)) == 2
    assert 2 <= stop < STEPS, f"stopped at {stop}: the run ended before the signal took effect"
    assert steps_on_disk(workdir)[-1] == str(stop)
    want = rows(reference)
    first = rows(workdir)  # unique=True: only process 0 writes metrics.jsonl
    assert sorted(first) == list(range(1, stop + 1))
    diff = assert_same_losses(first, want, range(1, stop + 1))
    assert len(list((workdir / "tensorboard").glob("events.*"))) == 1

    # The restart: another layout (1 x 8) resumes the 2-process checkpoint, data position included.
    again = run_to_end(1, 8, *args)
    assert f"resumed from {workdir / 'checkpoints' / str(stop)}" in again.output
    assert f"data position: saved by 2 processes, now 1; resuming at global batch {stop}\n" in again.output + "\n"
    both = rows(workdir)
    assert sorted(both) == list(range(1, STEPS + 1))
    diff = max(diff, assert_same_losses(both, want, range(stop + 1, STEPS + 1)))
    # The final states agree too (written by different layouts, read without a mesh).
    got, ref = saved_state(workdir, STEPS), saved_state(reference, STEPS)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    print(f"\n2x4 vs 1x8, SIGTERM at step {stop}, resumed on 1x8: largest relative loss difference {diff:.2e}")


# ----------------------------------------------------------------------------- 4. other meshes

def test_checkpoint_restores_on_other_meshes_and_processes(config, reference, tmp_path):
    """The data=8 checkpoint, restored on (2, 2, 2), on 1 device and on 2 processes x (2, 2, 2):
    the same params, bit for bit, sharded as each mesh says."""
    import jax

    from ov3 import checkpoint as ckpt_lib
    from ov3 import sharding, train
    want = saved_state(reference, STEPS)
    cfg = load_config(config)
    task = train.build_task(cfg)[0]
    devices = jax.devices()
    for axes, devs in ((dict(data=2, fsdp=2, tensor=2), devices), (dict(data=1, fsdp=1, tensor=1), devices[:1])):
        cfg.mesh.update(axes)
        trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh, devs), task)
        state = ckpt_lib.Checkpointer(reference).restore(STEPS, trainer.abstract_state, None)
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        for (path, x), where in zip(flat, jax.tree.leaves(trainer.state_shardings), strict=True):
            k = jax.tree_util.keystr(path, simple=True, separator="/")
            np.testing.assert_array_equal(np.asarray(x), want[k], err_msg=f"{axes} {k}")
            assert x.sharding == where, (axes, k)
        qkv = state.params["encoder"]["transformer"]["resblocks"]["attn"]["qkv_kernel"]
        assert tuple(qkv.sharding.spec) == (None, "fsdp", None, "tensor", None)
        assert len(qkv.sharding.device_set) == len(devs) and len(qkv.addressable_shards) == len(devs)

    out = tmp_path / "params.npz"
    run = run_to_end(2, 4, "--config", config, "--workdir", str(copy_run(reference, tmp_path / "ref", STEPS)),
                     "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                     module="tests.fault_injection", env={"OV3_PROBE_OUT": str(out)})
    assert f"probe: restored step {STEPS} on mesh {{'data': 2, 'fsdp': 2, 'tensor': 2}} over 2 processes" in run.output
    got = np.load(out)
    params = {k: v for k, v in want.items() if k.startswith("params/")}
    assert sorted(f"params/{k}" for k in got.files) == sorted(params)
    for k in got.files:
        np.testing.assert_array_equal(got[k], params[f"params/{k}"], err_msg=k)


def test_evaluation_on_two_processes_matches_one(config, reference, tmp_path):
    """`python -m ov3.evaluate` (reconstruction and retrieval on the held-out split) on 2 processes
    x 4 devices gives the 1 x 8 numbers: each process reads its share of the split, and the
    evaluators' programs, compiled mid-run, start on every process together."""
    results = {}
    for processes, devices in ((1, 8), (2, 4)):
        workdir = copy_run(reference, tmp_path / f"{processes}x{devices}", STEPS)
        run = run_to_end(processes, devices, "--workdir", str(workdir), module="ov3.evaluate")
        assert "wrote " in run.output, run.tail()
        results[processes] = json.loads((workdir / f"eval_{STEPS}.json").read_text())["results"]
    assert sorted(results[1]) == sorted(results[2]) == ["reconstruction", "retrieval"]
    assert "psnr" in results[1]["reconstruction"] and "i2t_R@1" in results[1]["retrieval"], results[1]
    for name, want in results[1].items():
        got = results[2][name]
        assert sorted(got) == sorted(want), (name, got, want)
        for metric in want:
            if metric != "time_s":
                np.testing.assert_allclose(got[metric], want[metric], rtol=1e-5, err_msg=f"{name}/{metric}")


# ----------------------------------------------------------------------------- 3. SIGKILL mid-checkpoint

def test_sigkill_while_committing_a_checkpoint_keeps_the_previous_one(config, reference, tmp_path):
    """2 x 4 resumes the reference's step-4 checkpoint (written by 1 process), and process 0 is
    SIGKILLed while it commits checkpoint 8 (all files written, not yet renamed): the launcher
    stops process 1 and fails. The restart (1 x 8, the reference's layout) ignores the partial
    step 8, resumes step 4, and repeats the reference's losses bit for bit."""
    workdir = copy_run(reference, tmp_path / "run", EVERY)
    args = ("--config", config, "--workdir", str(workdir))
    env = {"OV3_FAULTS": json.dumps({"pause_commit_step": STEPS}), "OV3_KILL_GRACE_S": "2"}
    with started(launch_cmd(2, 4, *args, module="tests.fault_injection"), env) as run:
        p0 = run.pid(0)
        run.wait_for(rf"^\[p0\] FAULT: pausing before committing checkpoint {STEPS}")
        os.kill(p0, signal.SIGKILL)
        rc = run.finish(60)
    assert rc == 128 + signal.SIGKILL, run.tail()  # the first failure: killed by signal 9
    assert "[launch] p0 exited with status 137" in run.output and "stopping the other processes" in run.output
    assert "data position: saved by 1 processes, now 2; resuming at global batch 4" in run.output
    partial = workdir / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp"
    assert partial.is_dir() and (partial / "state").exists(), steps_on_disk(workdir)  # written, not committed
    assert not (workdir / "checkpoints" / str(STEPS)).exists()
    killed = rows(workdir)  # steps 5-8 ran on 2 processes before the kill
    diff = assert_same_losses(killed, rows(reference), range(EVERY + 1, STEPS + 1))
    print(f"\n1x8 checkpoint resumed on 2x4: largest relative loss difference {diff:.2e}")

    again = run_to_end(1, 8, *args)
    assert f"resumed from {workdir / 'checkpoints' / str(EVERY)}" in again.output
    assert not partial.exists()  # orbax removed the leftover when it opened the directory
    assert steps_on_disk(workdir) == [str(EVERY), str(STEPS)]
    assert_same_losses(rows(workdir, unique=False), rows(reference), range(EVERY + 1, STEPS + 1), exact=True)
    got, want = saved_state(workdir, STEPS), saved_state(reference, STEPS)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ----------------------------------------------------------------------------- 6. NaN / Inf

def test_nonfinite_step_stops_with_terms_and_keeps_the_last_checkpoint(config, reference, tmp_path):
    workdir = tmp_path / "run"
    env = {"OV3_FAULTS": json.dumps({"nan_at_steps": [EVERY + 1]})}  # right after checkpoint 4 began
    run = run_to_end(1, 8, "--config", config, "--workdir", str(workdir), module="tests.fault_injection",
                     env=env, expect=2)
    no_traceback(run)
    m = re.search(r"ov3: error: non-finite loss or gradient at step (\d+): .*\bloss=nan, .*loss/contrastive=nan",
                  run.output)
    assert m and int(m.group(1)) == EVERY + 1, run.tail()
    assert steps_on_disk(workdir) == [str(EVERY)]  # complete (renamed), nothing after it
    got, want = saved_state(workdir, EVERY), saved_state(reference, EVERY)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert_same_losses(rows(workdir), rows(reference), range(1, EVERY + 1), exact=True)


def test_nonfinite_skip_counts_skipped_steps(config, reference, tmp_path):
    workdir = tmp_path / "run"
    bad = EVERY + 1
    run = run_to_end(1, 8, "--config", config, "--workdir", str(workdir), "--config.nonfinite=skip",
                     module="tests.fault_injection", env={"OV3_FAULTS": json.dumps({"nan_at_steps": [bad]})})
    assert re.search(rf"step {bad}: non-finite loss or gradient \(.*\bloss=nan.*\); update skipped", run.output)
    table = rows(workdir)
    assert sorted(table) == list(range(1, STEPS + 1))
    assert [table[s]["nonfinite_skipped"] for s in table] == [1.0 if s == bad else 0.0 for s in table]
    assert math.isnan(table[bad]["loss"]) and all(math.isfinite(table[s]["loss"]) for s in table if s != bad)
    assert_same_losses(table, rows(reference), range(1, bad), exact=True)
    assert all(np.isfinite(v).all() for k, v in saved_state(workdir, STEPS).items() if v.dtype.kind == "f")


# ----------------------------------------------------------------------------- 5. clear errors

def test_checkpoint_of_another_model_is_one_message(config, reference, tmp_path):
    workdir = copy_run(reference, tmp_path / "run", STEPS)
    run = run_to_end(1, 8, "--config", config, "--workdir", str(workdir), "--config.model.text=S", "--verbosity=0",
                     expect=2)
    no_traceback(run)
    assert "compiled the train step" not in run.output
    assert re.search(r"^\[p0\] I\d{4} .*checkpoint_manager", run.output, re.M), run.tail()  # --verbosity=0: INFO back
    assert f"[p0] ov3: error: checkpoint {workdir / 'checkpoints' / str(STEPS)} does not fit the configured model" \
        in run.output, run.tail()
    mismatches = re.findall(r"^\[p0\]   (params/text/\S+): saved \((\d+(?:, \d+)*)\), expected \((\d+(?:, \d+)*)\)$",
                            run.output, re.M)
    assert mismatches and all(saved != expected for _, saved, expected in mismatches), run.tail()


def test_one_process_failing_ends_the_run_promptly(config, tmp_path):
    """Process 1 fails after joining: it exits at once (not in jax's shutdown barrier, which
    would wait minutes for process 0), and the launcher stops process 0 and reports status 2."""
    t0 = time.time()
    run = run_to_end(2, 1, "--config", config, "--workdir", str(tmp_path / "run"), expect=2,
                     module="tests.fault_injection",
                     env={"OV3_FAULTS": json.dumps({"fail_on_process": 1}), "OV3_KILL_GRACE_S": "2"})
    assert "[p1] Traceback" not in run.output, run.tail()  # process 0 may fail loudly: its peer vanished
    assert "[p1] ov3: error: injected failure on process 1" in run.output
    assert "[launch] p1 exited with status 2" in run.output and "stopping the other processes" in run.output
    assert re.search(r"\[launch\] p0 exited with status (137|143)", run.output), run.tail()
    assert time.time() - t0 < 90


def test_unwritable_workdir_fails_before_joining(config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    run = run_to_end(2, 1, "--config", config, "--workdir", str(blocker / "sub"), expect=2)
    no_traceback(run)
    # Every process checks before joining; whichever reports first takes the run down (the
    # launcher then stops the other, which may not get to print its own copy of the message).
    assert re.search(rf"\[p[01]\] ov3: error: workdir {re.escape(str(blocker / 'sub'))} is not writable",
                     run.output), run.tail()
    assert "compiled the train step" not in run.output


def test_full_disk_fails_before_compiling(config, tmp_path):
    run = run_to_end(1, 8, "--config", config, "--workdir", str(tmp_path / "run"),
                     module="tests.fault_injection", env={"OV3_FAULTS": json.dumps({"free_bytes": 4096})},
                     expect=2)
    no_traceback(run)
    assert re.search(r"ov3: error: workdir \S+ has 3.81e-06 GiB free, but this run's checkpoints need", run.output), \
        run.tail()
    assert "compiled the train step" not in run.output


def test_coordinator_that_never_comes_up_times_out_naming_it(config, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    env = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "JAX_INIT_TIMEOUT_S": "3", "JAX_PLATFORMS": "cpu"}
    t0 = time.time()
    cmd = [sys.executable, "-m", "ov3.main", "--config", config, "--workdir", str(tmp_path / "run")]
    with started(cmd, env) as run:
        rc = run.finish(120)
    assert rc == 2, run.tail()
    no_traceback(run)
    assert (f"ov3: error: process 1 of 2 could not join the JAX coordinator at {address} within 3s "
            "(JAX_INIT_TIMEOUT_S)") in run.output, run.tail()
    print(f"\ncoordinator never up: exit 2 after {time.time() - t0:.0f}s (timeout 3 s)")


# ----------------------------------------------------------------------------- 7. chaos

CHAOS_SEED = 16
CHAOS_FAULTS = (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM)


def test_chaos_random_kills_and_stops_end_where_a_straight_run_does(config, reference, tmp_path):
    """A 2 x 4 run hit by SIGKILLs and SIGTERMs of a random process at a random moment (while
    starting, compiling, stepping or saving; seeded), restarted after each: it ends with the
    straight 1 x 8 run's losses and params, every step logged once."""
    import random
    rng = random.Random(CHAOS_SEED)
    faults = list(CHAOS_FAULTS)
    rng.shuffle(faults)
    workdir = tmp_path / "run"
    args = ("--config", config, "--workdir", str(workdir), "--config.checkpoint_every=2",
            "--config.stop_grace_s=30")  # saving on a busy 2-core host can take 5-10 s
    env = {"OV3_KILL_GRACE_S": "3"}
    stepped, restarts, outcomes = 0, 0, []
    t0 = time.time()
    while True:
        fault = faults.pop() if faults else None
        done = max((int(s) for s in steps_on_disk(workdir) if s.isdigit()), default=0) \
            if (workdir / "checkpoints").is_dir() else 0  # complete steps (not <step>.orbax-checkpoint-tmp)
        # While starting, compiling, or after a step this attempt will run (and maybe while saving it).
        moments = [r"^\[launch\] p1 pid", r"^\[p0\] compiled the train step"] + [
            rf"^\[p0\] step {k}/" for k in range(done + 1, STEPS)]
        with started(launch_cmd(2, 4, *args), env) as run:
            if fault is not None:
                victim, moment, jitter = rng.randrange(2), rng.choice(moments), rng.uniform(0, 1.0)
                pid = run.pid(victim)
                run.wait_for(moment)  # every moment drawn comes, unless the run fails (the test then does)
                time.sleep(jitter)
                with contextlib.suppress(ProcessLookupError):  # gone already: the jitter outlasted the run
                    os.kill(pid, fault)
                hit = f"{signal.Signals(fault).name} p{victim} at {moment.split('] ')[-1].rstrip('/')}+{jitter:.1f}s"
            rc = run.finish()
        stepped += len(re.findall(r"^\[p0\] step \d+/", run.output, re.M))
        assert "Traceback" not in run.output or fault == signal.SIGKILL, run.tail()
        if fault is None:
            assert rc == 0, run.tail()
            break
        outcomes.append(f"{hit} -> exit {rc}")
        restarts += 1
    table = rows(workdir)  # unique: the log was cut back to the checkpoint at each restart
    assert sorted(table) == list(range(1, STEPS + 1))
    diff = assert_same_losses(table, rows(reference), range(1, STEPS + 1))
    got, ref = saved_state(workdir, STEPS), saved_state(reference, STEPS)
    worst = max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    print(f"\nchaos: {len(CHAOS_FAULTS)} faults ({', '.join(outcomes)}), {restarts} restarts, "
          f"{stepped - STEPS} steps computed again, {time.time() - t0:.0f}s; largest relative loss difference "
          f"{diff:.2e}, largest parameter difference {worst:.2e}")
