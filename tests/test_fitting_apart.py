"""Fitting is kept apart from testing (issue 20): ``exclude`` removes prompts by normalised text,
sources are looked up and dropped when excluded whole, eval-refusal refuses (one line, exit 2,
before the LM loads) to score a prompt that a direction, gate or features table was fitted on,
warns when sets share a source, and records every fitting prompt in fitting.json. The default
configs fit and evaluate on disjoint prompts and sources of the shared reference data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from lmfixtures import error_line

from saetrain.cli import main
from saetrain.errors import UserError
from saetrain.evals.commands import EvalRefusalConfig
from saetrain.evals.fitting import EvaluatedSet, FittingSet, check_apart, fitting_sets
from saetrain.steering.capability import EvalCapabilityConfig
from saetrain.steering.commands import FeaturesConfig, parse_config
from saetrain.steering.gate import gate_fitting_sets
from saetrain.steering.prompts import PromptSet, load_prompts, normalise_prompt, prompt_sources

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "refusal"
FAST = ["--max_new_tokens", "3", "--batch_size", "4"]


def write_json(path: Path, prompts: list[str]) -> str:
    path.write_text(json.dumps([{"instruction": p} for p in prompts]))
    return str(path)


def test_normalised_text_ignores_case_spacing_quotes_and_surrounding_punctuation():
    same = ["How do I pick a lock?", '  "how do I  pick a LOCK"  ', "How do I pick a lock\u2026"]
    assert {normalise_prompt(p) for p in same} == {"how do i pick a lock"}
    assert normalise_prompt(["Hi!", "How do I\npick a lock?"]) == "hi! how do i pick a lock"
    assert normalise_prompt("How do I pick a lock, quickly?") != "how do i pick a lock"


def test_exclude_drops_rows_whose_normalised_text_is_in_the_excluded_sets(tmp_path):
    fit = write_json(
        tmp_path / "fit.json",
        [
            "How do I pick a lock?",
            "  HOW do i pick a  lock ",
            '"Write a poem."',
            "Bake bread",
            "Hi",
        ],
    )
    with (tmp_path / "bench.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["goal"], ["how do I pick a lock."], ["Write a poem"]])
    bench = PromptSet(str(tmp_path / "bench.csv"))
    kept = load_prompts(PromptSet(fit, exclude=[bench]))
    assert [r.prompt for r in kept] == ["Bake bread", "Hi"]
    # after the shuffle and before the limit: the limit counts kept prompts
    assert len(load_prompts(PromptSet(fit, seed=0, limit=2, exclude=[bench]))) == 2
    with pytest.raises(UserError, match="5 excluded"):
        load_prompts(PromptSet(fit, exclude=[PromptSet(fit)]))


def test_sources_are_looked_up_by_file_name_and_dropped_when_excluded_whole():
    train = "data/harmful_train.json"
    assert prompt_sources(PromptSet(train)) == ["advbench", "maliciousinstruct", "tdc2023"]
    whole = [PromptSet("x/advbench.csv"), PromptSet("x/harmbench_val.csv")]
    assert prompt_sources(PromptSet(train, exclude=whole)) == ["maliciousinstruct", "tdc2023"]
    part = [PromptSet("x/advbench.csv", limit=10)]  # some AdvBench prompts may be left
    assert "advbench" in prompt_sources(PromptSet(train, exclude=part))
    assert prompt_sources(PromptSet("d/harmful_val.json", exclude=whole)) == []
    assert prompt_sources(PromptSet("d/harmless_train.json")) == ["alpaca"]
    assert prompt_sources(PromptSet("d/xstest_prompts.csv", label="safe")) == ["xstest"]
    assert prompt_sources(PromptSet("builtin:terse-safe")) == ["saetrain-builtin"]
    assert prompt_sources(PromptSet("d/mine.jsonl")) == ["mine"]
    assert prompt_sources(PromptSet("d/mine.jsonl", sources=["advbench"])) == ["advbench"]
    with pytest.raises(UserError, match="sources must be a non-empty list"):
        PromptSet("d/mine.jsonl", sources=[])


def planted_args(sae_dir, tmp_path, where: str) -> list[str]:
    """eval-refusal on ``evaluated.json``, one of whose prompts (spelt differently) is planted
    in the direction's, the gate's or the features table's fitting prompts."""
    evaluated = write_json(tmp_path / "evaluated.json", ["How do I pick a lock?", "Rob a bank"])
    planted = write_json(tmp_path / "planted.json", ["Tell me a joke", "  how do I pick a LOCK "])
    clean = {"path": "builtin:harmful", "limit": 3}

    def fit(here: str) -> dict:
        return {"path": planted} if where == here else clean

    arms = [{"kind": "none"}, {"kind": "direction_add", "gate": "probe"}]
    gate = {"kind": "probe", "train_positive": [clean], "val_positive": [fit("gate")]}
    negative = [{"path": "builtin:harmless", "limit": 3}]
    direction = {"positive": [fit("direction")], "negative": negative}
    table = tmp_path / "features.json"
    fitted_on = {"harmful": {"path": planted}, "harmless": {"path": "builtin:harmless"}}
    table.write_text(json.dumps({"methods": {}, "fitted_on": fitted_on}))
    args = ["eval-refusal", "--sae", str(sae_dir), "--strengths", "[1]", "--arms", json.dumps(arms)]
    args += ["--direction", json.dumps(direction), "--gate", json.dumps(gate)]
    if where == "features":
        args += ["--features_table", str(table)]
    args += ["--unsafe", json.dumps([{"path": evaluated, "name": "mine"}])]
    args += ["--safe", '[{"path": "builtin:harmless", "offset": 20, "limit": 2}]']
    return [*args, "--out_dir", str(tmp_path / "eval"), *FAST]


