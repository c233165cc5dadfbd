"""Sparse kernels for Top-k SAEs: the sparse half of the step at the cost of the dense half.

In a Top-k SAE only k of num_latents latents are non-zero per token, so decoding, the
decoder's gradients and the encoder's weight gradient need only k rows per token; with
these kernels a training step costs about one dense matmul, the encoder's forward
(issue #4). Each op has a pure-torch `*_reference` to compare against.

    out = encode_topk(x, W_enc, b_enc, k, dead_mask, k_aux, b_dec=b_dec)
    x_hat = decode(out.latent_acts, out.latent_indices, W_dec) + b_dec
    ...; loss.backward(); project_decoder_grad_(W_dec, W_dec.grad)
    optimizer.step(); normalize_decoder_(W_dec)

The reconstruction, FVU and AuxK loss in one pass forward and one backward: `sae_losses`.
Or, for the decoder, the three in one pass: `decoder_adam_step_` (what `saetrain.optim.
DecoderNormAdam` runs where the Triton kernels do). The selection alone: `select_topk` (the
device's fastest path) and `radix_topk` (Triton; the top k and AuxK's k_aux from one read).

Backend: Triton on CUDA tensors, the fastest torch path elsewhere, chosen at import;
override with SAETRAIN_KERNELS=auto|triton|torch or `set_backend`.

Under torch.autocast the outputs are in the autocast dtype, while fp32 parameters enter the
autograd Functions as they are and get fp32 gradients (summed in fp32, never rounded to the
autocast dtype). A training step reads one thing back from the device: the dead latents'
ids, which fix the AuxK shapes.
"""

from ._backend import get_backend, set_backend
from .decode import DecodeFunction, decode, decode_pair, decode_reference
from .decoder_norm import (
    decoder_adam_step_,
    decoder_adam_step_reference,
    decoder_norm_step,
    normalize_decoder_,
    normalize_decoder_reference,
    project_decoder_grad_,
    project_decoder_grad_reference,
)
from .encode import EncodeOutput, EncodeTopkFunction, encode_topk, encode_topk_reference
from .loss import SAELossFunction, sae_losses, sae_losses_reference
from .topk import radix_topk, radix_topk_reference, select_topk

__all__ = [
    "DecodeFunction",
    "EncodeOutput",
    "EncodeTopkFunction",
    "decode",
    "decode_pair",
    "decode_reference",
    "decoder_adam_step_",
    "decoder_adam_step_reference",
    "decoder_norm_step",
    "encode_topk",
    "encode_topk_reference",
    "get_backend",
    "normalize_decoder_",
    "normalize_decoder_reference",
    "project_decoder_grad_",
    "project_decoder_grad_reference",
    "radix_topk",
    "radix_topk_reference",
    "SAELossFunction",
    "sae_losses",
    "sae_losses_reference",
    "select_topk",
    "set_backend",
]
