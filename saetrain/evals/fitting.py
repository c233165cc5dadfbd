"""What an ``eval-refusal`` run fits, and on which prompts, kept apart from what it evaluates
(issue 20: "fitting is kept apart from testing, by text and by source").

Three things are fitted on prompt sets: the direction arms' difference-in-means direction
(``direction.positive`` / ``negative``), the gate's probe and threshold (the ``gate`` lists that
:func:`~saetrain.steering.gate.gate_fitting_sets` names), and the ranked features (``saetrain
features`` records its ``harmful`` / ``harmless`` sets in features.json under ``fitted_on``).

    fitting, unchecked = fitting_sets(cfg, arms)       # prompt files only: no LM yet
    warnings = check_apart(evaluated, fitting)         # UserError on a shared prompt
    record = fitting_record(fitting, evaluated, unchecked + warnings)   # -> fitting.json

An evaluated prompt that occurs in a fitting set (by :func:`normalise_prompt`) stops the run
with one line naming both sets and the ``exclude`` that removes it; an evaluated set that
shares a source (:func:`prompt_sources`) with a fitting set gets a warning: no prompt is
shared, but prompts written by the same people for the same benchmark are alike.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..steering.gate import gate_fitting_sets
from ..steering.prompts import (
    PromptRecord,
    PromptSet,
    load_prompts,
    normalise_prompt,
    prompt_sources,
)
from .arms import ArmConfig

DIRECTION_KINDS = ("direction_add", "direction_ablate")


@dataclass(frozen=True)
class FittingSet:
    """A prompt set something is fitted on, and its prompts."""

    role: str
    """What it fits: direction.positive, gate.train_positive, features.harmful, ..."""
    spec: PromptSet
    records: list[PromptRecord]
    where: str
    """Where its spec is written, for the one-line fix: "gate.train_positive", "harmful of the
    features config that wrote steering/features/features.json", ..."""
    redo: str = ""
    """What to rerun after changing it (e.g. "rerun saetrain features")."""

    @property
    def name(self) -> str:
        return self.spec.display_name

    @property
    def sources(self) -> list[str]:
        return prompt_sources(self.spec)


@dataclass(frozen=True)
class EvaluatedSet:
    """A prompt set the run scores, and its prompts."""

    spec: PromptSet
    kind: str
    """unsafe or safe."""
    records: list[PromptRecord]

    @property
    def name(self) -> str:
        return self.spec.display_name


def uses_direction(arms: list[ArmConfig]) -> bool:
    """Whether an arm needs the difference-in-means direction."""
    return any(a.kind in DIRECTION_KINDS for a in arms)


def uses_gate(cfg, arms: list[ArmConfig]) -> bool:
    """Whether the run's gate is built: it has one, and an arm is gated or is the gate alone."""
    return cfg.gate is not None and any(
        a.gate != "none" or a.kind == "classifier_refuse" for a in arms
    )


def _json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {what} {path} ({e}): give the file it wrote") from None


def _recorded(sets: dict, role: str, where: str, redo: str, origin: str) -> list[FittingSet]:
    """The fitting sets a features table or a saved direction records, reloaded."""
    out = []
    for side, specs in sets.items():
        for d in specs if isinstance(specs, list) else [specs]:
            spec = PromptSet.from_dict(d)
            try:
                records = load_prompts(spec)
            except UserError as e:
                raise UserError(
                    f"{origin} was fitted on {spec.path}, which cannot be read from here ({e}): "
                    "run from the folder it was made in"
                ) from None
            out.append(FittingSet(f"{role}.{side}", spec, records, f"{side} of {where}", redo))
    return out


