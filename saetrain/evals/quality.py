"""SAE quality measured the way the field measures it (issue #22): how well the SAE reconstructs
the activations it reads, and what splicing its reconstruction into the LM does to the LM.

One implementation behind ``python -m saetrain evaluate`` (:mod:`.evaluate`), ``fit``'s
validation (:class:`LMValidation`: ``val/loss_recovered``, ``val/kl``, ``val/delta_loss``) and
the steering callback's ``lm/*`` figures::

    from saetrain.evals.quality import TokenRules, measure
    figures = measure(model, {"ours": sae}, input_ids, layer=15, rules=TokenRules.of(sae, tok))
    figures["ours"]["trained_tokens"]["loss_recovered_zero"]

Every figure is a mean per token over one of two scopes:

- ``trained_tokens``: the tokens the SAE trains on (training's exclusions: special and
  chat-template tokens, position 0, massive-activation tokens above ``outlier_multiple`` times
  the median norm of the evaluated tokens). The SAE and the ablations replace only these
  tokens' activations; next-token figures average the predictions made at these positions.
- ``all_tokens``: every token replaced and every prediction counted, as SAELens does (its
  ``ignore_tokens`` is empty by default): figures comparable with peers who include them.

The formulas are SAELens' (``sae_lens/evals.py`` at v6.18.0: ``get_recons_loss``, ``_kl``,
``get_downstream_reconstruction_metrics``): ``loss_recovered_zero`` is its ``ce_loss_score``,
``kl_spliced`` its ``kl_div_with_sae`` (KL(clean || spliced), nats, summed over the vocabulary)
and ``kl_div_score`` its ``kl_div_score``. Two differ on purpose: ``explained_variance`` here is
1 - FVU with the variance about the evaluated tokens' mean (SAELens 6.18's subtracts the squared
mean of the squared activations instead), and the mean ablation (not in SAELens) replaces the
activations by their mean over the scope's evaluated tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.lm import decoder_layers, residual_stream

SCOPES = ("trained_tokens", "all_tokens")
ABLATIONS = ("zero_ablated", "mean_ablated")

DEFINITIONS = {
    "tokens": "activations evaluated (the scope's tokens)",
    "predictions": "next-token predictions the CE and KL figures average (positions of the "
    "scope's tokens, the last position of each sequence excepted)",
    "fvu": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the tokens (raw activations)",
    "explained_variance": "1 - fvu",
    "l0": "mean number of latents active (> 0) per token",
    "unfired_fraction": "share of latents that never fired on the evaluated tokens",
    "ce_clean": "mean next-token cross-entropy of the unchanged LM (nats)",
    "ce_spliced": "the same with the SAE's reconstruction in place of the layer's output",
    "ce_zero_ablated": "the same with the layer's output replaced by zeros",
    "ce_mean_ablated": "the same with it replaced by its mean over the scope's tokens",
    "loss_recovered_zero": "(ce_zero_ablated - ce_spliced) / (ce_zero_ablated - ce_clean) "
    "(SAELens ce_loss_score)",
    "loss_recovered_mean": "(ce_mean_ablated - ce_spliced) / (ce_mean_ablated - ce_clean)",
    "delta_loss": "ce_spliced - ce_clean (nats)",
    "kl_spliced": "mean KL(clean || spliced) of the next-token distributions (nats; SAELens "
    "kl_div_with_sae)",
    "kl_zero_ablated": "mean KL(clean || zero-ablated) (SAELens kl_div_with_ablation)",
    "kl_mean_ablated": "mean KL(clean || mean-ablated)",
    "kl_div_score": "(kl_zero_ablated - kl_spliced) / kl_zero_ablated (SAELens kl_div_score)",
}


@dataclass(frozen=True)
class TokenRules:
    """Which tokens an SAE trains on: training's exclusions (see ``ActivationDataModule``)."""

    special_ids: tuple[int, ...] = ()
    """Token ids never trained on (BOS, EOS, padding, chat-template tokens)."""
    exclude_first_position: bool = True
    """Position 0 of every sequence is not trained on."""
    outlier_multiple: float | None = 10.0
    """Tokens whose norm is above this multiple of the median norm are not trained on."""

    @classmethod
    def of(cls, sae, tokenizer) -> TokenRules:
        """The rules recorded in the SAE's ``cfg.json`` (training's defaults where absent)."""
        extra = sae.cfg.extra or {}
        special = extra.get("exclude_special_tokens", True)
        ids = (getattr(tokenizer, "all_special_ids", None) or []) if special else []
        return cls(
            special_ids=tuple(sorted(set(ids))),
            exclude_first_position=bool(extra.get("exclude_first_position", True)),
            outlier_multiple=extra.get("outlier_multiple", 10.0),
        )

    def describe(self) -> str:
        parts = [f"{len(self.special_ids)} special token ids"] if self.special_ids else []
        if self.exclude_first_position:
            parts.append("position 0")
        if self.outlier_multiple is not None:
            parts.append(f"tokens above {self.outlier_multiple:g}x the median norm")
        return ", ".join(parts) or "nothing"

    def candidates(self, input_ids: Tensor) -> Tensor:
        """(S, T) bool: tokens neither special nor at position 0."""
        keep = ~torch.isin(input_ids, torch.tensor(self.special_ids, dtype=input_ids.dtype))
        if self.exclude_first_position:
            keep[:, 0] = False
        return keep

    def mask(self, input_ids: Tensor, norms: Tensor) -> Tensor:
        """(S, T) bool: the trained-on tokens, given every token's activation norm (S, T); the
        median is over the candidate tokens of all the sequences together."""
        keep = self.candidates(input_ids)
        if self.outlier_multiple is not None and keep.any():
            keep &= norms <= self.outlier_multiple * norms[keep].median()
        return keep


