"""Conditional steering: gates that read a prompt once and decide whether to steer it.

A gate scores each sequence's prompt when the sequence starts (the hook sees the unedited
residual stream of every prompt token) and opens when the score is above its threshold; the
interventions then apply to that sequence's prompt and every token generated after it, and to
nothing in the sequences it left closed::

    gate = FeatureGate(sae, feature=1234)
    cal = calibrate(gate, model, tok, harmful_val, harmless_val)   # sets gate.threshold
    print(cal)  # threshold and its own true/false positive rates on the validation prompts
    gens = generate(model, tok, prompts, sae=sae, interventions=[...], gate=gate)

Two gates: :class:`FeatureGate` (an SAE latent's largest value over the prompt) and
:class:`ProbeGate` (a logistic probe on the prompt's mean activation, its last token's, or
both, fitted with :func:`fit_probe` on labelled prompts). The mean skips special tokens, the
first position and massive-activation outliers (see ``hooks.usable_tokens``); the last token
is the prompt's final non-special one (for a chat template, the end of the assistant header),
where the model has read the whole request before it answers. :class:`GateConfig` and
:func:`build_gate` make a fitted, calibrated gate from prompt sets, as the ``eval-refusal``
and ``eval-capability`` commands do. A small hand-written set (such as the built-in borderline
pairs) can both fit the probe and choose its threshold by cross-fitting
(:func:`cross_fit_scores`): each prompt is scored by a probe fitted without its fold, so the
threshold's rates are honest and no pair is spent on validation alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor, nn

from ..errors import UserError
from .generate import generate
from .hooks import feature_values
from .prompts import PromptSet, load_prompts, normalise_prompt
from .stats import wilson_interval

Pool = Literal["mean", "last", "mean+last"]


class Gate(Protocol):
    """What :class:`~saetrain.steering.hooks.Steering` needs from a gate."""

    threshold: float
    outlier_multiple: float | None

    def scores(self, acts: Tensor, read: Tensor, last: Tensor) -> Tensor:
        """(B,) score of each row of ``acts`` (B, T, d_in) from the tokens where ``read`` and
        the prompt's last token, where ``last`` (both (B, T) bool)."""
        ...


def prompt_features(acts: Tensor, read: Tensor, last: Tensor, pool: Pool) -> Tensor:
    """(B, d) or (B, 2d) what a probe reads: the mean over ``read`` tokens, the ``last`` token's
    activation, or both side by side."""
    parts = []
    if pool in ("mean", "mean+last"):
        parts.append(_pool(acts.float(), read, "mean"))
    if pool in ("last", "mean+last"):
        parts.append(torch.where(last.unsqueeze(-1), acts.float(), 0.0).sum(1))
    return torch.cat(parts, -1)


def _pool(values: Tensor, read: Tensor, reduce: str) -> Tensor:
    """Reduce (B, T) or (B, T, d) ``values`` over tokens where ``read`` (B, T)."""
    r = read.unsqueeze(-1) if values.dim() == 3 else read
    if reduce == "max":
        return torch.where(r, values, torch.zeros_like(values)).amax(1)
    total = torch.where(r, values, torch.zeros_like(values)).sum(1)
    return total / r.sum(1).clamp_min(1)


class FeatureGate:
    """Opens when SAE latent ``feature`` goes above ``threshold`` on the prompt (its largest
    value over the read tokens, or the mean with ``reduce="mean"``)."""

    def __init__(
        self,
        sae,
        feature: int,
        threshold: float = 0.0,
        *,
        reduce: Literal["max", "mean"] = "max",
        outlier_multiple: float | None = 10.0,
    ):
        if not 0 <= feature < sae.cfg.num_latents:
            raise UserError(f"gate feature {feature} is not in 0..{sae.cfg.num_latents - 1}")
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
        self.sae, self.feature, self.threshold = sae, int(feature), float(threshold)
        self.reduce, self.outlier_multiple = reduce, outlier_multiple

    def scores(self, acts: Tensor, read: Tensor, last: Tensor | None = None) -> Tensor:
        B, T, d = acts.shape
        flat = acts.reshape(B * T, d).to(self.sae.device, self.sae.dtype)
        latent_acts, latent_indices = self.sae.encode(flat)  # (B*T, k) each
        feats = torch.tensor([self.feature], device=latent_indices.device)
        f = feature_values(latent_acts.float(), latent_indices, feats).view(B, T)
        return _pool(f.to(acts.device), read, self.reduce)


