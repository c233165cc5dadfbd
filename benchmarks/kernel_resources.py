"""Compile every Triton kernel for a GPU, without one, and print what each config costs it.

    python benchmarks/kernel_resources.py               # sm_90 (H100, H200), every config
    python benchmarks/kernel_resources.py --arch 80     # sm_80 (A100)
    python benchmarks/kernel_resources.py --quick       # one config per kernel (the tests')

Triton compiles for a target it is told about, and its wheel ships NVIDIA's ptxas, so this
runs on a CPU-only machine. For each kernel and each config it would run on a GPU (the
autotuners' own lists, the fixed tiles of the others) it prints the registers per thread,
the bytes spilled to local memory and the shared memory per program, from `ptxas -v`, and
the warps that can then be resident on an SM (out of 64: the gathers and scatters hide memory
latency with them). A
config that spills, or that needs more shared memory than the GPU has, is flagged: the
autotuner skips what does not fit, but a kernel none of whose configs fit would fail, and
spills slow a kernel down where registers already limit how many programs run at once.

Must run without TRITON_INTERPRET=1 (under the interpreter the kernels are not compiled).
Exits non-zero when a kernel fails to compile or has no config that fits.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import warnings

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources.py: unset TRITON_INTERPRET; the interpreter compiles nothing.")

from saetrain.kernels import decoder_norm, encode, loss, sparse_ops, topk  # noqa: E402

# Shared memory one program may use, by compute capability (CUDA's documented maxima).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
# Per SM, on the data-centre parts (sm_80, sm_90, sm_100): 64K registers, 64 resident warps,
# 32 resident programs, and the shared memory above plus 1 KB the runtime keeps per program.
REGISTERS_PER_SM, WARPS_PER_SM, PROGRAMS_PER_SM = 65536, 64, 32


def resident_warps(regs: int, shared: int, warps: int, arch: int) -> int:
    """Warps of one kernel resident on an SM at once, as registers, shared memory and the
    warp and program limits allow (registers are given out per warp in 256s). More warps
    hide more memory latency, which bounds the gathers and scatters."""
    per_warp = -(-regs * 32 // 256) * 256
    programs = min(
        REGISTERS_PER_SM // (per_warp * warps),
        SHARED_LIMIT.get(arch, 99 * 1024) // (shared + 1024),
        WARPS_PER_SM // warps,
        PROGRAMS_PER_SM,
    )
    return programs * warps


def ptr(dtype: str) -> str:
    return f"*{dtype}"


def gather_cases(quick: bool):
    """(label, kernel, signature, constexprs, num_warps) for every config of each kernel."""
    cases = []
    tuned = sparse_ops._gather_combine_tuned.configs
    for dtype in ("bf16", "fp32"):
        for name, kernel in (
            ("gather_combine", sparse_ops._gather_combine_kernel),
            ("gather_dot", sparse_ops._gather_dot_kernel),
        ):
            sig = {"coef_ptr" if name == "gather_combine" else "vec_ptr": ptr(dtype)}
            sig |= {"idx_ptr": "*i64", "table_ptr": ptr(dtype), "out_ptr": ptr(dtype)}
            sig |= {"k": "i32", "d": "i32", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"}
            for config in tuned[:1] if quick else tuned:
                consts = {"BLOCK_K": 32, **config.kwargs}
                cases.append((f"{name} {dtype}", kernel, sig, consts, config.num_warps))
        sig = {"coef_ptr": ptr(dtype), "idx_ptr": "*i64", "vec_ptr": ptr(dtype)}
        sig |= {"out_ptr": "*fp32", "bias_out_ptr": "*fp32", "k": "i32", "d": "i32"}
        sig |= {n: "constexpr" for n in ("HAS_BIAS", "BLOCK_K", "BLOCK_D")}
        for config in tuned[:1] if quick else tuned:
            consts = {"HAS_BIAS": True, "BLOCK_K": 32, **config.kwargs}
            label = f"scatter_outer {dtype}"
            cases.append((label, sparse_ops._scatter_outer_kernel, sig, consts, config.num_warps))
        sig = {"coef_ptr": ptr(dtype), "entry_ptr": "*i64", "row_ptr": "*i64"}
        sig |= {"starts_ptr": "*i64", "vec_ptr": ptr(dtype), "out_ptr": "*fp32"}
        sig |= {"table_ptr": ptr(dtype), "dots_ptr": "*fp32"}
        sig |= {"num_rows": "i32", "k": "i32", "d": "i32"}
        flags = ("ACCUMULATE", "HAS_DOTS", "UPCAST", "PRECISION")
        sig |= {n: "constexpr" for n in (*flags, "BLOCK_R", "BLOCK_E", "BLOCK_D")}
        precision = "ieee" if dtype == "bf16" else "tf32x3"
        segment = sparse_ops._segment_outer_tuned.configs
        for dots in (True, False):  # the decoder's pass (with dots), the encoder's
            for config in segment[:1] if quick else segment:
                consts = dict(zip(flags, (False, dots, False, precision), strict=True))
                consts |= config.kwargs
                label = f"segment_outer {dtype}{' dots' if dots else ''}"
                kernel = sparse_ops._segment_outer_kernel
                cases.append((label, kernel, sig, consts, config.num_warps))
    return cases


def norm_cases(quick: bool):
    sig = {"w_ptr": "*fp32", "g_ptr": "*fp32", "N": "i32", "D": "i32", "eps": "fp32"}
    flags = ("PROJECT", "NORMALIZE", "ONE_SWEEP", "BLOCK_R", "BLOCK_D")
    sig |= {n: "constexpr" for n in flags}
    cases = []
    widths = (3072,) if quick else (576, 3072, 8192, 16384)
    for d in widths:  # the tiles decoder_norm._run picks for this width on a GPU
        one, block_r, block_d, warps = decoder_norm._tiles(d, interpreted=False)
        consts = dict(zip(flags, (True, True, one, block_r, block_d), strict=True))
        cases.append((f"decoder_norm d={d}", decoder_norm._decoder_norm_kernel, sig, consts, warps))
    sig = {n: "*fp32" for n in ("w_ptr", "g_ptr", "m_ptr", "v_ptr", "scalars_ptr")}
    sig |= {"N": "i32", "D": "i32"}
    sig |= {n: "fp32" for n in ("beta1", "beta2", "eps", "weight_decay", "norm_eps")}
    flags = ("PROJECT", "ONE_SWEEP", "BLOCK_R", "BLOCK_D")
    sig |= {n: "constexpr" for n in flags}
    for d in widths:  # the tiles decoder_adam_step_ picks (four row tiles in registers)
        one, block_r, block_d, _ = decoder_norm._tiles(d, interpreted=False, tensors=4)
        consts = dict(zip(flags, (True, one, block_r, block_d), strict=True))
        tuned = decoder_norm._decoder_adam_tuned.configs
        for config in tuned[:1] if quick else tuned:  # the autotuned warps
            label = f"decoder_adam d={d}"
            kernel = decoder_norm._decoder_adam_kernel
            cases.append((label, kernel, sig, consts, config.num_warps))
    return cases


def encode_cases(quick: bool):
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "dead_ptr": "*i1"}
    sig |= {"keys_ptr": "*i64", "aux_keys_ptr": "*i64"}
    sig |= {"B": "i32", "N": "i32", "D": "i32", "tiles_per_split": "i32"}
    flags = ("KP", "KAP", "HAS_AUX", "NEG", "PRECISION", "UPCAST")
    sig |= {n: "constexpr" for n in (*flags, "BLOCK_B", "BLOCK_N", "BLOCK_D")}
    cases = []
    for kap in (1,) if quick else (1, 64):  # k=32, without and with the fused aux selection
        blocks = encode._fused_blocks(32, kap, torch.bfloat16, False)
        consts = dict(zip(flags, (32, kap, kap > 1, encode.NEG_KEY, "ieee", False), strict=True))
        consts |= dict(zip(("BLOCK_B", "BLOCK_N", "BLOCK_D"), blocks[:3], strict=True))
        label = f"encode_topk (fused) bf16 k_aux={kap if kap > 1 else 0}"
        cases.append((label, encode._encode_topk_kernel, sig, consts, blocks[3]))
    return cases


def topk_cases(quick: bool):
    cases = []
    for dtype, passes in (("bf16", 2),) if quick else (("bf16", 2), ("fp32", 4)):
        sig = {"x_ptr": f"*{dtype}", "stride_x": "i32", "dead_ptr": "*i1"}
        sig |= {"vals_ptr": f"*{dtype}", "idx_ptr": "*i64"}
        sig |= {"aux_vals_ptr": f"*{dtype}", "aux_idx_ptr": "*i64"}
        sig |= {"N": "i32", "K": "i32", "KA": "i32"}
        sig |= {n: "constexpr" for n in ("PASSES", "HAS_AUX", "BLOCK_N")}
        for aux in (False,) if quick else (False, True):
            for config in topk.RADIX_CONFIGS[:1] if quick else topk.RADIX_CONFIGS:
                consts = {"PASSES": passes, "HAS_AUX": aux} | config.kwargs
                label = f"radix_topk {dtype}{' +aux' if aux else ''}"
                cases.append((label, topk._radix_topk_kernel, sig, consts, config.num_warps))
        sig = {n: kind for n, kind in sig.items() if n != "PASSES"}
        sig |= {"BITS": "constexpr", "TILE": "constexpr"}
        bits = 16 if dtype == "bf16" else 32
        for aux in (False,) if quick else (False, True):
            for width in (32768,) if quick else (8192, 16384, 32768):  # what radix_topk runs
                consts = {"BITS": bits, "HAS_AUX": aux, "BLOCK_N": width, "TILE": 1024}
                label = f"resident_topk {dtype}{' +aux' if aux else ''}"
                warps = topk.resident_warps(width)
                cases.append((label, topk._resident_topk_kernel, sig, consts, warps))
    return cases


def loss_cases(quick: bool):
    """The fused losses' forward and backward, with AuxK, in bf16 (decodes under autocast)
    and fp32; the tiles `loss._blocks` picks on a GPU."""
    cases = []
    block_b, block_d = loss.LOSS_BLOCKS
    for dtype in ("bf16",) if quick else ("bf16", "fp32"):
        sig = {"xs_ptr": "*fp32", "dec_ptr": ptr(dtype), "b_ptr": "*fp32", "eh_ptr": ptr(dtype)}
        sig |= {"scale_ptr": "*fp32", "x_hat_ptr": "*fp32", "partial_ptr": "*fp32"}
        sig |= {"B": "i32", "D": "i32"}
        sig |= {n: "constexpr" for n in ("HAS_AUX", "BLOCK_B", "BLOCK_D")}
        consts = {"HAS_AUX": True, "BLOCK_B": block_b, "BLOCK_D": block_d}
        cases.append((f"losses {dtype}", loss._losses_kernel, sig, consts, loss.LOSS_WARPS))
        sig = {"xs_ptr": "*fp32", "dec_ptr": ptr(dtype), "b_ptr": "*fp32", "eh_ptr": ptr(dtype)}
        sig |= {"gxh_ptr": "*fp32", "coef_ptr": "*fp32", "g_dec_ptr": ptr(dtype)}
        sig |= {"g_eh_ptr": ptr(dtype), "col_ptr": "*fp32", "B": "i32", "D": "i32"}
        sig |= {n: "constexpr" for n in ("HAS_AUX", "HAS_GXH", "BLOCK_B", "BLOCK_D")}
        consts = {"HAS_AUX": True, "HAS_GXH": False, "BLOCK_B": block_b, "BLOCK_D": block_d}
        kernel = loss._losses_backward_kernel
        cases.append((f"losses_backward {dtype}", kernel, sig, consts, loss.LOSS_WARPS))
    return cases


# Integer arguments that are multiples of 16 at the shapes this prints for (d_in 3072 or
# 576, 24,576 or 16,384 latents, k 32, B 4096): the JIT specializes on that, as on aligned
# pointers, and vectorizes loads it could not otherwise.
MULTIPLES_OF_16 = {"k", "d", "D", "N", "B", "num_rows", "stride_x"}


def resources(kernel, sig, consts, warps, arch: int, stages: int = 3) -> dict:
    """Compile one config for sm_`arch`; registers, spills and shared memory per program."""
    aligned = [
        (i,)
        for i, (name, kind) in enumerate(sig.items())
        if kind.startswith("*") or (kind == "i32" and name in MULTIPLES_OF_16)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(
            ASTSource(
                fn=kernel,
                signature=sig,
                constexprs=consts,
                attrs={path: [["tt.divisibility", 16]] for path in aligned},
            ),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
    ptxas = nvidia.get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        run = [ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull]
        out = subprocess.run(run, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {
        "regs": int(regs.group(1)) if regs else -1,
        "spill": int(spill.group(1)) if spill else 0,
        "shared": compiled.metadata.shared,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability: 80, 90, ...")
    parser.add_argument("--quick", action="store_true", help="one config per kernel")
    parser.add_argument("--only", default="", help="kernels whose label contains this")
    parser.add_argument("--stages", type=int, default=3, help="software-pipelining stages")
    args = parser.parse_args(argv)
    limit = SHARED_LIMIT.get(args.arch, 99 * 1024)
    print(f"sm_{args.arch}, triton {triton.__version__}, shared memory limit {limit} B")
    fits: dict[str, bool] = {}
    failed = []
    for label, kernel, sig, consts, warps in [
        *gather_cases(args.quick),
        *norm_cases(args.quick),
        *encode_cases(args.quick),
        *topk_cases(args.quick),
        *loss_cases(args.quick),
    ]:
        if args.only not in label:
            continue
        tiles = {k: v for k, v in consts.items() if k.startswith("BLOCK")}
        config = " ".join(f"{k[6:]}={v}" for k, v in tiles.items()) + f" warps={warps}"
        try:
            got = resources(kernel, sig, consts, warps, args.arch, args.stages)
        except Exception as err:  # a compile error is the finding: print it, go on
            failed.append(label)
            print(f"  {label:34s} {config:34s} FAILED: {type(err).__name__}: {str(err)[:200]}")
            continue
        fit = got["shared"] <= limit
        fits[label] = fits.get(label, False) or fit
        flags = ("" if fit else "  TOO MUCH SHARED MEMORY") + ("  SPILLS" if got["spill"] else "")
        resident = resident_warps(got["regs"], got["shared"], warps, args.arch)
        print(
            f"  {label:34s} {config:34s} regs {got['regs']:3d}  spill {got['spill']:5d} B  "
            f"shared {got['shared']:6d} B  {resident:2d} warps/SM{flags}"
        )
    unfit = [label for label, fit in fits.items() if not fit]
    if failed or unfit:
        print(f"failed to compile: {failed}; no config fits: {unfit}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