def fitting_sets(cfg, arms: list[ArmConfig]) -> tuple[list[FittingSet], list[str]]:
    """The prompt sets this eval-refusal run fits something on, loaded (files only), and a
    warning for each fitted thing whose prompt sets are unknown (an older features table or
    saved direction)."""
    fitting: list[FittingSet] = []
    unknown: list[str] = []
    if uses_direction(arms):
        d = cfg.direction
        if d.path is None:
            for side in ("positive", "negative"):
                for spec in getattr(d, side):
                    where = f"direction.{side}"
                    fitting.append(FittingSet(where, spec, load_prompts(spec), where))
        elif (Path(d.path) / "direction.json").is_file():
            meta = _json(Path(d.path) / "direction.json", "direction")
            sets = (meta.get("fitted_on") or {}).get("sets")
            if sets:
                origin = f"the direction in {d.path}"
                where = "direction.positive/negative of the eval-refusal config that fitted it"
                fitting += _recorded(sets, "direction", where, "refit it", origin)
            else:
                unknown.append(
                    f"the direction in {d.path} does not record the prompt sets it was fitted on, "
                    "so its overlap with the evaluated sets is unchecked: refit it"
                )
    if uses_gate(cfg, arms):
        for name, specs in gate_fitting_sets(cfg.gate).items():
            for spec in specs:
                fitting.append(FittingSet(f"gate.{name}", spec, load_prompts(spec), f"gate.{name}"))
    if cfg.features_table:
        path = Path(cfg.features_table)
        if not path.is_file():
            raise UserError(
                f"features_table {path} does not exist: run `saetrain features` first, or set "
                "features_table: null"
            )
        sets = _json(path, "features table").get("fitted_on")
        if sets:
            where = f"the features config that wrote {path}"
            fitting += _recorded(sets, "features", where, "rerun saetrain features", str(path))
        else:
            unknown.append(
                f"{path} does not record the prompt sets its features were ranked on (it predates "
                "fitted_on), so its overlap with the evaluated sets is unchecked: rerun "
                "saetrain features"
            )
    return fitting, unknown


def _flow(spec: PromptSet) -> str:
    """``spec``'s fields that differ from the defaults, as a YAML flow mapping."""
    default = PromptSet()
    keep = {"path": spec.path}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name not in ("path", "name", "exclude", "sources") and value != getattr(
            default, f.name
        ):
            keep[f.name] = value
    return "{" + ", ".join(f"{k}: {v}" for k, v in keep.items()) + "}"


def check_apart(evaluated: list[EvaluatedSet], fitting: list[FittingSet]) -> list[str]:
    """A one-line :class:`UserError` when an evaluated prompt is in a fitting set (normalised
    text); otherwise a warning per evaluated set that shares a source with fitting sets."""
    for e in evaluated:
        keys = {normalise_prompt(r.turns) for r in e.records}
        for f in fitting:
            shared = [r for r in f.records if normalise_prompt(r.turns) in keys]
            if shared:
                redo = f", then {f.redo}" if f.redo else ""
                example = " ".join(shared[0].prompt.split())[:60]
                raise UserError(
                    f"evaluated set {e.name} shares {len(shared)} of its {len(e.records)} prompts "
                    f"with the fitting set {f.name} ({f.role}), e.g. {example!r}: "
                    f"add {_flow(e.spec)} to the exclude of {f.name} in {f.where}{redo}, so "
                    "nothing is scored on a prompt it was fitted on"
                )
    warnings = []
    for e in evaluated:
        mine = set(prompt_sources(e.spec))
        alike = [
            f"{f.name} ({f.role}: {', '.join(sorted(mine & set(f.sources)))})"
            for f in fitting
            if mine & set(f.sources)
        ]
        if alike:
            warnings.append(
                f"evaluated set {e.name} shares a source with the fitting sets "
                f"{'; '.join(alike)}: no prompt is shared, but its results may flatter what was "
                "fitted; evaluate on a set from another source"
            )
    return warnings


def fitting_record(
    fitting: list[FittingSet], evaluated: list[EvaluatedSet], warnings: list[str]
) -> dict:
    """What ``fitting.json`` holds: per role, each fitting set's name, path, sources, count and
    prompts; each evaluated set's name, kind, path, sources and count; and the warnings."""
    roles: dict[str, list[dict]] = {}
    for f in fitting:
        roles.setdefault(f.role, []).append(
            {
                "name": f.name,
                "path": f.spec.path,
                "sources": f.sources,
                "count": len(f.records),
                "prompts": [r.input for r in f.records],
            }
        )
    sets = [
        {
            "name": e.name,
            "kind": e.kind,
            "path": e.spec.path,
            "sources": prompt_sources(e.spec),
            "count": len(e.records),
        }
        for e in evaluated
    ]
    return {"fitted": roles, "evaluated": sets, "warnings": list(warnings)}


def fitting_summary(record: dict) -> dict:
    """The part of :func:`fitting_record` that results.json keeps: no prompts."""
    return {
        role: [{k: v for k, v in s.items() if k != "prompts"} for s in sets]
        for role, sets in record["fitted"].items()
    }
