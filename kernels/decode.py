"""Sparse decode: x_hat = sum_j latent_acts[:, j] * W_dec[latent_indices[:, j]] (no b_dec).

Only k of num_latents latents are non-zero per token, so the decoder forward and backward
read and write k rows of W_dec per token instead of multiplying a dense (B, num_latents)
matrix (issue #4, part 1). The four parts: `decode_reference` (pure torch), the Triton
kernels in `sparse_ops.py`, the host checks in `decode`, and `DecodeFunction`.

    x_hat = decode(latent_acts, latent_indices, W_dec) + b_dec
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sparse_ops import check_rows, compact_rows, gather_combine, gather_dot, scatter_outer


def decode_reference(latent_acts: Tensor, latent_indices: Tensor, W_dec: Tensor) -> Tensor:
    """Pure-torch decode, accumulated in fp32, returned in W_dec's dtype. (B, d_in)."""
    rows = W_dec.float()[latent_indices]  # (B, k, d_in)
    return (latent_acts.float().unsqueeze(-1) * rows).sum(1).to(W_dec.dtype)


class DecodeFunction(torch.autograd.Function):
    """Sparse decode with a sparse backward: grads for latent_acts and W_dec, none dense."""

    @staticmethod
    def forward(ctx, latent_acts: Tensor, latent_indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(latent_acts, latent_indices, W_dec)
        # CPU, few distinct latents (AuxK): dense over them, planned once for both passes.
        ctx.compact = compact_rows(latent_indices, W_dec.shape[0])
        return gather_combine(latent_acts, latent_indices, W_dec, ctx.compact)  # (B, d_in)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        latent_acts, latent_indices, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # (B, d_in)
        grad_acts = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_acts = gather_dot(grad_out, latent_indices, W_dec, ctx.compact)  # (B, k)
        if ctx.needs_input_grad[2]:
            # k rows of W_dec per token, scatter-added in fp32.
            grad_W_dec = scatter_outer(
                latent_acts,
                latent_indices,
                grad_out,
                W_dec.shape[0],
                compact=ctx.compact,
                dtype=W_dec.dtype,
            )  # (num_latents, d_in)
        return grad_acts, None, grad_W_dec


def decode(latent_acts: Tensor, latent_indices: Tensor, W_dec: Tensor) -> Tensor:
    """Decode k latents per token: sum_j latent_acts[:, j] * W_dec[latent_indices[:, j]].

    Args:
        latent_acts: (B, k) float, the latent values.
        latent_indices: (B, k) int64/int32, which rows of W_dec they scale; may repeat.
        W_dec: (num_latents, d_in) float, same dtype as latent_acts.

    Returns the (B, d_in) reconstruction without b_dec, in W_dec's dtype, accumulated in
    fp32. Differentiable w.r.t. latent_acts and W_dec. Under torch.autocast the float
    inputs are cast to the autocast dtype first, as F.linear would.
    """
    device_type = W_dec.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        latent_acts, W_dec = latent_acts.to(dtype), W_dec.to(dtype)
    check_rows("decode", latent_indices, latent_acts, W_dec)
    with torch.autocast(device_type, enabled=False):
        return DecodeFunction.apply(latent_acts, latent_indices, W_dec)