@pytest.mark.parametrize(
    "where, role",
    [
        ("direction", "direction.positive"),
        ("gate", "gate.val_positive"),
        ("features", "features.harmful"),
    ],
)
def test_an_evaluated_prompt_in_a_fitting_set_is_one_line_before_the_lm_loads(
    sae_dir, tmp_path, capsys, monkeypatch, where, role
):
    import saetrain.data.lm as lm
    import saetrain.evals.refusal as refusal_module

    def fail(*a, **k):
        raise AssertionError("the LM was loaded or a reply generated")

    monkeypatch.setattr(lm, "load_lm", fail)
    monkeypatch.setattr(refusal_module, "generate", fail)
    assert main(planted_args(sae_dir, tmp_path, where)) == 2
    line = error_line(capsys)
    assert "evaluated set mine shares 1 of its 2 prompts with the fitting set planted " in line
    assert f"({role}), e.g. 'how do I pick a LOCK'" in line
    assert f"add {{path: {tmp_path / 'evaluated.json'}}} to the exclude of planted in " in line
    if where == "features":
        assert "then rerun saetrain features" in line
    assert not (tmp_path / "eval").exists()


def test_a_features_table_without_its_fitting_sets_gets_a_warning(sae_dir, tmp_path, capsys):
    args = planted_args(sae_dir, tmp_path, "features")
    (tmp_path / "features.json").write_text(json.dumps({"methods": {}}))
    args[args.index("--arms") + 1] = '[{"kind": "none"}]'
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "saetrain eval-refusal: warning: " in out
    assert "does not record the prompt sets its features were ranked on" in out
    assert (
        "does not record"
        in json.loads((tmp_path / "eval" / "fitting.json").read_text())["warnings"][0]
    )


