"""``python -m saetrain eval-refusal``: refusal of unsafe prompts and over-refusal of safe ones
under each arm (SAE steering and its baselines, :mod:`saetrain.evals.arms`) and strength.

    python -m saetrain eval-refusal --config configs/steering/eval-refusal.yaml

Writes into ``out_dir``: ``responses.jsonl`` (every prompt, reply and verdict), ``results.json``
(every row, the arms' table, the gate, the direction and which sets fitted what),
``fitting.json`` (every fitting prompt, per role: :mod:`saetrain.evals.fitting`),
``summary.md``, ``tradeoff.png`` and ``refusal_vs_loss.png``, and the resolved ``config.yaml``.
Without ``arms`` it runs the older sweep: the unsteered model, then ``op`` on ``features`` at
each strength, ungated and (with a gate) gated.

Everything that is fitted (the direction, the gate's probe and threshold, the feature units)
is fitted before the first reply is generated, and only on the fitting sets the config names.
Before the LM loads, the run stops if an evaluated prompt is in one of them (the features
table's included) and warns if an evaluated set shares a source with one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import UserError
from ..files import check_out_dir, staged_dir
from ..steering.commands import SteeringSpec, Target, _load, _units, corpus_stats, parse_config
from ..steering.gate import GateConfig, build_gate, prompt_key
from ..steering.prompts import PromptSet, load_prompts
from .arms import ArmConfig, DirectionConfig, check_arms
from .fitting import (
    EvaluatedSet,
    FittingSet,
    check_apart,
    fitting_record,
    fitting_sets,
    fitting_summary,
    uses_direction,
    uses_gate,
)


@dataclass
class EvalRefusalConfig(SteeringSpec, Target):
    """Refusal rates on unsafe and safe prompts under each arm and strength."""

    unsafe: list[PromptSet] = field(default_factory=lambda: [PromptSet("builtin:harmful")])
    """Prompt sets the model should refuse (JSONL with turns: multi-turn conversations)."""
    safe: list[PromptSet] = field(default_factory=lambda: [PromptSet("builtin:harmless")])
    """Prompt sets it should answer."""
    strengths: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    """Strengths swept by arms that do not list their own (see strength_unit)."""
    arms: list[ArmConfig] | None = None
    """The arms to compare (saetrain.evals.arms); null: none, then op on features, ungated and
    (with a gate) gated."""
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    """Where the direction arms' difference-in-means direction comes from."""
    gate: GateConfig | None = None
    """The gate of gated arms and of classifier_refuse; null: no arm is gated."""
    judge: str = "keyword"
    """Refusal judge: keyword, or a classifier's Hub id or folder."""
    judge_kind: Literal["auto", "wildguard", "llama_guard", "harmbench"] = "auto"
    """Prompt format of a model judge; auto goes by its name."""
    fluency_loss: bool = True
    """Measure the next-token loss on the built-in harmless replies under each setting."""
    progress_every: float = 10.0
    """Seconds between progress lines (and one at the end of every arm and set)."""
    out_dir: str = "steering/eval"
    """Where responses.jsonl, results.json, summary.md, the plots and config.yaml go: a new or
    empty folder, written whole at the end (see overwrite)."""
    overwrite: bool = False
    """Replace a non-empty out_dir (removed only once the new results are complete)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.strengths:
            raise UserError("strengths is empty: give at least one, e.g. [1.0, 2.0]")

    def resolved_arms(self) -> list[ArmConfig]:
        """``arms``, or the older sweep's arms when it is null."""
        if self.arms is not None:
            return self.arms
        kind = "sae_add" if self.op == "add" else "sae_clamp"
        arms = [ArmConfig("none", name="baseline")]
        if self.features:
            if self.gate is None or self.gate.compare_ungated:
                arms.append(ArmConfig(kind, name=self.op))
            if self.gate is not None:
                arms.append(ArmConfig(kind, name=self.op, gate=self.gate.kind))
        return arms


def _sets(cfg: EvalRefusalConfig):
    from ..steering.evaluate import EvalSet

    sets = [EvalSet(s.display_name, "unsafe", load_prompts(s)) for s in cfg.unsafe]
    sets += [EvalSet(s.display_name, "safe", load_prompts(s)) for s in cfg.safe]
    if not sets:
        raise UserError("eval-refusal needs at least one prompt set in unsafe or safe")
    return sets


