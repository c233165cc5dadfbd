"""Turn the arms of an ``eval-refusal`` config into settings to run (one per arm and strength).

Everything an arm needs is fitted or chosen here, before any reply is generated: the SAE
features' units, the difference-in-means direction, the random latents and directions of the
controls, whether the chat template has a system role. What was chosen goes into each
setting's ``info`` and from there into the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import UserError
from ..steering.direction import Direction, DirectionEdit, random_direction
from ..steering.hooks import Intervention
from .arms import FIXED_REFUSAL, SAFETY_SYSTEM_PROMPT, STRENGTH_KINDS, ArmConfig, controlled
from .refusal import ArmSetting

NEAREST = 10
"""random_feature draws among the latents whose firing rate is nearest the steered one's."""


def template_has_system(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system message (our plain fallback
    for tokenizers without a template does)."""
    if not getattr(tokenizer, "chat_template", None):
        return True
    marker = "saetrain-system-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": marker}, {"role": "user", "content": "hi"}],
            tokenize=False,
        )
    except Exception:  # templates that reject a system role raise their own errors
        return False
    return marker in text


def similar_latents(
    firing_rate: torch.Tensor, features: Sequence[int], exclude: Sequence[int], seed: int
) -> list[int]:
    """For each of ``features``, a latent drawn (with ``seed``) among the :data:`NEAREST` whose
    firing rates are closest on a log scale, none of them in ``exclude`` or drawn twice."""
    g = torch.Generator().manual_seed(int(seed))
    log_rate = torch.log(firing_rate.double().clamp_min(1e-12))
    taken = set(int(f) for f in exclude)
    out = []
    for f in features:
        gap = (log_rate - log_rate[f]).abs()
        gap[list(taken)] = float("inf")
        near = torch.argsort(gap)[:NEAREST]
        near = near[torch.isfinite(gap[near])]
        if near.numel() == 0:
            raise UserError("no latent is left to draw a random_feature control from")
        pick = int(near[torch.randint(near.numel(), (1,), generator=g)])
        out.append(pick)
        taken.add(pick)
    return out


def _push_norm(sae, features: Sequence[int], values: Sequence[float]) -> float:
    """|sum_i values_i W_dec[i]|: how far an SAE arm moves a token whose latents are 0."""
    W = sae.W_dec[torch.tensor(list(features), device=sae.device)].float().cpu()  # (F, d)
    v = torch.tensor([float(x) for x in values])
    return float((v @ W).norm() / float(sae.input_scale))


def build_settings(
    arms: Sequence[ArmConfig],
    *,
    sae,
    tokenizer,
    features: Sequence[int],
    strengths: Sequence[float],
    units_for: Callable[[list[int]], list[float]],
    gate=None,
    direction: Direction | None = None,
    firing_rate: torch.Tensor | None = None,
    positions: str = "all",
) -> list[ArmSetting]:
    """The settings of ``arms`` (see :mod:`saetrain.evals.arms`), in order, one per strength.

    ``units_for(features)`` gives the SAE features' units of strength; ``direction`` is needed
    by direction arms, ``firing_rate`` (per latent) by random_feature, ``gate`` by gated arms."""
    out: list[ArmSetting] = []
    # Absolute strengths of each arm, per strength: what random controls copy.
    absolute: dict[str, list[tuple[float, list[float], list[int]]]] = {}
    steered = sorted({f for a in arms for f in (a.features or features)})
    system_in_user = not template_has_system(tokenizer)
    for arm in arms:
        label = arm.label
        sweep = list(arm.strengths or strengths) if arm.kind in STRENGTH_KINDS else [None]

        def add(strength, interventions=(), *, values=None, info=None, _arm=arm, **kw):
            name = _arm.setting_name(strength)
            kw.setdefault("gate", gate if _arm.gate != "none" else None)
            out.append(
                ArmSetting(
                    name=name, arm=_arm.label, kind=_arm.kind, strength=strength,
                    values=values, interventions=list(interventions), info=info or {}, **kw,
                )
            )  # fmt: skip

        if arm.kind == "none":
            add(None, gate=None)
        elif arm.kind in ("sae_clamp", "sae_add"):
            feats = list(arm.features or features)
            units = units_for(feats)
            op = "clamp" if arm.kind == "sae_clamp" else "add"
            absolute[label] = []
            for s in sweep:
                values = [s * u for u in units]
                absolute[label].append((s, values, feats))
                iv = Intervention(feats, op, values, positions=positions)
                add(s, [iv], values=values, info={"features": feats, "units": units})
        elif arm.kind == "direction_add":
            if direction is None:
                raise UserError(f"arm {label} needs a direction (configure direction)")
            absolute[label] = []
            for s in sweep:
                value = s * direction.scale
                absolute[label].append((s, [value], []))
                edit = DirectionEdit(direction.vector, "add", value, positions=positions)
                add(s, [edit], values=[value], info={"direction_scale": direction.scale})
        elif arm.kind == "direction_ablate":
            if direction is None:
                raise UserError(f"arm {label} needs a direction (configure direction)")
            add(None, [DirectionEdit(direction.vector, "ablate", positions=positions)])
        elif arm.kind == "system_prompt":
            how = "prepended to the first user turn" if system_in_user else "system message"
            add(
                None, system=SAFETY_SYSTEM_PROMPT, system_in_user=system_in_user,
                info={"system_prompt": SAFETY_SYSTEM_PROMPT, "placed": how},
            )  # fmt: skip
        elif arm.kind == "classifier_refuse":
            add(None, gate=gate, fixed_reply=FIXED_REFUSAL, info={"reply": FIXED_REFUSAL})
        elif arm.kind in ("random_feature", "random_direction"):
            ctl = controlled(arm, list(arms))
            if ctl.label not in absolute:
                raise UserError(f"arm {label} must come after the arm it controls, {ctl.label}")
            for s, values, feats in absolute[ctl.label]:
                if arm.strengths is not None and s not in arm.strengths:
                    continue
                if arm.kind == "random_feature":
                    if firing_rate is None:
                        raise UserError(f"arm {label} needs the SAE's feature statistics")
                    picks = similar_latents(firing_rate, feats, steered, arm.seed)
                    op = "clamp" if ctl.kind == "sae_clamp" else "add"
                    iv = Intervention(picks, op, values, positions=positions)
                    rates = [float(firing_rate[p]) for p in picks]
                    info = {"controls": ctl.label, "latents": picks, "firing_rates": rates}
                    add(s, [iv], values=values, info=info)
                else:
                    norm = values[0] if not feats else _push_norm(sae, feats, values)
                    vec = random_direction(sae.cfg.d_in, arm.seed)
                    edit = DirectionEdit(vec, "add", norm, positions=positions)
                    info = {"controls": ctl.label, "norm": norm, "seed": arm.seed}
                    add(s, [edit], values=[norm], info=info)
    return out
