"""Sparse decode: x_hat = sum_j latent_acts[:, j] * W_dec[latent_indices[:, j]] (no b_dec).

Only k of num_latents latents are non-zero per token, so the decoder forward and backward
read and write k rows of W_dec per token instead of multiplying a dense (B, num_latents)
matrix (issue #4, part 1). The four parts: `decode_reference` (pure torch), the Triton
kernels in `sparse_ops.py`, the host checks in `decode`, and `DecodeFunction`.

    x_hat = decode(latent_acts, latent_indices, W_dec) + b_dec
    x_hat, e_hat = decode_pair(latent_acts, latent_indices, aux_acts, aux_indices, W_dec)

`decode_pair` runs the main and the AuxK decode through the same W_dec with one gradient
for it: rows both touch are summed in fp32 and rounded once, and no second (num_latents,
d_in) gradient is allocated, zeroed and added by autograd.
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


class DecodePairFunction(torch.autograd.Function):
    """Two sparse decodes through one W_dec (the main and the AuxK latents), one grad W_dec."""

    @staticmethod
    def forward(ctx, acts, indices, aux_acts, aux_indices, W_dec):
        ctx.save_for_backward(acts, indices, aux_acts, aux_indices, W_dec)
        ctx.compacts = tuple(compact_rows(i, W_dec.shape[0]) for i in (indices, aux_indices))
        ctx.set_materialize_grads(False)  # an unused output costs no backward work
        x_hat = gather_combine(acts, indices, W_dec, ctx.compacts[0])  # (B, d_in)
        e_hat = gather_combine(aux_acts, aux_indices, W_dec, ctx.compacts[1])  # (B, d_in)
        return x_hat, e_hat

    @staticmethod
    def backward(ctx, grad_x_hat: Tensor | None, grad_e_hat: Tensor | None):
        acts, indices, aux_acts, aux_indices, W_dec = ctx.saved_tensors
        grads = (grad_x_hat, grad_e_hat)
        live = [slot for slot in (0, 1) if grads[slot] is not None]
        values, ids = (acts, aux_acts), (indices, aux_indices)
        grad_acts: list[Tensor | None] = [None, None]
        grad_W_dec = None
        for slot in live:
            grad, compact = grads[slot].contiguous(), ctx.compacts[slot]  # (B, d_in)
            if ctx.needs_input_grad[2 * slot]:
                grad_acts[slot] = gather_dot(grad, ids[slot], W_dec, compact)  # (B, k)
            if ctx.needs_input_grad[4]:  # two groups: summed in fp32, rounded once
                dtype = W_dec.dtype if len(live) == 1 else torch.float32
                grad_W_dec = scatter_outer(
                    values[slot],
                    ids[slot],
                    grad,
                    W_dec.shape[0],
                    grad_W_dec,
                    compact=compact,
                    dtype=dtype,
                )  # (num_latents, d_in)
        if grad_W_dec is not None:
            grad_W_dec = grad_W_dec.to(W_dec.dtype)  # (num_latents, d_in)
        return grad_acts[0], None, grad_acts[1], None, grad_W_dec


def _autocast_inputs(W_dec: Tensor, *acts: Tensor) -> tuple[Tensor, ...]:
    """Under torch.autocast, the float inputs cast to the autocast dtype, as F.linear would."""
    device_type = W_dec.device.type
    if not torch.is_autocast_enabled(device_type):
        return (*acts, W_dec)
    dtype = torch.get_autocast_dtype(device_type)
    return (*(a.to(dtype) for a in acts), W_dec.to(dtype))


def decode_pair(
    latent_acts: Tensor,
    latent_indices: Tensor,
    aux_acts: Tensor,
    aux_indices: Tensor,
    W_dec: Tensor,
) -> tuple[Tensor, Tensor]:
    """``decode`` of the main latents (B, k) and of the AuxK latents (B, k_aux) through the
    same ``W_dec``: (x_hat, e_hat), each (B, d_in), as two ``decode`` calls would give, with
    one gradient for W_dec (fp32 sums, one rounding)."""
    latent_acts, aux_acts, W_dec = _autocast_inputs(W_dec, latent_acts, aux_acts)
    check_rows("decode", latent_indices, latent_acts, W_dec)
    check_rows("decode (aux)", aux_indices, aux_acts, W_dec)
    with torch.autocast(W_dec.device.type, enabled=False):
        return DecodePairFunction.apply(latent_acts, latent_indices, aux_acts, aux_indices, W_dec)


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
    latent_acts, W_dec = _autocast_inputs(W_dec, latent_acts)
    check_rows("decode", latent_indices, latent_acts, W_dec)
    with torch.autocast(W_dec.device.type, enabled=False):
        return DecodeFunction.apply(latent_acts, latent_indices, W_dec)