@dataclass
class _Shared:
    """Sums of one scope that do not depend on the SAE."""

    mean: Tensor  # (d,) the scope's mean activation (the mean ablation's value)
    total_variance: float  # sum ||x - mean||^2 over the scope's tokens
    tokens: int
    predictions: int = 0
    ce_clean: float = 0.0
    ce_zero_ablated: float = 0.0
    ce_mean_ablated: float = 0.0
    kl_zero_ablated: float = 0.0
    kl_mean_ablated: float = 0.0


@dataclass
class _PerSAE:
    """Sums of one SAE and one scope."""

    num_latents: int
    sq_err: float = 0.0
    l0: float = 0.0
    fired: Tensor | None = None
    ce_spliced: float = 0.0
    kl_spliced: float = 0.0


def _ratio(num: float, den: float) -> float:
    """num / den as SAELens divides (a negative den too); nan where den is 0."""
    return num / den if den != 0 else float("nan")


def _figures(shared: _Shared, own: _PerSAE) -> dict[str, float]:
    n, p = max(shared.tokens, 1), max(shared.predictions, 1)
    ce = {
        "ce_clean": shared.ce_clean / p,
        "ce_spliced": own.ce_spliced / p,
        "ce_zero_ablated": shared.ce_zero_ablated / p,
        "ce_mean_ablated": shared.ce_mean_ablated / p,
    }
    kl = {
        "kl_spliced": own.kl_spliced / p,
        "kl_zero_ablated": shared.kl_zero_ablated / p,
        "kl_mean_ablated": shared.kl_mean_ablated / p,
    }
    fvu = _ratio(own.sq_err, shared.total_variance)
    fired = own.fired.float().mean().item() if own.fired is not None else 0.0
    return {
        "tokens": shared.tokens,
        "predictions": shared.predictions,
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "l0": own.l0 / n,
        "unfired_fraction": 1 - fired,
        **ce,
        "loss_recovered_zero": _ratio(
            ce["ce_zero_ablated"] - ce["ce_spliced"], ce["ce_zero_ablated"] - ce["ce_clean"]
        ),
        "loss_recovered_mean": _ratio(
            ce["ce_mean_ablated"] - ce["ce_spliced"], ce["ce_mean_ablated"] - ce["ce_clean"]
        ),
        "delta_loss": ce["ce_spliced"] - ce["ce_clean"],
        **kl,
        "kl_div_score": _ratio(kl["kl_zero_ablated"] - kl["kl_spliced"], kl["kl_zero_ablated"]),
    }


@torch.no_grad()
def reconstruct(sae, x: Tensor) -> tuple[Tensor, Tensor]:
    """The SAE's reconstruction of ``x`` (N, d) in ``x``'s dtype, and each row's L0 (N,), with
    the SAE in eval mode (a BatchTopK SAE then uses its JumpReLU threshold and leaves it as it
    is), and its active latents' indices as a (N, K) tensor with -1 where none."""
    was_training = sae.training
    sae.eval()
    try:
        acts, indices = sae.encode(x.to(sae.device, sae.dtype))[:2]  # (N, K)
        x_hat = sae.decode(acts, indices).to(x.device, x.dtype)
    finally:
        sae.train(was_training)
    active = acts > 0
    return x_hat, torch.where(active, indices, -1).to(x.device)


def _next_token_stats(
    logits: Tensor, input_ids: Tensor, clean: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-prediction cross-entropy (B, T-1), KL(clean || this) (B, T-1) against ``clean`` =
    (log-probabilities, probabilities) of the clean LM (None: no KL), and the log-probabilities
    (B, T-1, V)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    ce = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    if clean is None:
        return ce, None, logp
    clean_logp, clean_p = clean
    kl = (clean_p * (clean_logp - logp)).sum(-1)  # (B, T-1); SAELens' _kl
    return ce, kl, logp


class _Splice:
    """A forward hook on one decoder layer that replaces its output where ``mask`` is true."""

    def __init__(self, model: nn.Module, layer: int):
        self.block = decoder_layers(model)[layer]
        self.new: Tensor | None = None  # (B, T, d) replacement, or None: leave the output
        self.mask: Tensor | None = None  # (B, T)

    def __call__(self, _module, _args, output):
        if self.new is None:
            return output
        h = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        new = torch.where(self.mask[..., None].to(h.device), self.new.to(h.device, h.dtype), h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def __enter__(self) -> _Splice:
        self.handle = self.block.register_forward_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device), use_cache=False).logits.cpu()  # (B, T, V)


