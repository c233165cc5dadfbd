"""Every Triton kernel compiles for real GPUs (sm_80: A100; sm_90: H100, H200), not only
under the interpreter.

The CPU interpreter runs the kernels' Python; it does not check what only the GPU compiler
does (tl.dot's operand shapes and dtypes, layouts, shared memory). Triton compiles for a
named target without a GPU, and its wheel ships ptxas, so CI compiles one config of each
kernel for both here, through benchmarks/kernel_resources.py (which, run by hand, prints
every config's registers, spills and shared memory).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("gather_combine", "gather_dot", "scatter_outer", "segment_outer", "decoder_norm",
           "encode_topk", "radix_topk", "resident_topk", "losses", "losses_backward")  # fmt: skip


def _can_compile_for_cuda() -> bool:
    try:
        from triton.backends.nvidia import compiler

        return os.path.exists(compiler.get_ptxas(90).path)
    except Exception:  # no triton, or a build without the NVIDIA backend
        return False


@pytest.mark.skipif(not _can_compile_for_cuda(), reason="needs triton with its NVIDIA backend")
@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_every_triton_kernel_compiles_for_the_data_centre_gpus(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(ROOT / "benchmarks" / "kernel_resources.py")
    result = subprocess.run(
        [sys.executable, script, "--quick", "--arch", str(arch)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for kernel in KERNELS:
        assert f"  {kernel}" in result.stdout, kernel
    assert f"sm_{arch}, triton" in result.stdout
    assert "FAILED" not in result.stdout
