"""The kernel benchmark runs end to end at tiny sizes (its numbers are not checked: timings
belong in benchmarks, not tests), so it does not rot between the GPU sessions that need it."""

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
