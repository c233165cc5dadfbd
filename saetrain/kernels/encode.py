"""Top-k encoder with a sparse backward, and the AuxK selection among dead latents.

pre_acts = x @ W_enc.T + b_enc; the k largest per token are kept (relu'd), and with a
dead_mask the k_aux largest among dead latents too, for the AuxK loss of Gao et al. (2024).
Issue #4, parts 2 and 3: the backward reads only the selected columns (grad W_enc,
grad b_enc and grad x from k (+ k_aux) columns per token; no dense (B, num_latents)
gradient). On CUDA the selection can run inside the encoder matmul so the
(B, num_latents) pre-activations are never written (`FUSE_ON_CUDA`; off by default, as
cuBLAS + torch.topk measured faster). After cuBLAS's matmul, the selections can run as
one radix-select kernel that takes AuxK's from the same loads (`topk.radix_topk`, where
`topk.RADIX_DEVICES` says; untimed on a GPU so far, so off). The four parts:
`encode_topk_reference` (pure torch), `_encode_topk_kernel` (Triton), the host checks in
`encode_topk`, and `EncodeTopkFunction`.

    latent_acts, latent_indices, aux_acts, aux_indices = encode_topk(x, W_enc, b_enc, k)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import CPU_FAST_HALF_MATMUL, HAS_TRITON, KERNEL_OPTIONS, use_triton
from .sparse_ops import (
    _pow2,
    autocast_dtype,
    compact_rows,
    gather_combine,
    plan_rows,
    scatter_outer,
)
from .topk import NEG_KEY, radix_applies, radix_topk, select_topk, unpack_keys

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .topk import merge_topk, pack_keys

    @triton.jit
    def _encode_topk_kernel(
        x_ptr, w_ptr, b_ptr, dead_ptr, keys_ptr, aux_keys_ptr,
        B, N, D, tiles_per_split,
        KP: tl.constexpr, KAP: tl.constexpr, HAS_AUX: tl.constexpr, NEG: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One program per (BLOCK_B tokens, split of the latents): sweep the split BLOCK_N
        # latents at a time, computing the pre-activation tile and folding it into a running
        # top-KP (and top-KAP among dead latents) of packed (value, column) keys. Only those
        # keys are written, (B, splits, KP): (B, num_latents) never reaches memory.
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        mask_b = offs_b < B
        offs_b = offs_b.to(tl.int64)
        split, splits = tl.program_id(1), tl.num_programs(1)
        n_start = split * tiles_per_split * BLOCK_N
        n_end = tl.minimum(N, n_start + tiles_per_split * BLOCK_N)
        best = tl.full((BLOCK_B, KP), NEG, tl.int64)
        aux_best = tl.full((BLOCK_B, KAP), NEG, tl.int64)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
            mask_n = offs_n < n_end
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
                mask_d = offs_d < D
                x_tile = tl.load(
                    x_ptr + offs_b[:, None] * D + offs_d[None, :],
                    mask=mask_b[:, None] & mask_d[None, :],
                    other=0.0,
                )  # (BLOCK_B, BLOCK_D)
                w_tile = tl.load(
                    w_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0,
                )  # (BLOCK_N, BLOCK_D)
                if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9); fp32 is exact
                    x_tile, w_tile = x_tile.to(tl.float32), w_tile.to(tl.float32)
                acc = tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=PRECISION)
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            keys = pack_keys(acc + bias[None, :], offs_n[None, :])  # (BLOCK_B, BLOCK_N)
            keys = tl.where(mask_n[None, :], keys, NEG)
            best = merge_topk(best, keys, KP, BLOCK_N)
            if HAS_AUX:
                dead = tl.load(dead_ptr + offs_n, mask=mask_n, other=0) != 0  # (BLOCK_N,)
                aux_keys = tl.where(dead[None, :], keys, NEG)
                aux_best = merge_topk(aux_best, aux_keys, KAP, BLOCK_N)
        out = offs_b[:, None] * (splits * KP) + split * KP + tl.arange(0, KP)[None, :]
        tl.store(keys_ptr + out, best, mask=mask_b[:, None])
        if HAS_AUX:
            out = offs_b[:, None] * (splits * KAP) + split * KAP + tl.arange(0, KAP)[None, :]
            tl.store(aux_keys_ptr + out, aux_best, mask=mask_b[:, None])


# Fuse the selection into the matmul when the running top-k fits in registers beside the
# tile; larger k (or k_aux) use the matmul plus torch.topk.
MAX_FUSED_K = 128
# On CUDA: True runs the fused matmul + selection kernel, False cuBLAS's matmul (the full
# (B, num_latents) pre-activations in memory) then torch.topk. Measured on an H200
# (benchmarks/bench_kernels.py --parts --sweep, B=4096, k=32, forward + backward): the
# fused kernel ran at 0.45x the speed of cuBLAS + topk at d_in=3072, 24576 latents, bf16
# (0.16x in fp32; 0.41x and 0.22x at d_in=576, 16384 latents): writing and re-reading the
# pre-activations costs far less than the fused kernel's merges lose against cuBLAS's
# matmul. So cuBLAS + topk is the default; the fused kernel stays for wider SAEs or
# smaller memory, tested against the reference like the rest.
FUSE_ON_CUDA = "fused-encoder" in KERNEL_OPTIONS  # off unless SAETRAIN_KERNEL_OPTIONS says
# Under Triton's CPU interpreter the fused kernel runs whatever FUSE_ON_CUDA says, so the
# tests check it; False sends the interpreter down CUDA's default path instead.
FUSE_UNDER_INTERPRETER = True
# (BLOCK_B, BLOCK_N, BLOCK_D, num_warps) for the fused kernel on CUDA; None: chosen by
# `_fused_blocks`. For benchmarks sweeping the tile sizes.
FUSED_BLOCKS: tuple[int, int, int, int] | None = None
# Rows of pre-activations per chunk on CPU: 512 x 16384 fp32 is 32 MiB, in L3 for the
# group-max pass of the selection, and the full (B, num_latents) is never held at once.
CPU_CHUNK_ROWS = 512
# fp32 CPU matmuls with MKL's packed weight: W_enc is packed once a forward instead of once
# per chunk (as each addmm packs it), which lets the chunks shrink to PACKED_CHUNK_ROWS. On
# this project's 2-core CPU, the encoder's forward at 4096 x 576 x 16384, k=32, interleaved
# runs: 282-317 ms against 358-363 ms for 512-row addmm chunks. `torch.ops.mkl._mkl_linear`
# has no `out=`: each chunk's output is new, and glibc's heap reuses a freed 16 MiB one where
# 32 MiB ones are mapped afresh and fault in (512 packed rows: 417-443 ms).
# Packing W_enc costs about 11 ms at 16384 x 576, so small batches (inference, steering) keep
# addmm: encoder forward at B = 1: 1.2 ms with addmm against 12.7 packed; 256: 24 against 34;
# 1024: 90 against 80-93; 2048: 166 against 148; 4096: 367 against 329.
MKL_PACKED = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
PACKED_CHUNK_ROWS = 256
PACKED_MIN_ROWS = 1024


class EncodeOutput(NamedTuple):
    """What `encode_topk` returns. Main rows are sorted, largest first; aux rows may not be."""

    latent_acts: Tensor
    """(B, k) relu of the k largest pre-activations, in x's dtype."""
    latent_indices: Tensor
    """(B, k) int64 latent ids of latent_acts."""
    aux_acts: Tensor
    """(B, k_aux') relu of the k_aux' largest pre-activations among dead latents, in no
    particular order, where k_aux' = min(k_aux, number of dead latents); (B, 0) if none."""
    aux_indices: Tensor
    """(B, k_aux') int64 latent ids of aux_acts."""