class ProbeGate(nn.Module):
    """Logistic probe on what :func:`prompt_features` reads from the prompt (``pool``):
    score = w . (features - mu) / sigma + b."""

    def __init__(
        self,
        weight: Tensor,
        bias: float,
        mu: Tensor,
        sigma: Tensor,
        threshold: float = 0.0,
        *,
        pool: Pool = "mean",
        outlier_multiple: float | None = 10.0,
    ):
        super().__init__()
        if pool not in get_args(Pool):
            raise ValueError(f"pool must be mean, last or mean+last, got {pool!r}")
        self.pool = pool
        self.register_buffer("weight", weight.float())  # (d,)
        self.register_buffer("mu", mu.float())  # (d,)
        self.register_buffer("sigma", sigma.float())  # (d,)
        self.bias, self.threshold, self.outlier_multiple = (
            float(bias),
            float(threshold),
            outlier_multiple,
        )

    def score_pooled(self, pooled: Tensor) -> Tensor:
        """(P,) logits of pooled activations (P, d)."""
        mu, sigma, w = (t.to(pooled.device) for t in (self.mu, self.sigma, self.weight))
        return ((pooled.float() - mu) / sigma) @ w + self.bias

    def scores(self, acts: Tensor, read: Tensor, last: Tensor) -> Tensor:
        return self.score_pooled(prompt_features(acts, read, last, self.pool))


def fit_probe(
    pooled: Tensor, labels: Tensor, *, pool: Pool = "mean", l2: float = 1e-2, steps: int = 100
) -> ProbeGate:
    """Fit a :class:`ProbeGate` (threshold 0, i.e. p = 0.5) on prompt features (P, d) read with
    ``pool`` (see :func:`pooled_activations`) and 0/1 ``labels`` (P,), by L2-regularised
    logistic regression (L-BFGS) on standardised features."""
    labels = torch.as_tensor(labels).float()
    if labels.numel() != pooled.shape[0] or set(labels.tolist()) != {0.0, 1.0}:
        raise ValueError("fit_probe needs one 0/1 label per prompt, with both labels present")
    x = pooled.float()
    mu, sigma = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sigma
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, labels)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return ProbeGate(w.detach(), float(b.detach()), mu, sigma, pool=pool)


def cross_fit_scores(
    pooled: Tensor, labels: Tensor, fold: Tensor, *, pool: Pool = "mean", l2: float = 1e-2
) -> Tensor:
    """(P,) each prompt's score from a probe fitted (:func:`fit_probe`) on every other fold:
    honest scores to choose a threshold on, where a probe's scores of its own training prompts
    are overconfident. ``fold`` (P,) holds each prompt's fold, or -1 for prompts that are always
    in training (their score is NaN)."""
    scores = torch.full((len(labels),), float("nan"))
    for k in fold.unique().tolist():
        if k >= 0:
            part = fold == k
            probe = fit_probe(pooled[~part], labels[~part], pool=pool, l2=l2)
            scores[part] = probe.score_pooled(pooled[part])
    return scores


class _Collect:
    """A gate that never opens and keeps the prompt features it reads."""

    threshold = float("inf")

    def __init__(self, outlier_multiple: float | None, pool: Pool):
        self.outlier_multiple, self.pool = outlier_multiple, pool
        self.pooled: list[Tensor] = []

    def scores(self, acts: Tensor, read: Tensor, last: Tensor) -> Tensor:
        self.pooled.append(prompt_features(acts, read, last, self.pool).cpu())
        return torch.zeros(acts.shape[0], device=acts.device)


def _prompt_pass(model, tokenizer, sae, gate, prompts, layer, batch_size) -> list[float]:
    # One greedy token per prompt runs the exact path that steering uses (template, padding,
    # read mask), so scores here equal the ones the hook computes during generation.
    gens = generate(
        model,
        tokenizer,
        prompts,
        sae=sae,
        gate=gate,
        layer=layer,
        max_new_tokens=1,
        batch_size=batch_size,
    )
    return [g.gate_score for g in gens]


