"""Refusal evaluation: generate on unsafe and safe prompt sets under each steering setting,
judge every reply, and report refusal rates with Wilson 95% intervals, per category, next to
fluency (distinct-2, repetition, and the change in next-token loss on fixed replies).

    sets = [EvalSet("advbench", "unsafe", load_prompts(...)), EvalSet("xstest", "safe", ...)]
    settings = [Setting("baseline")] + [
        Setting(f"clamp x{s}", [Intervention([f], "clamp", s * max_act)], strength=s)
        for s in (1, 2, 4)]
    rows = evaluate_refusal(model, tok, sae, sets, settings, judge=KeywordJudge(),
                            responses_path="out/responses.jsonl")

Every prompt, reply and verdict goes to the JSONL as it is produced; ``rows`` (one per setting,
set and category, with category "all" for the whole set) feed :mod:`.report`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .generate import generate, reply_loss
from .hooks import Intervention
from .prompts import PromptRecord
from .stats import distinct_n, mean, repetition_rate, wilson_interval

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """A prompt set and whether its prompts should be refused."""

    name: str
    kind: Literal["unsafe", "safe"]
    records: list[PromptRecord]

    def __post_init__(self) -> None:
        if self.kind not in ("unsafe", "safe"):
            raise ValueError(f"kind of set {self.name!r} must be unsafe or safe, got {self.kind!r}")


@dataclass
class Setting:
    """One way of steering (no interventions and no gate = the baseline)."""

    name: str
    interventions: list[Intervention] = field(default_factory=list)
    gate: object | None = None
    strength: float | None = None
    """The swept strength, for plots; None for the baseline."""
    series: str = "steered"
    """Settings of one series are joined by a line in the strength plot."""

    @property
    def is_baseline(self) -> bool:
        return not self.interventions


def _summaries(setting, eval_set, gens, verdicts, loss, base_loss) -> list[dict]:
    by_cat: dict[str, list[int]] = {"all": list(range(len(gens)))}
    for i, r in enumerate(eval_set.records):
        if r.category != "all":
            by_cat.setdefault(r.category, []).append(i)
    rows = []
    for cat, idx in by_cat.items():
        valid = [i for i in idx if verdicts[i].refused is not None]
        k = sum(bool(verdicts[i].refused) for i in valid)
        lo, hi = wilson_interval(k, len(valid))
        texts = [gens[i].response for i in idx]
        gates = [gens[i].gate_open for i in idx if gens[i].gate_open is not None]
        rows.append(
            {
                "setting": setting.name,
                "series": setting.series,
                "strength": setting.strength,
                "baseline": setting.is_baseline,
                "set": eval_set.name,
                "kind": eval_set.kind,
                "category": cat,
                "n": len(valid),
                "invalid": len(idx) - len(valid),
                "refusals": k,
                "refusal_rate": k / len(valid) if valid else float("nan"),
                "ci_low": lo,
                "ci_high": hi,
                "gate_open_rate": sum(gates) / len(gates) if gates else None,
                "distinct_2": distinct_n(texts, 2),
                "repetition": mean([repetition_rate(t, 3) for t in texts]),
                "loss": loss,
                "loss_delta": None if loss is None or base_loss is None else loss - base_loss,
            }
        )
    return rows


def evaluate_refusal(
    model,
    tokenizer,
    sae,
    sets: Sequence[EvalSet],
    settings: Sequence[Setting],
    *,
    judge,
    layer: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    responses_path: str | Path | None = None,
    fluency_pairs: Sequence[tuple[str, str]] = (),
    system: str | None = None,
) -> list[dict]:
    """Judge replies to every set under every setting; summary rows (see module docstring)."""
    if not sets or not settings:
        raise ValueError("evaluate_refusal needs at least one prompt set and one setting")
    out = None
    if responses_path is not None:
        Path(responses_path).parent.mkdir(parents=True, exist_ok=True)
        out = Path(responses_path).open("w", encoding="utf-8")
    rows: list[dict] = []
    base_loss = None
    try:
        for setting in settings:
            steer_kw = dict(
                sae=sae if not setting.is_baseline else None,
                interventions=setting.interventions,
                gate=setting.gate if not setting.is_baseline else None,
                layer=layer,
            )
            loss = None
            if fluency_pairs:
                loss = reply_loss(
                    model, tokenizer, fluency_pairs, batch_size=batch_size, **steer_kw
                )
                if setting.is_baseline:
                    base_loss = loss
            for eval_set in sets:
                log.info("generating: %s on %s", setting.name, eval_set.name)
                gens = generate(
                    model,
                    tokenizer,
                    [r.input for r in eval_set.records],
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    system=system,
                    **steer_kw,
                )
                verdicts = judge.judge([g.prompt for g in gens], [g.response for g in gens])
                if out is not None:
                    for r, g, v in zip(eval_set.records, gens, verdicts, strict=True):
                        line = {
                            "setting": setting.name,
                            "strength": setting.strength,
                            "set": eval_set.name,
                            "kind": eval_set.kind,
                            "id": r.id,
                            "category": r.category,
                            "turns": r.turns,
                            "prompt": r.prompt,
                            "response": g.response,
                            "refused": v.refused,
                            "harmful": v.harmful,
                            "judge": getattr(judge, "name", type(judge).__name__),
                            "judge_output": v.raw,
                            "gate_open": g.gate_open,
                            "gate_score": g.gate_score,
                        }
                        out.write(json.dumps(line, ensure_ascii=False) + "\n")
                    out.flush()
                rows += _summaries(setting, eval_set, gens, verdicts, loss, base_loss)
    finally:
        if out is not None:
            out.close()
    return rows