def encode_topk_reference(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    b_dec: Tensor | None = None,
) -> EncodeOutput:
    """Pure-torch Top-k encoder (dense autograd), in fp32, outputs in x's dtype."""
    x_in = x.float() if b_dec is None else x.float() - b_dec.float()
    pre_acts = F.linear(x_in, W_enc.float(), b_enc.float())  # (B, num_latents)
    values, latent_indices = pre_acts.topk(k, dim=-1)  # (B, k)
    n_aux = _num_aux(_dead_ids(dead_mask, k_aux), k_aux)
    if n_aux:
        masked = pre_acts.masked_fill(~dead_mask, float("-inf"))  # (B, num_latents)
        aux_values, aux_indices = masked.topk(n_aux, dim=-1)  # (B, k_aux')
    else:
        aux_values = pre_acts[:, :0]  # (B, 0), still part of the graph
        aux_indices = latent_indices[:, :0]
    acts, aux_acts = values.relu().to(x.dtype), aux_values.relu().to(x.dtype)
    return EncodeOutput(acts, latent_indices, aux_acts, aux_indices)


def _dead_ids(dead_mask: Tensor | None, k_aux: int) -> Tensor | None:
    """(num_dead,) ids of the dead latents when AuxK runs, else None. One host sync."""
    return dead_mask.nonzero().squeeze(1) if dead_mask is not None and k_aux else None


