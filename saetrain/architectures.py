"""BatchTopK / JumpReLU selection and the Matryoshka loss: the pure-torch parts of the
architectures besides plain Top-k (issue #22). :class:`saetrain.sae.SAE` calls these when its
config says ``activation: batchtopk`` or sets ``matryoshka_prefixes``; the Top-k path does not
come here.

- BatchTopK (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"): during training keep the
  k * B largest pre-activations over the whole (B, num_latents) batch, so rows differ in L0
  and the batch's mean L0 is k. Inference must not depend on the batch, so a threshold is
  estimated while training and used as a JumpReLU: a latent fires where its pre-activation is
  above it. The estimate is the one dictionary_learning's
  ``dictionary_learning/trainers/batch_top_k.py`` (``BatchTopKTrainer.update_threshold``,
  checked at commit 60ec6bf) keeps: an exponential moving average, with weight
  ``threshold_ema`` (0.999) on the old value, of the smallest positive activation kept in each
  training batch, started after ``threshold_start`` batches and set to the first batch's value.
- Matryoshka (Bussmann et al. 2025; Nabeshima 2024): the loss is the sum over nested prefixes
  m of the FVU of the reconstruction from latents [0, m) alone, so the first latents learn to
  reconstruct on their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels


def pre_activations(xs: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """(B, num_latents) dense pre-activations ``(xs - b_dec) @ W_enc.T + b_enc``."""
    return F.linear(xs - b_dec, W_enc, b_enc)


def batch_topk_dense(pre_acts: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(B, N) activations keeping the k * B largest pre-activations of the whole batch (relu
    of them; zero elsewhere), and the (k * B,) kept values, before relu."""
    B, N = pre_acts.shape
    flat = pre_acts.flatten()  # (B * N,)
    values, where = flat.topk(min(k * B, flat.numel()), sorted=False)  # (k * B,)
    acts = torch.zeros_like(flat).scatter(0, where, values.relu()).view(B, N)
    return acts, values


def jumprelu_dense(pre_acts: Tensor, threshold: Tensor) -> Tensor:
    """(B, N) JumpReLU: each pre-activation where it is above ``threshold`` (>= 0; () or (N,)),
    else 0. SAELens' ``JumpReLUSAE.encode`` computes relu(pre) * (pre > threshold), the same
    for any threshold >= 0 (at 0 both are relu), so an export needs no conversion."""
    return pre_acts * (pre_acts > threshold)


def sparse_rows(acts: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) sparse activations as (B, K) values and indices, K the largest row's L0 (at least
    1); rows with fewer are padded with zeros, which decode to nothing. One host sync."""
    K = max(1, int((acts > 0).sum(1).max())) if acts.numel() else 1
    return acts.topk(min(K, acts.shape[1]), dim=1)  # (B, K), largest first


def aux_topk(pre_acts: Tensor, dead_mask: Tensor | None, k_aux: int) -> tuple[Tensor, Tensor]:
    """AuxK's selection: relu of the top min(k_aux, dead) pre-activations among dead latents,
    (B, k_aux') values and indices; (B, 0) when none is dead (Gao et al. 2024, A.2)."""
    n_aux = 0 if dead_mask is None or not k_aux else min(k_aux, int(dead_mask.sum()))
    if not n_aux:
        empty = pre_acts[:, :0]
        return empty, torch.zeros_like(empty, dtype=torch.int64)
    values, indices = pre_acts.masked_fill(~dead_mask, float("-inf")).topk(n_aux, dim=1)
    return values.relu(), indices


@torch.no_grad()
def update_threshold_(
    threshold: Tensor, steps: Tensor, kept: Tensor, ema: float, start: int
) -> None:
    """One step of the running JumpReLU threshold (in place, no host sync): after ``start``
    batches, the EMA of the smallest positive value among ``kept`` (0 if none is), starting
    from the first such value (``threshold`` < 0 means "not estimated yet")."""
    kept = kept.detach().float()
    smallest = torch.where(kept > 0, kept, torch.inf).min()
    smallest = torch.where(torch.isinf(smallest), 0.0, smallest)
    moved = torch.where(threshold < 0, smallest, ema * threshold + (1 - ema) * smallest)
    threshold.copy_(torch.where(steps >= start, moved, threshold))
    steps += 1


def prefix_fvus(
    xs: Tensor,
    latent_acts: Tensor,
    latent_indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    prefixes: list[int],
) -> Tensor:
    """(len(prefixes),) FVU of each prefix m's reconstruction: latents with index < m only,
    plus ``b_dec``, against ``xs`` (all in the SAE's internal space); normalised as ``fvu``."""
    total_variance = (xs - xs.mean(0)).pow(2).sum().float().clamp_min(1e-12)
    fvus = []
    for m in prefixes:
        acts = torch.where(latent_indices < m, latent_acts, 0)  # (B, K)
        x_hat = kernels.decode(acts, latent_indices, W_dec) + b_dec  # (B, d)
        fvus.append((xs - x_hat).pow(2).sum().float() / total_variance)
    return torch.stack(fvus)
