"""Top-k encoder with a sparse backward, and the AuxK selection among dead latents.

pre_acts = x @ W_enc.T + b_enc; the k largest per token are kept (relu'd), and with a
dead_mask the k_aux largest among dead latents too, for the AuxK loss of Gao et al. (2024).
Issue #4, parts 2 and 3: the backward reads only the selected columns (grad W_enc,
grad b_enc and grad x from k (+ k_aux) columns per token; no dense (B, num_latents)
gradient), and on CUDA the selection runs inside the encoder matmul so the
(B, num_latents) pre-activations are never written. The four parts:
`encode_topk_reference` (pure torch), `_encode_topk_kernel` (Triton), the host checks in
`encode_topk`, and `EncodeTopkFunction`.

    latent_acts, latent_indices, aux_acts, aux_indices = encode_topk(x, W_enc, b_enc, k)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import CPU_FAST_HALF_MATMUL, HAS_TRITON, triton_interpreted, use_triton
from .sparse_ops import _pow2, gather_combine, scatter_outer
from .topk import NEG_KEY, select_topk

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .topk import merge_topk, pack_keys, unpack_keys

    @triton.jit
    def _encode_topk_kernel(
        x_ptr, w_ptr, b_ptr, dead_ptr, acts_ptr, idx_ptr, aux_acts_ptr, aux_idx_ptr,
        B, N, D, k, k_aux,
        KP: tl.constexpr, KAP: tl.constexpr, HAS_AUX: tl.constexpr, NEG: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One program per BLOCK_B tokens: sweep the latents BLOCK_N at a time, computing the
        # pre-activation tile and folding it into a running top-KP (and top-KAP among dead
        # latents) of packed (value, column) keys, so (B, num_latents) never reaches memory.
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        mask_b = offs_b < B
        offs_b = offs_b.to(tl.int64)
        best = tl.full((BLOCK_B, KP), NEG, tl.int64)
        aux_best = tl.full((BLOCK_B, KAP), NEG, tl.int64)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
            mask_n = offs_n < N
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
                acc = tl.dot(x_tile, tl.trans(w_tile), acc, input_precision=PRECISION)
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            keys = pack_keys(acc + bias[None, :], offs_n[None, :])  # (BLOCK_B, BLOCK_N)
            keys = tl.where(mask_n[None, :], keys, NEG)
            best = merge_topk(best, keys, KP, BLOCK_N)
            if HAS_AUX:
                dead = tl.load(dead_ptr + offs_n, mask=mask_n, other=0) != 0  # (BLOCK_N,)
                aux_keys = tl.where(dead[None, :], keys, NEG)
                aux_best = merge_topk(aux_best, aux_keys, KAP, BLOCK_N)
        # Keys come out sorted, largest first: the first k are the top k.
        values, columns = unpack_keys(best)  # (BLOCK_B, KP)
        offs_k = tl.arange(0, KP)
        out = offs_b[:, None] * k + offs_k[None, :]
        mask = mask_b[:, None] & (offs_k[None, :] < k)
        tl.store(acts_ptr + out, tl.maximum(values, 0.0).to(acts_ptr.dtype.element_ty), mask=mask)
        tl.store(idx_ptr + out, columns.to(tl.int64), mask=mask)
        if HAS_AUX:
            values, columns = unpack_keys(aux_best)  # (BLOCK_B, KAP)
            offs_k = tl.arange(0, KAP)
            out = offs_b[:, None] * k_aux + offs_k[None, :]
            mask = mask_b[:, None] & (offs_k[None, :] < k_aux)
            aux_values = tl.maximum(values, 0.0).to(aux_acts_ptr.dtype.element_ty)
            tl.store(aux_acts_ptr + out, aux_values, mask=mask)
            tl.store(aux_idx_ptr + out, columns.to(tl.int64), mask=mask)


# Fuse the selection into the matmul when the running top-k fits in registers beside the
# tile; larger k (or k_aux) use the matmul plus torch.topk.
MAX_FUSED_K = 128
# Rows of pre-activations per chunk on CPU: 512 x 16384 fp32 is 32 MiB, in L3 for the
# group-max pass of the selection, and the full (B, num_latents) is never held at once.
CPU_CHUNK_ROWS = 512


class EncodeOutput(NamedTuple):
    """What `encode_topk` returns; rows sorted by pre-activation, largest first."""

    latent_acts: Tensor
    """(B, k) relu of the k largest pre-activations, in x's dtype."""
    latent_indices: Tensor
    """(B, k) int64 latent ids of latent_acts."""
    aux_acts: Tensor
    """(B, k_aux') relu of the k_aux' largest pre-activations among dead latents, where
    k_aux' = min(k_aux, number of dead latents): (B, 0) when none is dead."""
    aux_indices: Tensor
    """(B, k_aux') int64 latent ids of aux_acts."""