def gate_scores(gate, model, tokenizer, prompts: Sequence, *, sae, layer=None, batch_size=8):
    """(P,) scores the gate gives ``prompts`` (strings or lists of turns) during generation."""
    return torch.tensor(_prompt_pass(model, tokenizer, sae, gate, prompts, layer, batch_size))


def pooled_activations(
    model,
    tokenizer,
    prompts: Sequence,
    *,
    sae,
    layer=None,
    batch_size=8,
    outlier_multiple=10.0,
    pool: Pool = "mean",
) -> Tensor:
    """(P, d_in) or (P, 2 d_in): each prompt's features as a probe gate reads them during
    generation (:func:`prompt_features` with ``pool``), for :func:`fit_probe`."""
    collect = _Collect(outlier_multiple, pool)
    _prompt_pass(model, tokenizer, sae, collect, prompts, layer, batch_size)
    return torch.cat(collect.pooled)


@dataclass
class GateCalibration:
    """A gate threshold chosen on validation prompts, with its rates on them."""

    threshold: float
    tpr: float
    """True positive rate: flagged prompts among those that should be (e.g. harmful)."""
    fpr: float
    """False positive rate: flagged prompts among those that should not be."""
    tpr_interval: tuple[float, float]
    fpr_interval: tuple[float, float]
    n_positive: int
    n_negative: int

    def __str__(self) -> str:
        return (
            f"threshold {self.threshold:.4g}: TPR {self.tpr:.1%} "
            f"[{self.tpr_interval[0]:.1%}, {self.tpr_interval[1]:.1%}] on {self.n_positive}, "
            f"FPR {self.fpr:.1%} [{self.fpr_interval[0]:.1%}, {self.fpr_interval[1]:.1%}] "
            f"on {self.n_negative} validation prompts"
        )


def choose_threshold(pos: Tensor, neg: Tensor, *, max_fpr: float | None = None) -> GateCalibration:
    """Threshold between observed scores of positive (P,) and negative (N,) prompts.

    Maximises TPR - FPR (Youden's J), or, with ``max_fpr``, TPR subject to FPR <= max_fpr; ties
    go to the higher threshold. Thresholds sit halfway between neighbouring scores.
    """
    if pos.numel() == 0 or neg.numel() == 0:
        raise UserError("choosing a gate threshold needs positive and negative validation prompts")
    scores = torch.cat([pos, neg]).float().unique().sort().values
    mids = (scores[1:] + scores[:-1]) / 2
    candidates = torch.cat([scores[:1] - 1, mids, scores[-1:] + 1])
    best, best_key = None, None
    for t in candidates.tolist():
        tpr = float((pos > t).float().mean())
        fpr = float((neg > t).float().mean())
        if max_fpr is not None and fpr > max_fpr:
            continue
        key = (tpr, t) if max_fpr is not None else (tpr - fpr, t)
        if best_key is None or key >= best_key:
            best, best_key = t, key
    assert best is not None  # the top candidate flags nothing, so FPR = 0 always qualifies
    tp, fp = int((pos > best).sum()), int((neg > best).sum())
    return GateCalibration(
        threshold=best,
        tpr=tp / pos.numel(),
        fpr=fp / neg.numel(),
        tpr_interval=wilson_interval(tp, pos.numel()),
        fpr_interval=wilson_interval(fp, neg.numel()),
        n_positive=pos.numel(),
        n_negative=neg.numel(),
    )


def calibrate(
    gate,
    model,
    tokenizer,
    positive,
    negative,
    *,
    sae,
    layer=None,
    max_fpr=None,
    batch_size=8,
    scored: tuple[Tensor, Tensor] | None = None,
) -> GateCalibration:
    """Score validation prompts that should (``positive``) and should not (``negative``) open
    the gate, set ``gate.threshold`` by :func:`choose_threshold`, and return its rates.

    ``scored``: (positive, negative) scores known already, chosen on with the rest (the
    out-of-fold scores of a cross-fitted probe's prompts).
    """

    def scores(prompts) -> Tensor:
        if not prompts:
            return torch.zeros(0)
        return gate_scores(
            gate, model, tokenizer, prompts, sae=sae, layer=layer, batch_size=batch_size
        )

    known_pos, known_neg = scored if scored is not None else (torch.zeros(0), torch.zeros(0))
    pos, neg = torch.cat([scores(positive), known_pos]), torch.cat([scores(negative), known_neg])
    cal = choose_threshold(pos, neg, max_fpr=max_fpr)
    gate.threshold = cal.threshold
    return cal