def _num_aux(dead_ids: Tensor | None, k_aux: int) -> int:
    """k_aux' = min(k_aux, number of dead latents): no aux slot without a dead latent."""
    return 0 if dead_ids is None else min(k_aux, dead_ids.numel())


def _pack(W_enc: Tensor, rows: int) -> Tensor:
    """W_enc in MKL's packed layout for matmuls of `rows` rows (see MKL_PACKED)."""
    return torch.ops.mkl._mkl_reorder_linear_weight(W_enc.contiguous(), rows)


def _encode_torch(x, W_enc, b_enc, k, dead_mask, k_aux, dead_ids) -> EncodeOutput:
    """Matmul chunk by chunk, selecting top-k (and aux) from each chunk before the next.

    `k_aux` is k_aux' (see `_num_aux`); `dead_ids`: `dead_mask`'s nonzero entries.
    """
    B, N = x.shape[0], W_enc.shape[0]
    out_dtype, on_cpu = x.dtype, x.device.type == "cpu"
    acts = torch.empty(B, k, dtype=out_dtype, device=x.device)  # (B, k)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    aux_acts = torch.empty(B, k_aux, dtype=out_dtype, device=x.device)  # (B, k_aux')
    aux_indices = torch.empty(B, k_aux, dtype=torch.int64, device=x.device)
    packed = on_cpu and MKL_PACKED and B >= PACKED_MIN_ROWS
    packed = packed and x.dtype == W_enc.dtype == b_enc.dtype == torch.float32
    chunk = PACKED_CHUNK_ROWS if packed else CPU_CHUNK_ROWS if on_cpu else max(B, 1)
    if packed:
        W_packed = _pack(W_enc, chunk)
    else:
        buffer = torch.empty(min(chunk, B), N, dtype=x.dtype, device=x.device)
    for start in range(0, B, chunk):
        end = min(B, start + chunk)
        if packed:  # (rows, N), a new tensor: the op has no out=
            pre_acts = torch.ops.mkl._mkl_linear(x[start:end], W_packed, W_enc, b_enc, chunk)
        else:
            pre_acts = torch.addmm(b_enc, x[start:end], W_enc.t(), out=buffer[: end - start])
        every_dead_is_aux = k_aux and k_aux == dead_ids.numel()
        if radix_applies(pre_acts) and not every_dead_is_aux:
            # The radix select takes the aux selection from the main selection's loads.
            values, indices[start:end], aux_values, aux_indices[start:end] = radix_topk(
                pre_acts, k, dead_mask, k_aux
            )
            acts[start:end] = values.relu()
            aux_acts[start:end] = aux_values.relu()
        else:
            values, indices[start:end] = select_topk(pre_acts, k)
            acts[start:end] = values.relu()
            # Aux rows are left unsorted: sorting k_aux=288 of ~800 costs as much as selecting.
            if every_dead_is_aux:
                aux_indices[start:end] = dead_ids
                aux_acts[start:end] = pre_acts.index_select(1, dead_ids).relu_()
            elif k_aux and 2 * dead_ids.numel() <= N:  # few dead: select among their columns
                values, local = select_topk(pre_acts.index_select(1, dead_ids), k_aux, False)
                aux_indices[start:end] = dead_ids[local]
                aux_acts[start:end] = values.relu()
            elif k_aux:
                pre_acts.masked_fill_(~dead_mask, float("-inf"))
                values, aux_indices[start:end] = select_topk(pre_acts, k_aux, False)
                aux_acts[start:end] = values.relu()
        del pre_acts  # before the next chunk's is allocated: the allocator can reuse it
    return EncodeOutput(acts, indices, aux_acts, aux_indices)


