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

Under torch.autocast the outputs are in the autocast dtype, as F.linear's would be, but
W_dec enters the Function in its own dtype: the gathers read it cast once (CUDA) or as it
is (CPU; see `sparse_ops.HALF_TABLE_DEVICES`), and its gradient is summed in fp32 and
returned in W_dec's dtype, never rounded to the autocast dtype and back on the way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sparse_ops import (
    autocast_dtype,
    check_rows,
    compact_rows,
    gather_combine,
    outer_and_dots,
    table_for,
)


def decode_reference(latent_acts: Tensor, latent_indices: Tensor, W_dec: Tensor) -> Tensor:
    """Pure-torch decode, accumulated in fp32, returned in W_dec's dtype. (B, d_in)."""
    rows = W_dec.float()[latent_indices]  # (B, k, d_in)
    return (latent_acts.float().unsqueeze(-1) * rows).sum(1).to(W_dec.dtype)


class DecodeFunction(torch.autograd.Function):
    """Sparse decodes of one or more (acts, indices) groups through one W_dec.

    ``DecodeFunction.apply(W_dec, dtype, acts_1, indices_1, acts_2, indices_2, ...)`` returns
    one (B, d_in) output per group, in `dtype`. The backward is sparse: grads for each group's
    acts and one grad W_dec, summed over the groups in fp32 and rounded once; an output that
    gets no gradient costs no backward work.
    """

    @staticmethod
    def forward(ctx, W_dec: Tensor, dtype: torch.dtype, *groups: Tensor):
        table = table_for(W_dec, dtype)  # (num_latents, d_in)
        acts = [a.to(table.dtype) for a in groups[0::2]]  # (B, k_g) each
        indices = groups[1::2]
        ctx.save_for_backward(table, *acts, *indices)
        ctx.dtypes = (W_dec.dtype, *(a.dtype for a in groups[0::2]))
        # Few distinct latents (AuxK): dense over them; the plan encode_topk left on the
        # indices if they came from it, and the same plan for the backward.
        ctx.compacts = [compact_rows(i, table.shape[0]) for i in indices]
        ctx.set_materialize_grads(False)
        return tuple(
            gather_combine(a, i, table, c).to(dtype)  # (B, d_in)
            for a, i, c in zip(acts, indices, ctx.compacts, strict=True)
        )

    @staticmethod
    def backward(ctx, *grad_outs: Tensor | None):
        table, *saved = ctx.saved_tensors
        n = len(grad_outs)
        acts, indices = saved[:n], saved[n:]
        live = [g for g in range(n) if grad_outs[g] is not None]
        grads: list[Tensor | None] = [None] * (2 + 2 * n)  # W_dec, dtype, (acts, indices) * n
        grad_W = None
        for g in live:
            grad = grad_outs[g].to(table.dtype).contiguous()  # (B, d_in)
            want_acts = ctx.needs_input_grad[2 + 2 * g]
            dtype = ctx.dtypes[0] if len(live) == 1 else torch.float32  # several: fp32 sums
            # grad W_dec += acts^T grad (scattered rows) and the acts' gradient <grad, row>:
            # one latent-major pass where it runs (sparse_ops.LATENT_MAJOR), else two.
            grad_W, dots = outer_and_dots(
                acts[g], indices[g], grad, table, grad_W, ctx.compacts[g], dtype,
                rows=ctx.needs_input_grad[0], dots=want_acts,
            )  # fmt: skip
            if want_acts:
                grads[2 + 2 * g] = dots.to(ctx.dtypes[1 + g])  # (B, k_g)
        if grad_W is not None:
            grads[0] = grad_W.to(ctx.dtypes[0])
        return tuple(grads)


def _decode(W_dec: Tensor, *groups: Tensor) -> tuple[Tensor, ...]:
    """Check each (acts, indices) group, then decode them all through one DecodeFunction."""
    cast = autocast_dtype(W_dec.device)
    for g in range(0, len(groups), 2):
        name = "decode" if g == 0 else "decode (aux)"
        check_rows(name, groups[g + 1], groups[g], W_dec, same_dtype=cast is None)
    with torch.autocast(W_dec.device.type, enabled=False):
        return DecodeFunction.apply(W_dec, cast or W_dec.dtype, *groups)


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
    x_hat, e_hat = _decode(W_dec, latent_acts, latent_indices, aux_acts, aux_indices)
    return x_hat, e_hat


def decode(latent_acts: Tensor, latent_indices: Tensor, W_dec: Tensor) -> Tensor:
    """Decode k latents per token: sum_j latent_acts[:, j] * W_dec[latent_indices[:, j]].

    Args:
        latent_acts: (B, k) float, the latent values.
        latent_indices: (B, k) int64/int32, which rows of W_dec they scale; may repeat.
        W_dec: (num_latents, d_in) float, same dtype as latent_acts (any float dtype under
            torch.autocast).

    Returns the (B, d_in) reconstruction without b_dec, in W_dec's dtype (under autocast:
    the autocast dtype), accumulated in fp32. Differentiable w.r.t. latent_acts and W_dec;
    W_dec's gradient is in its own dtype, summed in fp32.
    """
    (x_hat,) = _decode(W_dec, latent_acts, latent_indices)
    return x_hat
