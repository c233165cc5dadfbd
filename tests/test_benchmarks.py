"""The kernel benchmark and the GPU session's script run end to end at tiny sizes (their
numbers are not checked: timings belong in benchmarks, not tests), so they do not rot between
the GPU sessions that need them."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_prints_every_row_at_tiny_sizes():
    env = {**os.environ, "SAETRAIN_KERNELS": "torch"}
    args = ["--batch", "64", "--d-in", "32", "--num-latents", "256", "--k", "4", "--parts"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), *args, "--rounds", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for row in (
        "floor: encoder matmul",
        "fused Adam alone",
        "forward decode alone",
        "dense autograd step",
        "kernel step",
        "no step beats",
        "encoder fwd+bwd: matmul+topk",
        "decoder fwd+bwd: sparse",
        "decoder-norm step, ours",
        "decoder optimizer step: one pass is",
        "top-k: grouped is",
    ):
        assert row in result.stdout, row


def test_gpu_check_script_rehearses_every_step_on_cpu(tmp_path):
    """`REHEARSE=1 bash scripts/gpu_check.sh` runs each step a GPU session would, at tiny sizes:
    every step finishes in its time limit, tune-kernels stores its choices, and the summary
    gathers the lines that decide the defaults (a rare GPU session must not find it broken)."""
    env = {**os.environ, "REHEARSE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    for name in ("SAETRAIN_KERNELS", "SAETRAIN_KERNEL_OPTIONS", "SAETRAIN_TUNING_FILE"):
        env.pop(name, None)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    for failure in ("TIMED OUT", "FAILED (exit", "Traceback", "Error:"):
        assert failure not in log, log[-3000:]
    collected = [line for line in log.splitlines() if "tests collected" in line]
    assert len(collected) == 2 and all(not line.startswith("0/") for line in collected), collected

    body, summary = log.split("== summary: decisions and targets", 1)
    headers = [line for line in body.splitlines() if line.startswith("== ")]
    assert len(headers) == 8
    for line in (
        *headers,
        "x floor speed",
        "no step beats",
        "decoder: sparse is",
        "losses: one pass is",
        "radix is",
        "latent-major is",
        "tuned: fused-encoder",
        "a step:",
        "stored for cpu (Triton interpreter)",
    ):
        assert line in summary, line
    assert summary.count("== summary") == 0  # the summary did not read itself back

    (entry,) = json.loads((tmp_path / "tuned.json").read_text())["devices"].values()
    assert entry["shape"]["d_in"] == 16 and entry["rejected"] == {}
    assert set(entry["choices"]) == {c["switch"] for c in entry["comparisons"]}