def _fused_blocks(KP: int, KAP: int, dtype: torch.dtype, interpreted: bool):
    """(BLOCK_B, BLOCK_N, BLOCK_D, num_warps) of the fused kernel for these widths."""
    if interpreted:
        return 16, max(16, KP, KAP), 32, 4
    if FUSED_BLOCKS is not None:
        BLOCK_B, BLOCK_N, BLOCK_D, num_warps = FUSED_BLOCKS
        return BLOCK_B, max(BLOCK_N, KP, KAP), BLOCK_D, num_warps
    # bf16, k=32: (64, 128, 64, 8) was the fastest of eight tile sizes on an H200 (4.2 ms
    # against 5.4-13.8 ms at B=4096, d_in=3072, 24576 latents); wider running tops need
    # fewer rows per program to stay in registers.
    width = KP + KAP
    if dtype != torch.float32:
        BLOCK_B = 64 if width <= 33 else 32 if width <= 160 else 16
        return BLOCK_B, max(128, KP, KAP), 64, 8
    BLOCK_B = 32 if width <= 129 else 16
    return BLOCK_B, max(64, KP, KAP), 32, 8


def _encode_triton(x, W_enc, b_enc, k, dead_mask, k_aux, dead_ids) -> EncodeOutput:
    """The fused kernel when k (and k_aux) are small enough, else matmul + torch.topk."""
    B, D = x.shape
    N = W_enc.shape[0]
    KP, KAP = _pow2(k, 1, 1 << 30), _pow2(k_aux, 1, 1 << 30)
    interpreted = x.device.type != "cuda"
    if KP > MAX_FUSED_K or not (FUSE_ON_CUDA or interpreted and FUSE_UNDER_INTERPRETER):
        return _encode_torch(x, W_enc, b_enc, k, dead_mask, k_aux, dead_ids)
    fuse_aux = 0 < k_aux and KAP <= MAX_FUSED_K
    KAP = KAP if fuse_aux else 1
    BLOCK_B, BLOCK_N, BLOCK_D, num_warps = _fused_blocks(KP, KAP, x.dtype, interpreted)
    row_blocks, tiles = triton.cdiv(B, BLOCK_B), triton.cdiv(N, BLOCK_N)
    if interpreted:
        splits = min(2, tiles)  # still exercises the merge across splits
    else:  # enough programs for ~4 per SM
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        splits = max(1, min(tiles, triton.cdiv(4 * sms, row_blocks)))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    keys = torch.empty(B, splits * KP, dtype=torch.int64, device=x.device)  # (B, splits * KP)
    aux_keys = keys.new_empty(B, splits * KAP) if fuse_aux else keys  # (B, splits * KAP)
    exact = x.dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest"
    _encode_topk_kernel[(row_blocks, splits)](
        x, W_enc, b_enc, dead_mask if fuse_aux else x, keys, aux_keys,
        B, N, D, tiles_per_split,
        KP=KP, KAP=KAP, HAS_AUX=fuse_aux, NEG=NEG_KEY,
        PRECISION="ieee" if exact else "tf32", UPCAST=interpreted,
        BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )  # fmt: skip
    # The best k of the splits' candidates: keys sort like (value, column), largest first.
    values, indices = unpack_keys(keys.topk(k, dim=1).values)  # (B, k)
    acts = values.relu().to(x.dtype)
    if fuse_aux:
        aux_values, aux_indices = unpack_keys(aux_keys.topk(k_aux, dim=1).values)
    elif k_aux:  # large k_aux: a second, smaller matmul over the dead latents only
        pre_dead = F.linear(x, W_enc[dead_ids], b_enc[dead_ids])  # (B, num_dead)
        aux_values, local = pre_dead.topk(k_aux, dim=-1)  # (B, k_aux')
        aux_indices = dead_ids[local]
    else:
        aux_values, aux_indices = values[:, :0], indices[:, :0]
    return EncodeOutput(acts, indices, aux_values.relu().to(x.dtype), aux_indices)


def _matmul_dtype(dtype: torch.dtype, device: torch.device, triton_path: bool) -> torch.dtype:
    """The dtype the encoder matmul runs in for outputs in `dtype`: fp32 on the torch path on
    CPUs whose half matmuls are slower (`CPU_FAST_HALF_MATMUL`), else `dtype` itself."""
    if not triton_path and device.type == "cpu" and not CPU_FAST_HALF_MATMUL:
        return torch.float32
    return dtype