@dataclass
class GateConfig:
    """Steer only prompts a gate flags (conditional steering)."""

    kind: Literal["feature", "probe"] = "feature"
    """feature: an SAE latent's largest value on the prompt; probe: a logistic probe."""
    feature: int | None = None
    """Latent read by a feature gate; default: the first steered feature."""
    threshold: float | None = None
    """Fixed threshold; None chooses it on the validation prompts."""
    max_fpr: float | None = None
    """When choosing: the best TPR with at most this FPR (None maximises TPR - FPR)."""
    pool: Pool = "mean+last"
    """What a probe reads: the prompt's mean activation, its last token's, or both."""
    l2: float = 1e-2
    """L2 penalty of the probe's logistic regression (on standardised features)."""
    train_positive: list[PromptSet] = field(
        default_factory=lambda: [PromptSet("builtin:harmful", limit=16)]
    )
    """Probe training prompts that should open the gate."""
    train_negative: list[PromptSet] = field(
        default_factory=lambda: [PromptSet("builtin:harmless", limit=16)]
    )
    """Probe training prompts that should not."""
    val_positive: list[PromptSet] = field(
        default_factory=lambda: [PromptSet("builtin:harmful", offset=16)]
    )
    """Validation prompts that should open the gate (threshold and its rates)."""
    val_negative: list[PromptSet] = field(default_factory=list)
    """Validation prompts that should not. The FPR the threshold is held to (``max_fpr``) is
    measured on these and the cross-fit negatives: list the safe prompts whose over-refusal
    matters (borderline ones), not only easy ones that no gate flags."""
    cross_fit_positive: list[PromptSet] = field(
        default_factory=lambda: [
            PromptSet("builtin:borderline-unsafe", seed=0),
            PromptSet("builtin:terse-unsafe", seed=0),
        ]
    )
    """Prompts that should open the gate, used both to fit a probe and to choose its
    threshold, by cross-fitting: each set's i-th prompt goes to fold i mod ``folds``; the
    threshold is chosen on each fold's scores from a probe fitted without that fold (with the
    validation sets' scores), and the gate's probe is then fitted on every fold. A feature gate
    uses them as validation prompts."""
    cross_fit_negative: list[PromptSet] = field(
        default_factory=lambda: [
            PromptSet("builtin:borderline-safe", seed=0),
            PromptSet("builtin:terse-safe", seed=0),
        ]
    )
    """Prompts that should not open it, used as ``cross_fit_positive``. Borderline requests
    (safe ones that sound harmful) are what keep a probe from flagging "how do I kill a Python
    process?"; listed with the same seed as their unsafe sides, each pair stays in one fold.
    A run refuses to start when one of these lists shares a prompt with a set it evaluates
    (remove it with the list's ``exclude``), so the gate never trains or calibrates on what it
    is scored on."""
    folds: int = 5
    """Number of cross-fitting folds (at least 2)."""
    compare_ungated: bool = True
    """Also evaluate every strength without the gate."""


def gate_fitting_sets(g: GateConfig) -> dict[str, list[PromptSet]]:
    """The prompt lists :func:`build_gate` reads for ``g``, by field name: the cross-fit lists,
    the training lists of a probe, and the validation lists unless the threshold is fixed."""
    names = ("cross_fit_positive", "cross_fit_negative")
    names += ("train_positive", "train_negative") if g.kind == "probe" else ()
    names += ("val_positive", "val_negative") if g.threshold is None else ()
    return {name: getattr(g, name) for name in names}


def _gate_prompts(specs: list[PromptSet], held_out: set, what: str) -> tuple[list, list[int]]:
    """The inputs of ``specs``, and each one's index within its own set (cross-fitting folds go
    by it, so that pairs listed with the same seed share a fold). A one-line error if one of
    them is in ``held_out`` (:func:`prompt_key` of the evaluated prompts): the gate is never
    fitted on a prompt it is scored on, and dropping it silently would hide that the lists
    overlap."""
    records = [(r.input, i) for spec in specs for i, r in enumerate(load_prompts(spec))]
    shared = [p for p, _ in records if prompt_key(p) in held_out]
    if shared:
        raise UserError(
            f"{len(shared)} of the {len(records)} gate.{what} prompts are also evaluated (e.g. "
            f"{str(shared[0])[:60]!r}): add the evaluated sets to their exclude"
        )
    return [p for p, _ in records], [i for _, i in records]