def encode_topk_reference(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0
) -> EncodeOutput:
    """Pure-torch Top-k encoder (dense autograd), in fp32, outputs in x's dtype."""
    pre_acts = F.linear(x.float(), W_enc.float(), b_enc.float())  # (B, num_latents)
    values, latent_indices = pre_acts.topk(k, dim=-1)  # (B, k)
    n_aux = _num_aux(dead_mask, k_aux)
    if n_aux:
        masked = pre_acts.masked_fill(~dead_mask, float("-inf"))  # (B, num_latents)
        aux_values, aux_indices = masked.topk(n_aux, dim=-1)  # (B, k_aux')
    else:
        aux_values = pre_acts.new_zeros(x.shape[0], 0)
        aux_indices = latent_indices.new_zeros(x.shape[0], 0)
    acts, aux_acts = values.relu().to(x.dtype), aux_values.relu().to(x.dtype)
    return EncodeOutput(acts, latent_indices, aux_acts, aux_indices)


def _num_aux(dead_mask: Tensor | None, k_aux: int) -> int:
    """k_aux' = min(k_aux, number of dead latents): no aux slot without a dead latent."""
    if dead_mask is None or k_aux == 0:
        return 0
    return min(k_aux, int(dead_mask.sum()))


def _encode_torch(x, W_enc, b_enc, k, dead_mask, k_aux) -> EncodeOutput:
    """Matmul chunk by chunk, selecting top-k (and aux) from each chunk before the next."""
    B, N = x.shape[0], W_enc.shape[0]
    out_dtype, on_cpu = x.dtype, x.device.type == "cpu"
    if on_cpu and x.dtype != torch.float32 and not CPU_FAST_HALF_MATMUL:
        x, W_enc, b_enc = x.float(), W_enc.float(), b_enc.float()
    acts = torch.empty(B, k, dtype=out_dtype, device=x.device)  # (B, k)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    aux_acts = torch.empty(B, k_aux, dtype=out_dtype, device=x.device)  # (B, k_aux')
    aux_indices = torch.empty(B, k_aux, dtype=torch.int64, device=x.device)
    dead_ids = dead_mask.nonzero().squeeze(1) if k_aux else None  # (num_dead,)
    chunk = CPU_CHUNK_ROWS if on_cpu else max(B, 1)
    buffer = torch.empty(min(chunk, B), N, dtype=x.dtype, device=x.device)
    for start in range(0, B, chunk):
        end = min(B, start + chunk)
        pre_acts = torch.addmm(b_enc, x[start:end], W_enc.t(), out=buffer[: end - start])
        values, indices[start:end] = select_topk(pre_acts, k)
        acts[start:end] = values.relu()
        if k_aux and 2 * dead_ids.numel() <= N:  # few dead: select from their columns only
            values, local = select_topk(pre_acts.index_select(1, dead_ids), k_aux)
            aux_indices[start:end] = dead_ids[local]
            aux_acts[start:end] = values.relu()
        elif k_aux:
            pre_acts.masked_fill_(~dead_mask, float("-inf"))
            values, aux_indices[start:end] = select_topk(pre_acts, k_aux)
            aux_acts[start:end] = values.relu()
    return EncodeOutput(acts, indices, aux_acts, aux_indices)