class EncodeTopkFunction(torch.autograd.Function):
    """Top-k (+ AuxK) encoder whose backward touches only the selected columns.

    ``apply(x, W_enc, b_enc, b_dec, k, dead_mask, dead_ids, k_aux, dtype)``: the top k of
    (x - b_dec) @ W_enc.T + b_enc (b_dec may be None), latent values in `dtype` (the autocast
    dtype, or x's); the inputs keep their own dtypes and their gradients come back in them,
    W_enc's and b_enc's summed in fp32 and never rounded to `dtype` on the way. `dead_ids`:
    dead_mask's nonzero entries (or None without AuxK). The returned index tensors carry
    their dense-or-sparse plans (`sparse_ops.plan_rows`), made from the rows they can name,
    so neither the decoder nor this backward counts rows again.

    b_dec's gradient is minus the sum over tokens of x's, which is the (num_latents,) sum of
    the pre-activation gradients times W_enc: one matrix-vector product. So where x needs no
    gradient (an SAE's training inputs), no (B, d_in) gradient is built at all.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, dead_mask, dead_ids, k_aux: int, dtype):
        triton_path = use_triton(x.device)
        mm_dtype = _matmul_dtype(dtype, x.device, triton_path)
        x_in = x  # minus b_dec in fp32 for half inputs too: rounded once, to the matmul's dtype
        if b_dec is not None:
            x_in = x.float() - b_dec.float()  # (B, d_in); no copies where both are fp32
        x_mm, W_mm = x_in.to(mm_dtype), W_enc.to(mm_dtype)  # no copy where already in it
        if x.shape[0] == 0:
            out = encode_topk_reference(x_mm, W_mm, b_enc.to(mm_dtype), k, dead_mask, k_aux)
        else:
            encode = _encode_triton if triton_path else _encode_torch
            out = encode(x_mm, W_mm, b_enc.to(mm_dtype), k, dead_mask, k_aux, dead_ids)
        out = out._replace(latent_acts=out.latent_acts.to(dtype), aux_acts=out.aux_acts.to(dtype))
        N = W_enc.shape[0]
        plan_rows(out.latent_indices, N)
        plan_rows(out.aux_indices, N, dead_ids)
        ctx.mark_non_differentiable(out.latent_indices, out.aux_indices)
        ctx.save_for_backward(x_mm, W_mm, W_enc, *out)
        ctx.dtypes = (x.dtype, W_enc.dtype, b_enc.dtype, None if b_dec is None else b_dec.dtype)
        ctx.set_materialize_grads(False)  # an unused aux output costs no backward work
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_acts, _grad_indices, grad_aux, _grad_aux_indices):
        x, W_enc, W_master, acts, indices, aux_acts, aux_indices = ctx.saved_tensors
        x_dtype, W_dtype, b_dtype, shift_dtype = ctx.dtypes  # x, W_enc: as the matmul read them
        N = W_enc.shape[0]
        needs_x, needs_W, needs_b, needs_shift = ctx.needs_input_grad[:4]
        grad_x = grad_W = grad_b = grad_shift = None
        if needs_b or needs_shift:  # per latent: the summed gradient of its pre-activations
            grad_b = torch.zeros(N, device=x.device)  # fp32
        # Main and aux selections apart: the aux ones name few distinct (dead) latents, which
        # the CPU path handles densely (see sparse_ops.compact_rows).
        groups = [
            (grad, values, ids)
            for grad, values, ids in ((grad_acts, acts, indices), (grad_aux, aux_acts, aux_indices))
            if grad is not None and ids.shape[1]
        ]
        for grad, values, ids in groups:
            # relu: the gradient of the pre-activation passes only where the value is > 0.
            grad_pre = (grad * (values > 0)).to(W_enc.dtype).contiguous()  # (B, k)
            compact = compact_rows(ids, N)
            if needs_x:  # two groups: sum them in fp32, round once
                part = gather_combine(grad_pre, ids, W_enc, compact, fp32_out=len(groups) > 1)
                grad_x = part if grad_x is None else grad_x.add_(part)  # (B, d_in)
            if needs_W:  # one group: rounded once, straight to W_enc's dtype
                dtype = W_dtype if len(groups) == 1 else torch.float32
                grad_W = scatter_outer(grad_pre, ids, x, N, grad_W, grad_b, compact, dtype)
            elif grad_b is not None:
                grad_b.index_add_(0, ids.reshape(-1), grad_pre.reshape(-1).float())
        if grad_x is not None:
            grad_x = grad_x.to(x_dtype)
        if grad_W is not None:
            grad_W = grad_W.to(W_dtype)  # (num_latents, d_in)
        if needs_shift:  # -sum_b grad_x[b] = -(grad_b @ W_enc), with W_enc's own values
            grad_shift = (grad_b.to(W_master.dtype) @ W_master).neg_().to(shift_dtype)  # (d_in,)
        if grad_b is not None:
            grad_b = grad_b.to(b_dtype) if needs_b else None  # (num_latents,)
        return grad_x, grad_W, grad_b, grad_shift, None, None, None, None, None


def _check_encode(x, W_enc, b_enc, k, dead_mask, k_aux, b_dec, same_dtype: bool) -> None:
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[1]:
        raise ValueError(
            f"encode_topk: x must be (B, d_in) and W_enc (num_latents, d_in), got x "
            f"{tuple(x.shape)} and W_enc {tuple(W_enc.shape)}."
        )
    N = W_enc.shape[0]
    if b_enc.shape != (N,):
        raise ValueError(f"encode_topk: b_enc must be ({N},), got {tuple(b_enc.shape)}.")
    if b_dec is not None and b_dec.shape != (x.shape[1],):
        raise ValueError(f"encode_topk: b_dec must be ({x.shape[1]},), got {tuple(b_dec.shape)}.")
    if not 1 <= k <= N:
        raise ValueError(f"encode_topk: k must be in [1, num_latents={N}], got {k}.")
    if k_aux < 0:
        raise ValueError(f"encode_topk: k_aux must be >= 0, got {k_aux}.")
    if dead_mask is not None and (dead_mask.shape != (N,) or dead_mask.dtype != torch.bool):
        raise ValueError(
            f"encode_topk: dead_mask must be a ({N},) bool tensor, got "
            f"{tuple(dead_mask.shape)} {dead_mask.dtype}."
        )
    floats = (("x", x), ("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec))
    for name, t in (pair for pair in floats if pair[1] is not None):
        if not t.is_floating_point():
            raise ValueError(f"encode_topk: {name} must be a float tensor, got {t.dtype}.")
        if same_dtype and t.dtype != x.dtype:
            raise ValueError(
                f"encode_topk: x is {x.dtype} but {name} is {t.dtype}; cast one to the other "
                "(or run under torch.autocast)."
            )
    for name, t in (*floats, ("dead_mask", dead_mask)):
        if t is not None and t.device != x.device:
            raise ValueError(f"encode_topk: {name} is on {t.device} but x is on {x.device}.")
        if t is not None and not t.is_contiguous():
            raise ValueError(f"encode_topk: {name} must be contiguous; call .contiguous() first.")


def encode_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    *,
    b_dec: Tensor | None = None,
) -> EncodeOutput:
    """Top-k latents of (x - b_dec) @ W_enc.T + b_enc, and the top k_aux among dead latents.

    Args:
        x: (B, d_in) input.
        W_enc: (num_latents, d_in), nn.Linear layout; b_enc: (num_latents,). Same dtype
            as x (any float dtypes under torch.autocast).
        k: latents kept per token, 1 <= k <= num_latents.
        dead_mask: (num_latents,) bool, True for dead latents (AuxK; Gao et al. 2024).
        k_aux: aux latents per token, chosen among dead ones only; capped at their number.
        b_dec: optional (d_in,) shift subtracted from x first (the SAE's decoder bias). Its
            gradient costs one (num_latents,) @ W_enc product where ``x - b_dec`` computed
            outside would cost a (B, d_in) gradient of x: pass it here.

    Returns an `EncodeOutput`. Differentiable w.r.t. x, W_enc, b_enc and b_dec through
    latent_acts and aux_acts; the backward is sparse. Under torch.autocast the inputs may
    have any float dtypes: the matmul runs in the autocast dtype, as F.linear's would (in
    fp32 on CPUs whose half matmuls are slower), the latent values come out in it, and the
    gradients go back in each input's own dtype, W_enc's and b_enc's summed in fp32.
    """
    cast = autocast_dtype(x.device)
    _check_encode(x, W_enc, b_enc, k, dead_mask, k_aux, b_dec, same_dtype=cast is None)
    dead_ids = _dead_ids(dead_mask, k_aux)  # (num_dead,): the step's one host sync
    n_aux = _num_aux(dead_ids, k_aux)
    with torch.autocast(x.device.type, enabled=False):
        args = (k, dead_mask, dead_ids, n_aux, cast or x.dtype)
        out = EncodeTopkFunction.apply(x, W_enc, b_enc, b_dec, *args)
    return EncodeOutput(*out)