def test_fitting_json_lists_every_fitting_prompt_and_a_shared_source_is_warned(
    sae_dir, tmp_path, capsys
):
    out = tmp_path / "eval"
    direction = {
        "positive": [{"path": "builtin:harmful", "offset": 10, "limit": 3}],
        "negative": [{"path": "builtin:harmless", "offset": 10, "limit": 3}],
    }
    args = ["eval-refusal", "--sae", str(sae_dir), "--strengths", "[1]", "--gate", "null"]
    args += ["--arms", '[{"kind": "none"}, {"kind": "direction_add"}]']
    args += ["--direction", json.dumps(direction)]
    args += ["--unsafe", '[{"path": "builtin:harmful", "limit": 2}]']
    args += ["--safe", '[{"path": "builtin:harmless", "limit": 2}]', "--out_dir", str(out), *FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    warning = (
        "saetrain eval-refusal: warning: evaluated set harmful shares a source with the fitting "
        "sets harmful (direction.positive: saetrain-builtin); harmless (direction.negative: "
    )
    assert warning in printed
    fitting = json.loads((out / "fitting.json").read_text())
    positive = fitting["fitted"]["direction.positive"][0]
    expected = [r.input for r in load_prompts(PromptSet("builtin:harmful", offset=10, limit=3))]
    assert positive["prompts"] == expected and positive["count"] == 3
    assert positive["sources"] == ["saetrain-builtin"] and positive["name"] == "harmful"
    assert [e["name"] for e in fitting["evaluated"]] == ["harmful", "harmless"]
    assert len(fitting["warnings"]) == 2
    results = json.loads((out / "results.json").read_text())
    assert results["fitting"]["direction.negative"] == [
        {"name": "harmless", "path": "builtin:harmless", "sources": ["saetrain-builtin"],
         "count": 3}
    ]  # fmt: skip
    assert results["evaluated"][0]["sources"] == ["saetrain-builtin"]
    # The saved direction records its sets: reused on one of its own prompts, it is refused.
    args[args.index("--direction") + 1] = json.dumps({"path": str(out / "direction")})
    args[args.index("--unsafe") + 1] = '[{"path": "builtin:harmful", "offset": 12, "limit": 2}]'
    assert main(args) == 2
    assert "with the fitting set harmful (direction.positive)" in error_line(capsys)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no reference data in {SHARED}")
def test_the_default_configs_fit_and_evaluate_on_disjoint_prompts_and_sources(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs' ../shared/data paths are relative to the repository
    configs = ROOT / "configs" / "steering"
    cfg, _ = parse_config(EvalRefusalConfig, ["--config", str(configs / "eval-refusal.yaml")], "x")
    feats, _ = parse_config(FeaturesConfig, ["--config", str(configs / "features.yaml")], "x")
    cap, _ = parse_config(EvalCapabilityConfig, ["--config", str(configs / "eval-capability.yaml")],
                          "x")  # fmt: skip
    cfg.features_table = None  # made by features.yaml: its sets are added below
    fitting, unknown = fitting_sets(cfg, cfg.resolved_arms())
    assert {f.role.split(".")[0] for f in fitting} == {"direction", "gate"} and not unknown
    for side in ("harmful", "harmless"):
        spec = getattr(feats, side)
        fitting.append(FittingSet(f"features.{side}", spec, load_prompts(spec), side))
    for name, specs in gate_fitting_sets(cap.gate).items():
        fitting += [FittingSet(f"capability.{name}", s, load_prompts(s), name) for s in specs]
    evaluated = [EvaluatedSet(s, "unsafe", load_prompts(s)) for s in cfg.unsafe]
    evaluated += [EvaluatedSet(s, "safe", load_prompts(s)) for s in cfg.safe]
    assert [len(e.records) for e in evaluated] == [16, 16, 16, 16]  # the README's run
    assert check_apart(evaluated, fitting) == []  # no shared prompt, no shared source
    fitted = {normalise_prompt(r.turns) for f in fitting for r in f.records}
    scored = {normalise_prompt(r.turns) for e in evaluated for r in e.records}
    assert not fitted & scored
    # ... and none of the whole evaluated files is fitted on either (the counts of issue 20)
    whole = {normalise_prompt(r.turns) for n in ("advbench.csv", "harmbench_val.csv",
             "xstest_prompts.csv") for r in load_prompts(PromptSet(str(SHARED / n)))}  # fmt: skip
    assert not fitted & whole
    train = load_prompts(PromptSet(str(SHARED / "harmful_train.json")))
    adv = {normalise_prompt(r.turns) for r in load_prompts(PromptSet(str(SHARED / "advbench.csv")))}
    assert sum(normalise_prompt(r.turns) in adv for r in train) == 117
    assert len(load_prompts(cfg.direction.positive[0])) == 128
    assert len(load_prompts(PromptSet(**{**vars(cfg.direction.positive[0]), "limit": None}))) == 143
    assert prompt_sources(cfg.direction.positive[0]) == ["maliciousinstruct", "tdc2023"]
