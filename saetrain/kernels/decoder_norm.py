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

    from .sparse_ops import _INTERPRETED, _host_bench

    @triton.jit
    def _tile(N, D, d0, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Offsets and mask of this program's (BLOCK_R, BLOCK_D) tile of rows, from column d0."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        cols = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        return offs, (rows < N)[:, None] & (cols < D)[None, :]

    @triton.jit
    def _decoder_norm_kernel(
        w_ptr, g_ptr, N, D, eps,
        PROJECT: tl.constexpr, NORMALIZE: tl.constexpr, ONE_SWEEP: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One program per BLOCK_R rows. ONE_SWEEP (the rows fit one tile, BLOCK_D >= D): read
        # them once and keep them in registers for the write. Otherwise one sweep for |w|^2
        # and <g, w>, and a second that reads the rows again to write them.
        if ONE_SWEEP:
            offs, mask = _tile(N, D, 0, BLOCK_R, BLOCK_D)  # (BLOCK_R, BLOCK_D)
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
                offs, mask = _tile(N, D, d0, BLOCK_R, BLOCK_D)
                w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                sq += tl.sum(w * w, axis=1)
                if PROJECT:
                    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    dot += tl.sum(w * g, axis=1)
            coef = dot / tl.maximum(sq, 1.1754943508222875e-38)  # <g, w> / |w|^2
            scale = 1.0 / (tl.sqrt(sq) + eps)
            for d0 in range(0, D, BLOCK_D):
                offs, mask = _tile(N, D, d0, BLOCK_R, BLOCK_D)
                w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if PROJECT:
                    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    g -= coef[:, None] * w
                    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
                if NORMALIZE:
                    w = w * scale[:, None]
                    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _decoder_adam_kernel(
        w_ptr, g_ptr, m_ptr, v_ptr, scalars_ptr, N, D,
        beta1, beta2, eps, weight_decay, norm_eps,
        PROJECT: tl.constexpr, ONE_SWEEP: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One program per BLOCK_R rows: the gradient's projection, Adam's update of the
        # moments and the row, and the row's renormalisation, in fp32. ONE_SWEEP (BLOCK_D >= D):
        # every tensor is read once and written once from registers; the gradient is only read.
        # Otherwise a sweep for |w|^2 and <g, w>, a sweep that writes the moments and the
        # stepped row while it sums the new row's |w|^2, and a sweep that rescales the row.
        step_size = tl.load(scalars_ptr)  # lr / (1 - beta1^step)
        rsqrt_bc2 = tl.load(scalars_ptr + 1)  # 1 / sqrt(1 - beta2^step)
        if ONE_SWEEP:
            offs, mask = _tile(N, D, 0, BLOCK_R, BLOCK_D)  # (BLOCK_R, BLOCK_D)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if PROJECT:
                sq = tl.sum(w * w, axis=1)
                coef = tl.sum(w * g, axis=1) / tl.maximum(sq, 1.1754943508222875e-38)
                g -= coef[:, None] * w
            g += weight_decay * w  # Adam's L2 term, as torch adds it: after the projection
            m += (1.0 - beta1) * (g - m)
            v = beta2 * v + (1.0 - beta2) * g * g
            w -= step_size * m / (tl.sqrt(v) * rsqrt_bc2 + eps)
            tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
            tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
            w = w * (1.0 / (tl.sqrt(tl.sum(w * w, axis=1)) + norm_eps))[:, None]
            tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=mask)
        else:
            coef = tl.zeros((BLOCK_R,), dtype=tl.float32)
            if PROJECT:
                sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
                dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    offs, mask = _tile(N, D, d0, BLOCK_R, BLOCK_D)
                    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    sq += tl.sum(w * w, axis=1)
                    dot += tl.sum(w * g, axis=1)
                coef = dot / tl.maximum(sq, 1.1754943508222875e-38)  # <g, w> / |w|^2
            sq_new = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs, mask = _tile(N, D, d0, BLOCK_R, BLOCK_D)
                w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                g = g - coef[:, None] * w + weight_decay * w
                m += (1.0 - beta1) * (g - m)
                v = beta2 * v + (1.0 - beta2) * g * g
                w -= step_size * m / (tl.sqrt(v) * rsqrt_bc2 + eps)
                w = w.to(w_ptr.dtype.element_ty)  # the row as stored, so the norm is its own
                sq_new += tl.sum(w.to(tl.float32) * w.to(tl.float32), axis=1)
                tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
                tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
                tl.store(w_ptr + offs, w, mask=mask)
            scale = 1.0 / (tl.sqrt(sq_new) + norm_eps)
            for d0 in range(0, D, BLOCK_D):
                offs, mask = _tile(N, D, d0, BLOCK_R, BLOCK_D)
                w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(w_ptr + offs, (w * scale[:, None]).to(w_ptr.dtype.element_ty), mask=mask)

    # Warps per program, autotuned on the first call for each width: the row tiles hold as
    # many values either way (registers bound them: 96 per thread at 8 warps and d_in 3072
    # on sm_90, 62 at 16), and more warps hide more of the row reductions' latency. Trials
    # step the tensors in place: they are put back after each. The interpreter (CI) tries
    # two, so the restoring is tested too.
    _decoder_adam_tuned = triton.autotune(
        [triton.Config({}, num_warps=w) for w in ((1, 2) if _INTERPRETED else (8, 16))],
        key=["D", "BLOCK_R", "BLOCK_D", "PROJECT"],
        restore_value=["w_ptr", "m_ptr", "v_ptr"],
        do_bench=_host_bench if _INTERPRETED else None,
    )(_decoder_adam_kernel)


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


def decoder_adam_step_reference(
    W_dec: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    project: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Adam's step number `step` (from 1) on W_dec, between the projection of its gradient and
    the renormalisation of its rows, as separate torch ops in fp32. Returns new (W_dec,
    exp_avg, exp_avg_sq) in their dtypes; the inputs are left as they are."""
    beta1, beta2 = betas
    W = W_dec.float()
    g = project_decoder_grad_reference(W, grad.float()) if project else grad.float()
    g = g + weight_decay * W
    m = exp_avg.float().lerp(g, 1 - beta1)
    v = exp_avg_sq.float() * beta2 + (1 - beta2) * g * g
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    W = W - (lr / bias1) * m / (v.sqrt() / bias2**0.5 + eps)
    W = W / (W.norm(dim=1, keepdim=True) + torch.finfo(W_dec.dtype).eps)
    return W.to(W_dec.dtype), m.to(exp_avg.dtype), v.to(exp_avg_sq.dtype)


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


def _tiles(D: int, interpreted: bool, tensors: int = 2) -> tuple[bool, int, int, int]:
    """(ONE_SWEEP, BLOCK_R, BLOCK_D, num_warps) of a Triton kernel for rows D wide that holds
    `tensors` row tiles in registers (2: W_dec and its gradient; 4 with Adam's moments)."""
    one_sweep = D <= ONE_SWEEP_MAX_D * 2 // tensors
    # Two sweeps: 256-wide tiles; 16 under the interpreter, so tests walk several.
    BLOCK_D = _pow2(D, 16, 1 << 30) if one_sweep else 16 if interpreted else 256
    BLOCK_R = max(1, 4096 // BLOCK_D)
    return one_sweep, BLOCK_R, BLOCK_D, 8 if BLOCK_R * BLOCK_D >= 4096 else 4


def _row_sq(W: Tensor) -> Tensor:
    """|w|^2 of each row of an fp32 block: (rows, 1)."""
    return (W * W).sum(1, keepdim=True)


def _project_rows_(W: Tensor, g: Tensor, sq: Tensor) -> None:
    """g -= (<g, w> / |w|^2) w for each row of the fp32 blocks W, g; sq: `_row_sq(W)`."""
    g.addcmul_(W, (W * g).sum(1, keepdim=True).div_(sq.clamp_min(_TINY)), value=-1.0)


def _normalize_rows_(W: Tensor, sq: Tensor, eps: float) -> None:
    """W /= (|w| + eps) for each row of the fp32 block W; sq: `_row_sq(W)`, consumed."""
    W.mul_(sq.sqrt_().add_(eps).reciprocal_())


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
        sq = _row_sq(W)  # (rows, 1)
        if project:
            g = grad[start : start + _ROWS].float()  # (rows, D)
            _project_rows_(W, g, sq)
            if g.dtype != grad.dtype:
                grad[start : start + _ROWS] = g
        if normalize:
            _normalize_rows_(W, sq, eps)
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


@torch.no_grad()
def decoder_adam_step_(
    W_dec: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float | Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    project: bool = True,
) -> Tensor:
    """The decoder's whole optimizer step in one pass: project the gradient off each row,
    take Adam's step, renormalise the rows.

    The same update as `project_decoder_grad_`, `torch.optim.Adam` (amsgrad and maximize off;
    weight_decay as Adam's L2 term, added after the projection) and `normalize_decoder_`, in
    fp32. On the Triton path W_dec, grad and Adam's moments are read once and W_dec and the
    moments written once: 28 bytes per fp32 parameter, where the three separate passes move
    48. The torch path runs the same ops in blocks of rows (on a CPU the three separate ops
    are faster: `DecoderNormAdam` fuses only where the Triton kernels run).

    W_dec, exp_avg, exp_avg_sq: (num_latents, d_in), updated in place; grad: the same shape,
    read only (not projected in place). step: Adam's one-element float step count, on W_dec's
    device (no host sync), incremented here. Returns W_dec.
    """
    _check("decoder_adam_step_", W_dec, grad)
    for what, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != W_dec.shape or t.device != W_dec.device or not t.is_floating_point():
            raise ValueError(
                f"decoder_adam_step_: {what} {tuple(t.shape)} {t.dtype} on {t.device} must be a "
                f"float tensor shaped like W_dec {tuple(W_dec.shape)} on {W_dec.device}."
            )
        if not t.is_contiguous():
            raise ValueError(f"decoder_adam_step_: {what} must be contiguous to update in place.")
    if not (step.numel() == 1 and step.is_floating_point()):
        raise ValueError(
            f"decoder_adam_step_: step must be Adam's one-element float step count, got "
            f"{tuple(step.shape)} {step.dtype}."
        )
    beta1, beta2 = betas
    step.add_(1)
    # Bias corrections in fp64 on the device, so nothing is read back to the host.
    count = step.reshape(()).to(W_dec.device, torch.float64)
    scalars = torch.stack([lr / (1 - beta1**count), (1 - beta2**count).rsqrt()]).float()
    N, D = W_dec.shape
    norm_eps = torch.finfo(W_dec.dtype).eps
    if N == 0:
        return W_dec
    if use_triton(W_dec.device):
        one_sweep, BLOCK_R, BLOCK_D, _ = _tiles(D, W_dec.device.type == "cpu", 4)
        _decoder_adam_tuned[(triton.cdiv(N, BLOCK_R),)](
            W_dec, grad, exp_avg, exp_avg_sq, scalars, N, D,
            beta1, beta2, eps, weight_decay, norm_eps,
            PROJECT=project, ONE_SWEEP=one_sweep, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        )  # fmt: skip
        return W_dec
    step_size, rsqrt_bias2 = scalars[0], scalars[1]
    for start in range(0, N, _ROWS):
        rows = slice(start, start + _ROWS)
        W, g = W_dec[rows].float(), grad[rows].to(torch.float32, copy=True)  # (rows, D)
        m, v = exp_avg[rows].float(), exp_avg_sq[rows].float()
        if project:
            _project_rows_(W, g, _row_sq(W))
        if weight_decay:
            g.add_(W, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        W.addcdiv_(m, v.sqrt().mul_(rsqrt_bias2).add_(eps), value=-1.0 * step_size)
        _normalize_rows_(W, _row_sq(W), norm_eps)
        for target, value in ((W_dec, W), (exp_avg, m), (exp_avg_sq, v)):
            if value.dtype != target.dtype:  # fp32 tensors were updated through their views
                target[rows] = value
    return W_dec


def decoder_norm_step(W_dec: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """`normalize_decoder_(W_dec)` and `project_decoder_grad_(W_dec, grad)` in one pass.

    The projection uses each row's direction, which the renormalisation keeps. Returns
    (W_dec, grad), both updated in place.
    """
    _check("decoder_norm_step", W_dec, grad)
    _run(W_dec, grad, project=True, normalize=True)
    return W_dec, grad