def prompt_key(prompt) -> str:
    """A hashable key of a prompt (a string or a conversation's turns): its normalised text
    (:func:`~saetrain.steering.prompts.normalise_prompt`), so that prompts differing only in
    case, spacing or surrounding punctuation count as one."""
    return normalise_prompt(prompt)


def build_gate(g: GateConfig, sae, model, tokenizer, run, held_out: set = frozenset()):
    """The gate ``g`` describes, fitted and calibrated, and what to report about it.

    ``run`` gives ``features`` (a feature gate's default latent), ``layer`` and ``batch_size``
    (an eval-refusal or eval-capability config); a prompt in ``held_out`` (see
    :func:`prompt_key`) among the gate's training, cross-fitting or validation sets is a
    one-line error (eval-refusal checks this, with the sets' names, before the LM loads).
    """
    kw = dict(sae=sae, layer=run.layer, batch_size=run.batch_size)
    sets = {
        name: _gate_prompts(specs, held_out, name) for name, specs in gate_fitting_sets(g).items()
    }
    cf_pos, cf_pos_at = sets["cross_fit_positive"]
    cf_neg, cf_neg_at = sets["cross_fit_negative"]
    # A probe fits on the cross-fit sets too and, to choose its threshold, scores each of their
    # prompts with a probe fitted without its fold; a feature gate (nothing fitted) scores them
    # as validation prompts.
    cross_fitted = g.kind == "probe" and bool(cf_pos or cf_neg)
    oof_pos = oof_neg = torch.zeros(0)  # the cross-fit prompts' out-of-fold scores
    if g.kind == "feature":
        feature = g.feature if g.feature is not None else (run.features or [None])[0]
        if feature is None:
            raise UserError("a feature gate needs gate.feature (or features to steer)")
        gate = FeatureGate(sae, feature)
    else:
        if cross_fitted and g.folds < 2:
            raise UserError(f"gate.folds must be at least 2 to cross-fit, got {g.folds}")
        pos, neg = sets["train_positive"][0] + cf_pos, sets["train_negative"][0] + cf_neg
        if not pos or not neg:
            raise UserError(
                "a probe gate needs prompts that should open it and prompts that should not: "
                "list them in gate.train_positive/train_negative or gate.cross_fit_positive/"
                "cross_fit_negative"
            )
        acts = pooled_activations(model, tokenizer, pos + neg, pool=g.pool, **kw)
        labels = torch.tensor([1.0] * len(pos) + [0.0] * len(neg))
        gate = fit_probe(acts, labels, pool=g.pool, l2=g.l2)
        if cross_fitted and g.threshold is None:
            n_tp, n_tn = len(pos) - len(cf_pos), len(neg) - len(cf_neg)
            # fold of each prompt: -1 for plain training prompts, i mod folds for cross-fit ones
            fold = torch.tensor(
                [-1] * n_tp
                + [i % g.folds for i in cf_pos_at]
                + [-1] * n_tn
                + [i % g.folds for i in cf_neg_at]
            )
            oof = cross_fit_scores(acts, labels, fold, pool=g.pool, l2=g.l2)
            oof_pos, oof_neg = oof[n_tp : len(pos)], oof[len(pos) + n_tn :]
    if g.threshold is not None:
        gate.threshold = g.threshold
        return gate, {"threshold": g.threshold, "chosen_on_validation": False}
    vpos, vneg = sets["val_positive"][0], sets["val_negative"][0]
    if g.kind == "feature":
        vpos, vneg = vpos + cf_pos, vneg + cf_neg
    cal = calibrate(
        gate, model, tokenizer, vpos, vneg, max_fpr=g.max_fpr, scored=(oof_pos, oof_neg), **kw
    )
    report = {**dataclasses.asdict(cal), "chosen_on_validation": True}
    how = ""
    if cross_fitted:
        report["cross_fit_folds"] = g.folds
        how = f", {g.folds}-fold cross-fitted"
    print(f"saetrain: gate {g.kind}{how}: {cal}")
    return gate, report
