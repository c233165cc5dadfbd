"""Which implementation the sparse kernels run, chosen once at import.

`auto` (the default) runs the Triton kernels on CUDA tensors and the fastest torch path on
everything else. `triton` forces the Triton kernels; on CPU tensors that needs Triton's
interpreter (`TRITON_INTERPRET=1` set before `triton` is first imported: slow, for tests).
`torch` forces the torch path. Choose with the `SAETRAIN_KERNELS` environment variable, or
with `set_backend` (tests).

`SAETRAIN_KERNEL_OPTIONS` (comma-separated, read at import) flips the defaults of the GPU
choices that wait on a GPU measurement (`OPTIONS`), so they can be tried without editing
code: `SAETRAIN_KERNEL_OPTIONS=radix,latent-major python -m saetrain fit ...`.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "SAETRAIN_KERNELS"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs, macOS: the torch path serves every call
    HAS_TRITON = False

# bf16/fp16 matmuls are slower than fp32 ones on x86 CPUs without AMX tiles (measured on a
# Xeon with AVX512-BF16 only: 550 ms vs 345 ms at 4096 x 576 x 16384), so there the torch
# path upcasts the encoder matmul; the accumulation is fp32 either way.
CPU_FAST_HALF_MATMUL: bool = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _checked(name: str, source: str) -> str:
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{source} is {name!r}; choose one of {', '.join(BACKENDS)}.")
    return name


_backend = _checked(os.environ.get(ENV_VAR, "auto"), f"the {ENV_VAR} environment variable")

OPTIONS_VAR = "SAETRAIN_KERNEL_OPTIONS"
# Each flips a default that `scripts/gpu_check.sh` is to decide (see where each is set).
OPTIONS = {
    "radix": "the radix-select top-k on CUDA (saetrain/kernels/topk.py RADIX_DEVICES)",
    "latent-major": "weight-gradient rows summed latent-major (sparse_ops.py LATENT_MAJOR)",
    "fused-encoder": "the fused matmul + top-k encoder on CUDA (encode.py FUSE_ON_CUDA)",
    "grouped-topk": "the grouped top-k on CUDA too (saetrain/kernels/topk.py GROUPED_DEVICES)",
    "unfused-optimizer": "the decoder's step as three ops (saetrain/optim.py FUSE_WHERE_TRITON)",
    "unfused-losses": "the SAE's losses as torch ops (saetrain/kernels/loss.py FUSE_LOSSES)",
}


def kernel_options(text: str, source: str) -> frozenset[str]:
    """The option names in a comma-separated `text`; a one-line ValueError names unknown ones."""
    names = {name.strip().lower() for name in text.split(",") if name.strip()}
    unknown = sorted(names - OPTIONS.keys())
    if unknown:
        raise ValueError(
            f"{source} names {', '.join(map(repr, unknown))}; choose among "
            f"{', '.join(OPTIONS)} (comma-separated)."
        )
    return frozenset(names)


KERNEL_OPTIONS = kernel_options(
    os.environ.get(OPTIONS_VAR, ""), f"the {OPTIONS_VAR} environment variable"
)


def set_backend(name: str) -> str:
    """Use backend `name` ("auto", "triton" or "torch") from now on; returns the previous one."""
    global _backend
    previous, _backend = _backend, _checked(name, "set_backend's name")
    return previous


def get_backend() -> str:
    """The backend in use: "auto", "triton" or "torch"."""
    return _backend


def triton_interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    if not HAS_TRITON:
        return False
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    # triton's own helpers (tl.sum, tl.topk) are decorated when triton is imported, so
    # setting the variable later leaves them compiled-only and our kernels would fail.
    return isinstance(tl_standard.sum, InterpretedFunction)


def use_triton(device: torch.device) -> bool:
    """Whether a call on tensors on `device` runs the Triton kernels."""
    if _backend == "torch":
        return False
    if _backend == "auto":
        return HAS_TRITON and device.type == "cuda"
    if not HAS_TRITON:
        raise RuntimeError(
            f"{ENV_VAR}/set_backend asks for 'triton' but triton is not installed; "
            "install it or use 'auto'."
        )
    if device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(
            f"the 'triton' backend got tensors on {device.type}: it needs CUDA tensors, or "
            "TRITON_INTERPRET=1 set before triton is first imported (slow; for tests)."
        )
    return True
