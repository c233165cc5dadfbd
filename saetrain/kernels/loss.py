"""The SAE's losses in one pass: the reconstruction, FVU and AuxK, forward and backward.

With xs the scaled inputs (B, d_in), decoded = latent_acts @ W_dec[latent_indices] and
err_hat the AuxK latents' decode (both (B, d_in), from `decode_pair`):

    xs_hat = decoded + b_dec;  err = xs - xs_hat;  x_hat = xs_hat / input_scale
    fvu = sum(err^2) / total_variance;  auxk = sum((err.detach() - err_hat)^2) / total_variance

with total_variance = sum((xs - xs.mean(0))^2). As torch ops that is about a dozen passes over
(B, d_in) tensors forward and as many backward (each add, sub, pow and sum reads and writes
whole tensors): on a GPU at d_in 3,072 those elementwise passes cost about half of what the
encoder's matmul does, a cost per token like the matmul's own. Here the forward is one pass
(`_losses_kernel`: x_hat and per-tile partial sums) beside torch's one-pass `var_mean` for
the total variance, and the backward one pass (`_losses_backward_kernel`: the gradients of
decoded and err_hat, and per-tile column sums for b_dec's), in fp32 whatever the inputs'
dtypes. The four parts: `sae_losses_reference` (pure torch: what `SAE.forward` computed
before), the two kernels, the host checks in `sae_losses`, and `SAELossFunction`.

The inputs xs need no gradient (an SAE's training inputs); where they do, or where the
Triton kernels do not run (CPU), `sae_losses` is the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import HAS_TRITON, KERNEL_OPTIONS, use_triton

# Where the Triton kernels run, the losses in one pass forward and one backward. It moves a
# fraction of the torch ops' bytes for the same arithmetic, so it is on, though not yet timed
# on a GPU: `tune-kernels` ("fused-losses") and benchmarks/bench_kernels.py --parts ("losses:
# one pass is N x") measure it, and SAETRAIN_KERNEL_OPTIONS=unfused-losses turns it off.
FUSE_LOSSES = "unfused-losses" not in KERNEL_OPTIONS


def sae_losses_reference(
    xs: Tensor, decoded: Tensor, b_dec: Tensor, input_scale: Tensor, err_hat: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(x_hat, fvu, auxk_loss) as torch ops; auxk_loss is 0 without err_hat."""
    xs_hat = decoded + b_dec
    total_variance = (xs - xs.mean(0)).pow(2).sum().float().clamp_min(1e-12)
    err = xs - xs_hat  # (B, d)
    fvu = err.pow(2).sum().float() / total_variance
    auxk_loss = xs.new_zeros((), dtype=torch.float32)
    if err_hat is not None:
        # AuxK: the top dead latents try to explain the main reconstruction's residual;
        # its gradient reaches only dead latents, which revives them (Gao et al., A.2).
        auxk_loss = (err.detach() - err_hat).pow(2).sum().float() / total_variance
    return xs_hat / input_scale, fvu, auxk_loss


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(B, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        """Offsets and mask of this program's (BLOCK_B, BLOCK_D) tile, and its columns."""
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        return offs, (rows < B)[:, None] & (cols < D)[None, :], cols

    @triton.jit
    def _err(xs_ptr, dec_ptr, b_ptr, offs, mask, cols, D):
        """xs - (decoded + b_dec) in fp32 over a tile, and xs_hat = decoded + b_dec."""
        xs = tl.load(xs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dec = tl.load(dec_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        xs_hat = dec + b[None, :]
        return tl.where(mask, xs - xs_hat, 0.0), xs_hat

    @triton.jit
    def _store(ptr, offs, x, mask):
        """Store fp32 `x` in ptr's dtype, rounded to nearest (even). For bf16 the rounding is
        done here, in integer bits: GPUs round fp32 -> bf16 casts to nearest, but Triton's CPU
        interpreter truncates them, and the tests compare with torch's rounding."""
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _losses_kernel(
        xs_ptr, dec_ptr, b_ptr, eh_ptr, scale_ptr, x_hat_ptr, partial_ptr, B, D,
        HAS_AUX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One program per (BLOCK_B, BLOCK_D) tile: x_hat for it, and its two partial sums
        # (err^2 and (err - err_hat)^2) at partial[program, 0:2].
        offs, mask, cols = _tile(B, D, BLOCK_B, BLOCK_D)
        err, xs_hat = _err(xs_ptr, dec_ptr, b_ptr, offs, mask, cols, D)
        scale = tl.load(scale_ptr).to(tl.float32)
        _store(x_hat_ptr, offs, xs_hat / scale, mask)
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(partial_ptr + 2 * pid, tl.sum(tl.sum(err * err, axis=1), axis=0))
        if HAS_AUX:
            eh = tl.load(eh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            res = err - eh  # zero outside the tile: err and eh are both 0 there
            tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.sum(res * res, axis=1), axis=0))

    @triton.jit
    def _losses_backward_kernel(
        xs_ptr, dec_ptr, b_ptr, eh_ptr, gxh_ptr, coef_ptr, g_dec_ptr, g_eh_ptr, col_ptr, B, D,
        HAS_AUX: tl.constexpr, HAS_GXH: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # coef = (-2 grad_fvu / tv, -2 grad_auxk / tv, 1 / input_scale). The gradient of
        # xs_hat, coef0 * err (+ grad_x_hat / input_scale), is decoded's, and its column sums
        # over the tile (fp32, before rounding) go to col[row block] for b_dec's; err_hat's is
        # coef1 * (err - err_hat).
        offs, mask, cols = _tile(B, D, BLOCK_B, BLOCK_D)
        err, xs_hat = _err(xs_ptr, dec_ptr, b_ptr, offs, mask, cols, D)
        g = tl.load(coef_ptr) * err
        if HAS_GXH:
            gxh = tl.load(gxh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g += gxh * tl.load(coef_ptr + 2)
        _store(g_dec_ptr, offs, g, mask)
        col_offs = tl.program_id(0).to(tl.int64) * D + cols
        tl.store(col_ptr + col_offs, tl.sum(g, axis=0), mask=cols < D)
        if HAS_AUX:
            eh = tl.load(eh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g_eh = tl.load(coef_ptr + 1) * (err - eh)
            _store(g_eh_ptr, offs, g_eh, mask)


# (BLOCK_B, BLOCK_D) and warps on a GPU: 16 values a thread per tensor. Compiled for sm_90
# (benchmarks/kernel_resources.py) that is 48-56 registers and 36-40 resident warps an SM,
# where 16 x 256 tiles took 78-106 registers and 16-24 warps (and spilled in fp32): these
# kernels only stream memory, so the warps that hide its latency matter most. Small tiles
# under the interpreter.
LOSS_BLOCKS, LOSS_WARPS = (8, 256), 4


def _blocks(x: Tensor) -> tuple[int, int]:
    return LOSS_BLOCKS if x.is_cuda else (4, 32)


class SAELossFunction(torch.autograd.Function):
    """``apply(xs, decoded, b_dec, input_scale, err_hat)`` -> (x_hat, fvu, auxk_loss), as
    `sae_losses_reference`; err_hat may be None (auxk_loss is then 0 and gets no gradient).
    xs and input_scale get no gradient."""

    @staticmethod
    def forward(ctx, xs, decoded, b_dec, input_scale, err_hat):
        B, D = xs.shape
        BLOCK_B, BLOCK_D = _blocks(xs)
        grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(D, BLOCK_D))
        x_hat_dtype = torch.promote_types(decoded.dtype, b_dec.dtype)
        x_hat = torch.empty(B, D, dtype=x_hat_dtype, device=xs.device)
        partial = torch.zeros(grid[0] * grid[1], 2, device=xs.device)
        has_aux = err_hat is not None
        _losses_kernel[grid](
            xs, decoded, b_dec, err_hat if has_aux else xs, input_scale, x_hat, partial, B, D,
            HAS_AUX=has_aux, BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D, num_warps=LOSS_WARPS,
        )  # fmt: skip
        # One pass (Welford) for the total variance, in fp64 from there on, like the sums.
        var = torch.var_mean(xs.float(), dim=0, correction=0)[0]
        total_variance = (var.double().sum() * B).float().clamp_min(1e-12)
        sums = partial.double().sum(0).float()  # (2,)
        ctx.save_for_backward(xs, decoded, b_dec, input_scale, err_hat, total_variance)
        ctx.set_materialize_grads(False)
        return x_hat, sums[0] / total_variance, sums[1] / total_variance

    @staticmethod
    def backward(ctx, grad_x_hat, grad_fvu, grad_auxk):
        xs, decoded, b_dec, input_scale, err_hat, total_variance = ctx.saved_tensors
        if grad_x_hat is None and grad_fvu is None and grad_auxk is None:
            return None, None, None, None, None
        B, D = xs.shape
        zero = total_variance.new_zeros(())
        coef = torch.stack(
            [
                -2 * (zero if grad_fvu is None else grad_fvu.float()) / total_variance,
                -2 * (zero if grad_auxk is None else grad_auxk.float()) / total_variance,
                1 / input_scale.float(),
            ]
        )  # (3,), on the device: no host sync
        BLOCK_B, BLOCK_D = _blocks(xs)
        grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(D, BLOCK_D))
        has_aux = err_hat is not None and ctx.needs_input_grad[4]
        has_gxh = grad_x_hat is not None
        grad_dec = torch.empty_like(decoded)
        grad_eh = torch.empty_like(err_hat) if has_aux else None
        columns = torch.empty(grid[0], D, device=xs.device)  # (row blocks, D) fp32
        gxh = grad_x_hat.contiguous() if has_gxh else xs
        _losses_backward_kernel[grid](
            xs, decoded, b_dec, err_hat if has_aux else xs, gxh, coef, grad_dec,
            grad_eh if has_aux else grad_dec, columns, B, D,
            HAS_AUX=has_aux, HAS_GXH=has_gxh, BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D,
            num_warps=LOSS_WARPS,
        )  # fmt: skip
        grad_b = columns.sum(0).to(b_dec.dtype) if ctx.needs_input_grad[2] else None
        return None, grad_dec, grad_b, None, grad_eh


def _check(xs: Tensor, decoded: Tensor, b_dec: Tensor, err_hat: Tensor | None) -> None:
    if xs.dim() != 2 or not xs.is_floating_point():
        raise ValueError(
            f"sae_losses: xs must be a (B, d_in) float tensor, got {tuple(xs.shape)} {xs.dtype}."
        )
    for name, t in (("decoded", decoded), ("err_hat", err_hat)):
        if t is not None and (t.shape != xs.shape or not t.is_floating_point()):
            raise ValueError(
                f"sae_losses: {name} must be a float tensor shaped like xs {tuple(xs.shape)}, "
                f"got {tuple(t.shape)} {t.dtype}."
            )
    if b_dec.shape != (xs.shape[1],):
        raise ValueError(
            f"sae_losses: b_dec must be ({xs.shape[1]},), like a row of xs; got "
            f"{tuple(b_dec.shape)}."
        )
    for name, t in (("decoded", decoded), ("b_dec", b_dec), ("err_hat", err_hat)):
        if t is not None and t.device != xs.device:
            raise ValueError(f"sae_losses: {name} on {t.device}, xs on {xs.device}.")


def sae_losses(
    xs: Tensor,
    decoded: Tensor,
    b_dec: Tensor,
    input_scale: Tensor,
    err_hat: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reconstruction and the losses of a Top-k SAE: (x_hat, fvu, auxk_loss).

    Args:
        xs: (B, d_in) inputs times input_scale (the SAE's internal space).
        decoded: (B, d_in) decode of the top-k latents, without b_dec.
        b_dec: (d_in,) decoder bias.
        input_scale: () the inputs' scale; x_hat = (decoded + b_dec) / input_scale.
        err_hat: (B, d_in) decode of the AuxK latents, or None (no AuxK: auxk_loss is 0).

    Returns x_hat (B, d_in) in decoded's and b_dec's promoted dtype, and fvu and auxk_loss,
    fp32 scalars; differentiable w.r.t. decoded, b_dec and err_hat. One pass forward and one
    backward where the Triton kernels run and xs needs no gradient (`FUSE_LOSSES`); torch
    ops otherwise.
    """
    _check(xs, decoded, b_dec, err_hat)
    if not FUSE_LOSSES or xs.requires_grad or xs.shape[0] == 0 or not use_triton(xs.device):
        return sae_losses_reference(xs, decoded, b_dec, input_scale, err_hat)
    contiguous = [t if t is None else t.contiguous() for t in (xs, decoded, b_dec, err_hat)]
    xs, decoded, b_dec, err_hat = contiguous
    with torch.autocast(xs.device.type, enabled=False):
        return SAELossFunction.apply(xs, decoded, b_dec, input_scale.reshape(()), err_hat)