@torch.no_grad()
def measure(
    model: nn.Module,
    saes: Mapping[str, object],
    input_ids: Tensor,
    layer: int,
    rules: TokenRules,
    *,
    batch_size: int = 8,
    scopes: tuple[str, ...] = SCOPES,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Every figure of :data:`DEFINITIONS` for each SAE in ``saes`` (all reading ``layer``'s
    output) on the sequences ``input_ids`` (S, T), per scope: ``{name: {scope: {figure: v}}}``.

    The SAEs share the LM's clean and ablated passes. A first pass runs the LM up to the layer
    (the activations' norms and means); then each batch takes one clean pass, one pass per
    ablation and scope, and one per SAE and scope. ``progress(done, total)`` is called after
    each batch of the second pass.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (S, T) with S >= 1 and T >= 2, got {input_ids.shape}")
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise ValueError(f"unknown scopes {bad}: choose from {SCOPES}")
    input_ids = input_ids.cpu()
    batches = list(input_ids.split(batch_size))
    device = next(model.parameters()).device

    # Pass 1: the layer's activations (kept in the LM's dtype), their norms, the scopes' masks,
    # means and total variances.
    hidden = torch.cat(
        [residual_stream(model, ids.to(device), [layer])[layer].cpu() for ids in batches]
    )  # (S, T, d)
    norms = hidden.float().norm(dim=-1)  # (S, T)
    masks = {
        "trained_tokens": rules.mask(input_ids, norms),
        "all_tokens": torch.ones_like(input_ids, dtype=torch.bool),
    }
    shared: dict[str, _Shared] = {}
    for scope in scopes:
        x = hidden[masks[scope]].float()  # (N, d)
        if x.shape[0] == 0:
            raise ValueError(f"no {scope} among the {input_ids.numel()} evaluated tokens")
        mean = x.mean(0)
        shared[scope] = _Shared(mean, float((x - mean).pow(2).sum()), x.shape[0])
    own = {
        (name, scope): _PerSAE(int(sae.cfg.num_latents))
        for name, sae in saes.items()
        for scope in scopes
    }

    # Pass 2, per batch: the SAEs' reconstructions, then the clean, ablated and spliced LM.
    start = 0
    with _Splice(model, layer) as splice:
        for i, ids in enumerate(batches):
            B = ids.shape[0]
            h = hidden[start : start + B]  # (B, T, d)
            recon = {}
            x = h.flatten(0, 1)  # (B * T, d)
            for name, sae in saes.items():
                x_hat, active = reconstruct(sae, x)
                recon[name] = x_hat.view_as(h)
                for scope in scopes:
                    m = masks[scope][start : start + B].flatten()
                    acc = own[name, scope]
                    acc.sq_err += float(
                        (h.flatten(0, 1)[m].float() - x_hat[m].float()).pow(2).sum()
                    )
                    acc.l0 += float((active[m] >= 0).sum())
                    if acc.fired is None:
                        acc.fired = torch.zeros(acc.num_latents, dtype=torch.bool)
                    hit = active[m]
                    acc.fired[hit[hit >= 0]] = True
            splice.new = None
            ce_clean, _, clean_logp = _next_token_stats(_logits(model, ids), ids, None)
            clean = (clean_logp, clean_logp.exp())
            for scope in scopes:
                mask = masks[scope][start : start + B]
                pred = mask[:, :-1]  # predictions made at the scope's positions
                sh = shared[scope]
                sh.predictions += int(pred.sum())
                sh.ce_clean += float(ce_clean[pred].sum())
                splice.mask = mask
                replacements = {
                    "zero_ablated": torch.zeros_like(h),
                    "mean_ablated": sh.mean.to(h.dtype).expand_as(h),
                }
                for what, new in replacements.items():
                    splice.new = new
                    ce, kl, _ = _next_token_stats(_logits(model, ids), ids, clean)
                    setattr(sh, f"ce_{what}", getattr(sh, f"ce_{what}") + float(ce[pred].sum()))
                    setattr(sh, f"kl_{what}", getattr(sh, f"kl_{what}") + float(kl[pred].sum()))
                for name in saes:
                    splice.new = recon[name]
                    ce, kl, _ = _next_token_stats(_logits(model, ids), ids, clean)
                    own[name, scope].ce_spliced += float(ce[pred].sum())
                    own[name, scope].kl_spliced += float(kl[pred].sum())
                splice.new = None
            start += B
            if progress is not None:
                progress(i + 1, len(batches))
    return {
        name: {scope: _figures(shared[scope], own[name, scope]) for scope in scopes}
        for name in saes
    }


def finite(value: float) -> float | None:
    """``value``, or None where it is nan or infinite (JSON has no nan)."""
    return value if isinstance(value, int) or math.isfinite(value) else None