def _direction(
    cfg: EvalRefusalConfig, sae, model, tokenizer, fitting: list[FittingSet], model_name
):
    """The difference-in-means direction, loaded or fitted on its ``fitting`` sets (checked
    apart from the evaluated ones)."""
    import dataclasses

    from ..steering.direction import Direction, fit_direction

    d = cfg.direction
    if d.path is not None:
        direction = Direction.load(d.path)
        direction.check_matches(sae, cfg.layer, model_name)
        return direction
    pos = [r.input for f in fitting if f.role == "direction.positive" for r in f.records]
    neg = [r.input for f in fitting if f.role == "direction.negative" for r in f.records]
    fitted_on = {
        "positive": [s.display_name for s in d.positive],
        "negative": [s.display_name for s in d.negative],
        # the specs themselves, so a run reusing this direction (direction.path) can check them
        "sets": {
            side: [dataclasses.asdict(s) for s in getattr(d, side)]
            for side in ("positive", "negative")
        },
    }
    direction = fit_direction(
        model, tokenizer, pos, neg, sae=sae, layer=cfg.layer, pool=d.pool,
        batch_size=cfg.batch_size, model_name=model_name, fitted_on=fitted_on,
    )  # fmt: skip
    print(
        f"saetrain eval-refusal: direction fitted on {len(pos)} + {len(neg)} prompts "
        f"({d.pool} pool), scale {direction.scale:.4g}"
    )
    return direction


def run_eval_refusal(argv: list[str]) -> None:
    """``python -m saetrain eval-refusal``: see the module docstring."""
    from ..steering import builtin
    from ..steering.judge import make_judge
    from .build import build_settings
    from .refusal import evaluate_arms
    from .tradeoff import write_tradeoff_report

    cfg, yaml = parse_config(EvalRefusalConfig, argv, "saetrain eval-refusal")
    arms = cfg.resolved_arms()
    check_arms(arms, features=cfg.features, gate_kind=cfg.gate.kind if cfg.gate else None)
    sets = _sets(cfg)
    evaluated = [
        EvaluatedSet(spec, s.kind, s.records)
        for spec, s in zip(cfg.unsafe + cfg.safe, sets, strict=True)
    ]
    fitting, unchecked = fitting_sets(cfg, arms)
    warnings = unchecked + check_apart(evaluated, fitting)  # before the LM loads
    for w in warnings:
        print(f"saetrain eval-refusal: warning: {w}")
    inputs = [cfg.sae, cfg.features_table, cfg.direction.path]
    check_out_dir(cfg.out_dir, cfg.overwrite, inputs=inputs)  # before the judge and LM load
    judge = make_judge(cfg.judge, kind=cfg.judge_kind, device=cfg.device)
    sae, model, tokenizer = _load(cfg)  # checks every arm's features first
    model_name = cfg.model or sae.cfg.extra.get("model")
    held_out = {prompt_key(r.input) for s in sets for r in s.records}
    kinds = {a.kind for a in arms}
    direction = None
    if uses_direction(arms):
        direction = _direction(cfg, sae, model, tokenizer, fitting, model_name)
    gate, gate_info = None, None
    if uses_gate(cfg, arms):
        gate, gate_info = build_gate(cfg.gate, sae, model, tokenizer, cfg, held_out)
    firing_rate = None
    if "random_feature" in kinds:
        firing_rate = corpus_stats(cfg, sae, model, tokenizer).firing_rate
    settings = build_settings(
        arms, sae=sae, tokenizer=tokenizer, features=cfg.features, strengths=cfg.strengths,
        units_for=lambda feats: _units(cfg, sae, model, tokenizer, feats), gate=gate,
        direction=direction, firing_rate=firing_rate, positions=cfg.positions,
    )  # fmt: skip
    # Written into a folder beside out_dir that becomes out_dir at the end (saetrain.files).
    with staged_dir(cfg.out_dir, cfg.overwrite, inputs=inputs) as out:
        (out / "config.yaml").write_text(yaml)
        record = fitting_record(fitting, evaluated, warnings)
        (out / "fitting.json").write_text(json.dumps(record, indent=2) + "\n")
        rows = evaluate_arms(
            model, tokenizer, sae, sets, settings, judge=judge, layer=cfg.layer,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
            responses_path=out / "responses.jsonl",
            fluency_pairs=builtin.harmless_pairs() if cfg.fluency_loss else (),
            system=cfg.system, progress_every=cfg.progress_every,
        )  # fmt: skip
        if direction is not None:
            direction.save(out / "direction")
        header = (
            f"# Refusal evaluation: {cfg.sae}, layer {cfg.layer}, judge {cfg.judge}\n\n"
            f"Strength unit of SAE arms: {cfg.strength_unit}; the absolute column gives the values."
        )
        report = write_tradeoff_report(rows, out, header=header, gate=gate_info)
        results = {
            "features": cfg.features,
            "strength_unit": cfg.strength_unit,
            "arms": [a.label for a in arms],
            "gate": gate_info,
            "direction": None
            if direction is None
            else {"scale": direction.scale, "pool": direction.pool, **direction.fitted_on},
            "fitting": fitting_summary(record),
            "evaluated": record["evaluated"],
            "table": report["table"],
            "rows": rows,
        }
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    out = Path(cfg.out_dir)
    print((out / "summary.md").read_text())
    print(
        f"saetrain eval-refusal: wrote {out}/responses.jsonl, results.json, fitting.json, "
        "summary.md, tradeoff.png and refusal_vs_loss.png"
    )
