"""Decoder-norm step: keep the rows of W_dec unit-norm (issue #4, part 4).

Before the optimizer step, `project_decoder_grad_` removes from each row's gradient its
component along the row (the step then moves rows along the unit sphere, to first order);
after the step, `normalize_decoder_` rescales rows to unit norm. `decoder_norm_step` does
both in one pass over W_dec and its gradient. All three work in place and in fp32, on any
float dtype. The four parts: the `*_reference` functions (pure torch),
`_decoder_norm_kernel` (Triton), the host checks in `_check`, and no autograd.Function:
these are optimizer-side updates under no_grad.

    project_decoder_grad_(sae.W_dec, sae.W_dec.grad); optimizer.step()
    normalize_decoder_(sae.W_dec)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import HAS_TRITON, use_triton
from .sparse_ops import _pow2

# Rows whose squared norm is below this are left as they are rather than blown up.
_TINY = torch.finfo(torch.float32).tiny
_ROWS = 512
# Rows up to this wide are read once on the Triton path, held in registers (16 fp32 values
# per thread and tensor at 4096 wide, 8 warps); wider ones in two sweeps over 256-wide
# tiles, the second reading W_dec (and the gradient) again. On an H200 at d_in=3072 the
# two-sweep kernel took 0.30 ms a call (session 2's profile), where one read and one write
# of W_dec (and its gradient) at 4.8 TB/s would take 0.13 ms (0.19 ms with the gradient).
ONE_SWEEP_MAX_D = 8192

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _decoder_norm_kernel(
        w_ptr, g_ptr, N, D, eps,
        PROJECT: tl.constexpr, NORMALIZE: tl.constexpr, ONE_SWEEP: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One program per BLOCK_R rows. ONE_SWEEP (the rows fit one tile, BLOCK_D >= D): read
        # them once and keep them in registers for the write. Otherwise one sweep for |w|^2
        # and <g, w>, and a second that reads the rows again to write them.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        mask_r = rows < N
        rows = rows.to(tl.int64)
        if ONE_SWEEP:
            offs = rows[:, None] * D + tl.arange(0, BLOCK_D)[None, :]  # (BLOCK_R, BLOCK_D)
            mask = mask_r[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :]
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sq = tl.sum(w * w, axis=1)  # (BLOCK_R,)
            if PROJECT:
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                coef = tl.sum(w * g, axis=1) / tl.maximum(sq, 1.1754943508222875e-38)
                g -= coef[:, None] * w
                tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
            if NORMALIZE:
                w = w * (1.0 / (tl.sqrt(sq) + eps))[:, None]
                tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=mask)
        else:
            sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
            dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs = rows[:, None] * D + (d0 + tl.arange(0, BLOCK_D))[None, :]
                mask = mask_r[:, None] & ((d0 + tl.arange(0, BLOCK_D)) < D)[None, :]
                w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                sq += tl.sum(w * w, axis=1)
                if PROJECT:
                    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    dot += tl.sum(w * g, axis=1)
            coef = dot / tl.maximum(sq, 1.1754943508222875e-38)  # <g, w> / |w|^2
            scale = 1.0 / (tl.sqrt(sq) + eps)
            for d0 in range(0, D, BLOCK_D):
                offs = rows[:, None] * D + (d0 + tl.arange(0, BLOCK_D))[None, :]
                mask = mask_r[:, None] & ((d0 + tl.arange(0, BLOCK_D)) < D)[None, :]
                w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if PROJECT:
                    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    g -= coef[:, None] * w
                    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
                if NORMALIZE:
                    w = w * scale[:, None]
                    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=mask)


def project_decoder_grad_reference(W_dec: Tensor, grad: Tensor) -> Tensor:
    """grad - (<grad, w> / |w|^2) w for each row w of W_dec, in fp32. (num_latents, d_in)."""
    W, g = W_dec.float(), grad.float()
    coef = (g * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True).clamp_min(_TINY)
    return (g - coef * W).to(grad.dtype)


def normalize_decoder_reference(W_dec: Tensor) -> Tensor:
    """W_dec with rows divided by (their norm + eps), in fp32. (num_latents, d_in)."""
    W = W_dec.float()
    eps = torch.finfo(W_dec.dtype).eps
    return (W / (W.norm(dim=1, keepdim=True) + eps)).to(W_dec.dtype)


def _check(name: str, W_dec: Tensor, grad: Tensor | None) -> None:
    if W_dec.dim() != 2 or not W_dec.is_floating_point():
        raise ValueError(
            f"{name}: W_dec must be a (num_latents, d_in) float tensor, got "
            f"{tuple(W_dec.shape)} {W_dec.dtype}."
        )
    if grad is not None and (grad.shape != W_dec.shape or grad.device != W_dec.device):
        raise ValueError(
            f"{name}: grad {tuple(grad.shape)} on {grad.device} must match W_dec "
            f"{tuple(W_dec.shape)} on {W_dec.device}; is W_dec.grad None (call after backward)?"
        )
    for what, t in (("W_dec", W_dec), ("grad", grad)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: {what} must be contiguous to be updated in place.")


def _tiles(D: int, interpreted: bool) -> tuple[bool, int, int, int]:
    """(ONE_SWEEP, BLOCK_R, BLOCK_D, num_warps) of the Triton kernel for rows D wide."""
    one_sweep = D <= ONE_SWEEP_MAX_D
    # Two sweeps: 256-wide tiles; 16 under the interpreter, so tests walk several.
    BLOCK_D = _pow2(D, 16, 1 << 30) if one_sweep else 16 if interpreted else 256
    BLOCK_R = max(1, 4096 // BLOCK_D)
    return one_sweep, BLOCK_R, BLOCK_D, 8 if BLOCK_R * BLOCK_D >= 4096 else 4


@torch.no_grad()
def _run(W_dec: Tensor, grad: Tensor | None, project: bool, normalize: bool) -> None:
    N, D = W_dec.shape
    eps = torch.finfo(W_dec.dtype).eps
    if N == 0:
        return
    if use_triton(W_dec.device):
        one_sweep, BLOCK_R, BLOCK_D, num_warps = _tiles(D, W_dec.device.type == "cpu")
        _decoder_norm_kernel[(triton.cdiv(N, BLOCK_R),)](
            W_dec, grad if project else W_dec, N, D, eps,
            PROJECT=project, NORMALIZE=normalize, ONE_SWEEP=one_sweep,
            BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps,
        )  # fmt: skip
        return
    # torch path, in fp32, ROWS rows at a time so the temporaries stay in cache (2.5x faster
    # than whole-tensor ops on one core); fp32 rows are updated through views.
    for start in range(0, N, _ROWS):
        W = W_dec[start : start + _ROWS].float()  # (rows, D)
        sq = (W * W).sum(1, keepdim=True)  # (rows, 1)
        if project:
            g = grad[start : start + _ROWS].float()  # (rows, D)
            coef = (W * g).sum(1, keepdim=True).div_(sq.clamp_min(_TINY))
            g.addcmul_(W, coef, value=-1.0)
            if g.dtype != grad.dtype:
                grad[start : start + _ROWS] = g
        if normalize:
            W.mul_(sq.sqrt_().add_(eps).reciprocal_())
            if W.dtype != W_dec.dtype:
                W_dec[start : start + _ROWS] = W


def project_decoder_grad_(W_dec: Tensor, grad: Tensor) -> Tensor:
    """Remove from each row of `grad` its component along the same row of W_dec, in place.

    Call between backward and optimizer.step(). W_dec: (num_latents, d_in); grad: same
    shape, any float dtype. Returns grad.
    """
    _check("project_decoder_grad_", W_dec, grad)
    _run(W_dec, grad, project=True, normalize=False)
    return grad


def normalize_decoder_(W_dec: Tensor) -> Tensor:
    """Rescale each row of W_dec to unit norm (divided by norm + eps), in place.

    Call after optimizer.step(). Returns W_dec.
    """
    _check("normalize_decoder_", W_dec, None)
    _run(W_dec, None, project=False, normalize=True)
    return W_dec


def decoder_norm_step(W_dec: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """`normalize_decoder_(W_dec)` and `project_decoder_grad_(W_dec, grad)` in one pass.

    The projection uses each row's direction, which the renormalisation keeps. Returns
    (W_dec, grad), both updated in place.
    """
    _check("decoder_norm_step", W_dec, grad)
    _run(W_dec, grad, project=True, normalize=True)
    return W_dec, grad