def _encode_triton(x, W_enc, b_enc, k, dead_mask, k_aux) -> EncodeOutput:
    """The fused kernel when k (and k_aux) are small enough, else matmul + torch.topk."""
    B, D = x.shape
    N = W_enc.shape[0]
    KP, KAP = _pow2(k, 1, 1 << 30), _pow2(k_aux, 1, 1 << 30)
    if KP > MAX_FUSED_K:
        return _encode_torch(x, W_enc, b_enc, k, dead_mask, k_aux)
    fuse_aux = 0 < k_aux and KAP <= MAX_FUSED_K
    acts = torch.empty(B, k, dtype=x.dtype, device=x.device)  # (B, k)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    aux_acts = torch.empty(B, k_aux, dtype=x.dtype, device=x.device)  # (B, k_aux')
    aux_indices = torch.empty(B, k_aux, dtype=torch.int64, device=x.device)
    interpreted = x.device.type != "cuda" and triton_interpreted()
    BLOCK_B, BLOCK_D = (16, 32) if interpreted else (64, 64)
    BLOCK_N = max(16 if interpreted else 64, KP, KAP if fuse_aux else 1)
    exact = x.dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest"
    _encode_topk_kernel[(triton.cdiv(B, BLOCK_B),)](
        x, W_enc, b_enc, dead_mask if fuse_aux else x, acts, indices, aux_acts, aux_indices,
        B, N, D, k, k_aux,
        KP=KP, KAP=KAP if fuse_aux else 1, HAS_AUX=fuse_aux, NEG=NEG_KEY,
        PRECISION="ieee" if exact else "tf32",
        BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    if k_aux and not fuse_aux:  # large k_aux: a second, smaller matmul over dead latents
        dead_ids = dead_mask.nonzero().squeeze(1)  # (num_dead,)
        pre_dead = F.linear(x, W_enc[dead_ids], b_enc[dead_ids])  # (B, num_dead)
        values, local = pre_dead.topk(k_aux, dim=-1)  # (B, k_aux')
        aux_acts.copy_(values.relu())
        aux_indices.copy_(dead_ids[local])
    return EncodeOutput(acts, indices, aux_acts, aux_indices)


class EncodeTopkFunction(torch.autograd.Function):
    """Top-k (+ AuxK) encoder whose backward touches only the selected columns."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k: int, dead_mask, k_aux: int):
        encode = _encode_triton if use_triton(x.device) else _encode_torch
        if x.shape[0] == 0:
            encode = encode_topk_reference
        out = encode(x, W_enc, b_enc, k, dead_mask, k_aux)
        ctx.mark_non_differentiable(out.latent_indices, out.aux_indices)
        ctx.save_for_backward(x, W_enc, *out)
        ctx.set_materialize_grads(False)  # an unused aux output costs no backward work
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_acts, _grad_indices, grad_aux, _grad_aux_indices):
        x, W_enc, acts, indices, aux_acts, aux_indices = ctx.saved_tensors
        # relu: the gradient passes only where the activation is positive.
        grads, ids = [], []
        if grad_acts is not None:
            grads.append(grad_acts * (acts > 0))  # (B, k)
            ids.append(indices)
        if grad_aux is not None and aux_indices.shape[1]:
            grads.append(grad_aux * (aux_acts > 0))  # (B, k_aux')
            ids.append(aux_indices)
        if not grads:
            return None, None, None, None, None, None
        grad_pre = torch.cat(grads, 1).to(x.dtype).contiguous()  # (B, k + k_aux')
        ids = torch.cat(ids, 1).contiguous()  # (B, k + k_aux'), may repeat
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = gather_combine(grad_pre, ids, W_enc)  # (B, d_in)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_W, grad_b = scatter_outer(
                grad_pre, ids, x, W_enc.shape[0], with_bias=ctx.needs_input_grad[2]
            )  # (num_latents, d_in), (num_latents,)
            grad_W = grad_W.to(W_enc.dtype) if ctx.needs_input_grad[1] else None
            grad_b = grad_b.to(W_enc.dtype) if grad_b is not None else None
        return grad_x, grad_W, grad_b, None, None, None


def _check_encode(x, W_enc, b_enc, k, dead_mask, k_aux) -> None:
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[1]:
        raise ValueError(
            f"encode_topk: x must be (B, d_in) and W_enc (num_latents, d_in), got x "
            f"{tuple(x.shape)} and W_enc {tuple(W_enc.shape)}."
        )
    N = W_enc.shape[0]
    if b_enc.shape != (N,):
        raise ValueError(f"encode_topk: b_enc must be ({N},), got {tuple(b_enc.shape)}.")
    if not 1 <= k <= N:
        raise ValueError(f"encode_topk: k must be in [1, num_latents={N}], got {k}.")
    if k_aux < 0:
        raise ValueError(f"encode_topk: k_aux must be >= 0, got {k_aux}.")
    if dead_mask is not None and (dead_mask.shape != (N,) or dead_mask.dtype != torch.bool):
        raise ValueError(
            f"encode_topk: dead_mask must be a ({N},) bool tensor, got "
            f"{tuple(dead_mask.shape)} {dead_mask.dtype}."
        )
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc)):
        if t.dtype != x.dtype:
            raise ValueError(
                f"encode_topk: x is {x.dtype} but {name} is {t.dtype}; cast one to the other "
                "(or run under torch.autocast)."
            )
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc), ("dead_mask", dead_mask)):
        if t is not None and t.device != x.device:
            raise ValueError(f"encode_topk: {name} is on {t.device} but x is on {x.device}.")
        if t is not None and not t.is_contiguous():
            raise ValueError(f"encode_topk: {name} must be contiguous; call .contiguous() first.")


def encode_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0
) -> EncodeOutput:
    """Top-k latents of x @ W_enc.T + b_enc, and the top k_aux among dead latents.

    Args:
        x: (B, d_in) input, b_dec already subtracted.
        W_enc: (num_latents, d_in), nn.Linear layout; b_enc: (num_latents,). Same dtype as x.
        k: latents kept per token, 1 <= k <= num_latents.
        dead_mask: (num_latents,) bool, True for dead latents (AuxK; Gao et al. 2024).
        k_aux: aux latents per token, chosen among dead ones only; capped at their number.

    Returns an `EncodeOutput`. Differentiable w.r.t. x, W_enc and b_enc through latent_acts
    and aux_acts; the backward is sparse. Under torch.autocast the float inputs are cast
    to the autocast dtype first, as F.linear would.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, W_enc, b_enc = x.to(dtype), W_enc.to(dtype), b_enc.to(dtype)
    _check_encode(x, W_enc, b_enc, k, dead_mask, k_aux)
    with torch.autocast(device_type, enabled=False):
        out = EncodeTopkFunction.apply(x, W_enc, b_enc, k, dead_mask, _num_aux(dead_mask, k_aux))
    return EncodeOutput(*out)
