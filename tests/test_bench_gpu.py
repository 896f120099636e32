"""ov3.tools.bench_gpu's CPU path: the whole script on the demo config at toy sizes (the same
code runs on an H100/H200), and the wheel installer's message when a package is missing."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from ov3.tools import bench_gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_runs_end_to_end_on_cpu():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device, as one GPU
    out = subprocess.run([sys.executable, "-m", "ov3.tools.bench_gpu", "--config", "configs/demo.py", "--batch", "4",
                          "--steps", "1", "--gemm", "128", "--vae_size", "32", "--vae_batch", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    print(text)
    assert re.search(r"1\. bf16 GEMM 128\^3 on cpu: [\d.]+ TFLOP/s", text)
    assert re.search(r"in the step\s+[\d.]+\s+[\d.]+", text) and re.search(r"cached latents\s+[\d.]+", text)
    assert re.search(r"32 encode\s+[\d.]+\s+[\d.]+", text) and "bench_gpu:" in text


def test_missing_package_without_wheels_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gpu, "NEEDED", {"ov3_no_such_module": "ov3-no-such-wheel"})
    with pytest.raises(SystemExit, match="ov3-no-such-wheel not installed and no .* to install them from"):
        bench_gpu.install_missing(tmp_path / "absent")
    assert bench_gpu.install_missing.__defaults__[0].name == ".whl"
