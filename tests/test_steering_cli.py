"""``python -m saetrain features | steer | eval-refusal`` end to end on a tiny Phi-3 and a tiny
SAE: files written, config files parse, bad input gives one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lmfixtures import error_line

from saetrain.cli import main
from saetrain.evals.commands import EvalRefusalConfig
from saetrain.steering.commands import parse_config
from saetrain.steering.prompts import PromptSet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "steering").glob("*.yaml"))
FAST = ["--max_new_tokens", "3", "--batch_size", "4"]


def test_steer_prints_baseline_and_steered_replies_side_by_side(sae_dir, capsys):
    args = ["steer", "--sae", str(sae_dir), "--features", "[3, 5]", "--op", "add", "--prompt", "hi"]
    args += ["--strength_unit", "absolute", "--strength", "6", "--width", "80", *FAST]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prompt: hi" in out and "baseline" in out and "steered (add 3->6, 5->6)" in out


def test_features_writes_the_ranking_and_its_config(sae_dir, tmp_path):
    out = tmp_path / "features"
    args = ["features", "--sae", str(sae_dir), "--harmful.limit", "4", "--harmless.limit", "4"]
    args += ["--top_n", "5", "--out_dir", str(out), *FAST]
    assert main(args) == 0
    table = json.loads((out / "features.json").read_text())
    assert set(table["methods"]) == {"response", "contrast"} and table["layer"] == 1
    # the sets it was ranked on, for eval-refusal to keep apart from what it evaluates
    assert table["fitted_on"]["harmful"]["path"] == "builtin:harmful"
    assert table["fitted_on"]["harmless"]["limit"] == 4
    assert (out / "features.txt").is_file() and (out / "config.yaml").is_file()


def test_features_effect_clamps_in_corpus_units_that_do_not_move_with_the_prompts(
    sae_dir, tmp_path
):
    from saetrain.steering.feature_stats import FILE, load

    clamps = []
    for limit in (4, 6):  # two ranking sets: the clamp value of a latent must not change
        out = tmp_path / f"features{limit}"
        args = ["features", "--sae", str(sae_dir), "--harmful.limit", str(limit)]
        args += ["--harmless.limit", str(limit), "--methods", "[contrast, effect]"]
        args += ["--effect_candidates", "2", "--effect_prompts", "2", "--effect_strength", "1.5"]
        args += ["--stats_documents", "8", "--top_n", "5", "--out_dir", str(out), *FAST]
        assert main(args) == 0
        effect = json.loads((out / "features.json").read_text())["methods"]["effect"]
        assert effect["unit"] == "corpus_p999"
        clamps.append({r["feature"]: r["clamp_value"] for r in effect["rows"]})
    stats = load(sae_dir / FILE)
    assert stats.meta["sample"]["documents"] == 8
    for feature, value in clamps[0].items():
        unit = stats.unit(feature, "corpus_p999")
        assert unit > 0 and value == pytest.approx(1.5 * unit)
        if feature in clamps[1]:
            assert clamps[1][feature] == value


def test_eval_refusal_sweeps_strengths_with_a_gate_and_writes_every_file(sae_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    gate = {
        "kind": "feature",
        "val_positive": [{"path": "builtin:harmful", "offset": 16, "limit": 3}],
        "val_negative": [{"path": "builtin:harmless", "offset": 16, "limit": 3}],
        # nothing to fit for a feature gate: cross-fit sets are more validation prompts
        "cross_fit_positive": [{"path": "builtin:terse-unsafe", "limit": 2}],
        "cross_fit_negative": [],
    }
    args = ["eval-refusal", "--sae", str(sae_dir), "--features", "[3]", "--op", "add"]
    args += ["--strength_unit", "absolute", "--strengths", "[2, 8]", "--gate", json.dumps(gate)]
    args += ["--unsafe", '[{"path": "builtin:harmful", "limit": 3}]']
    args += ["--safe", '[{"path": "builtin:harmless", "limit": 2}]', "--out_dir", str(out), *FAST]
    assert main(args) == 0
    names = {"responses.jsonl", "results.json", "summary.md", "config.yaml"}
    names |= {"refusal_vs_strength.png", "tradeoff.png"}
    assert names <= {p.name for p in out.iterdir()}
    results = json.loads((out / "results.json").read_text())
    settings = {r["setting"] for r in results["rows"]}
    assert settings == {"baseline", "add x2", "add x8", "add x2 gated", "add x8 gated"}
    assert 0 <= results["gate"]["fpr"] <= 1 and results["gate"]["chosen_on_validation"]
    assert results["gate"]["n_positive"] == 5 and results["gate"]["n_negative"] == 3
    assert len((out / "responses.jsonl").read_text().splitlines()) == 5 * 5
    assert "gate feature: threshold" in capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert "## Gate" in summary and "chosen on validation prompts: TPR" in summary
    assert "- add x2 gated: opened on" in summary


def gated_eval_args(sae_dir, gate: dict, unsafe: str, out) -> list[str]:
    """eval-refusal adding feature 3 at strength 2 under ``gate``, on ``unsafe`` and two
    harmless prompts."""
    args = ["eval-refusal", "--sae", str(sae_dir), "--features", "[3]", "--op", "add"]
    args += ["--strength_unit", "absolute", "--strengths", "[2]", "--gate", json.dumps(gate)]
    args += ["--unsafe", f"[{unsafe}]", "--safe", '[{"path": "builtin:harmless", "limit": 2}]']
    return [*args, "--out_dir", str(out), "--overwrite", "true", *FAST]  # reruns replace it


def no_generation(monkeypatch):
    """Make any reply generation fail the test."""
    import saetrain.evals.refusal as refusal_module

    def fail(*a, **k):
        raise AssertionError("generation started")

    monkeypatch.setattr(refusal_module, "generate", fail)


def test_a_probe_gate_never_trains_or_calibrates_on_an_evaluated_prompt(
    sae_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "eval"
    gate = {
        "kind": "probe",
        "pool": "last",
        "train_positive": [{"path": "builtin:harmful", "limit": 6}],
        "train_negative": [{"path": "builtin:borderline-safe", "seed": 0, "limit": 6}],
        "val_positive": [{"path": "builtin:harmful", "limit": 8}],
        "val_negative": [{"path": "builtin:borderline-safe", "seed": 0, "offset": 6, "limit": 4}],
        "cross_fit_positive": [],
        "cross_fit_negative": [],
        "compare_ungated": False,
    }
    evaluated = {"path": "builtin:harmful", "limit": 2}
    args = gated_eval_args(sae_dir, gate, json.dumps(evaluated), out)
    # The two evaluated prompts are among the gate's: one line, before any reply.
    with monkeypatch.context() as m:
        no_generation(m)
        assert main(args) == 2
    line = error_line(capsys)
    assert "evaluated set harmful shares 2 of its 2 prompts with the fitting set harmful " in line
    assert "(gate.train_positive), e.g. " in line
    assert "add {path: builtin:harmful, limit: 2} to the exclude of harmful in gate.train" in line
    assert not out.exists()
    # Excluded from the gate's lists, they are never trained or calibrated on.
    gate["train_positive"][0]["exclude"] = [evaluated]
    gate["val_positive"][0]["exclude"] = [evaluated]
    args[args.index("--gate") + 1] = json.dumps(gate)
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["gate"]["n_positive"] == 8 and results["gate"]["n_negative"] == 4
    assert {r["setting"] for r in results["rows"]} == {"baseline", "add x2 gated"}
    fitting = json.loads((out / "fitting.json").read_text())["fitted"]
    asked = {json.loads(line)["prompt"] for line in (out / "responses.jsonl").open()}
    for role in ("gate.train_positive", "gate.val_positive"):
        assert not asked & set(fitting[role][0]["prompts"]), role


def test_a_cross_fitted_probe_gate_chooses_its_threshold_on_out_of_fold_scores(
    sae_dir, tmp_path, capsys
):
    out = tmp_path / "eval"
    gate = {
        "kind": "probe",
        "train_positive": [{"path": "builtin:harmful", "limit": 4}],
        # the evaluated harmless prompts are the first two (gated_eval_args)
        "train_negative": [{"path": "builtin:harmless", "offset": 2, "limit": 4}],
        "val_positive": [],
        "val_negative": [],
        "cross_fit_positive": [{"path": "builtin:terse-unsafe", "seed": 0, "limit": 6}],
        "cross_fit_negative": [{"path": "builtin:terse-safe", "seed": 0, "limit": 6}],
        "folds": 3,
        "compare_ungated": False,
    }
    # the first terse-unsafe prompt would be evaluated and cross-fitted: refused
    unsafe = '{"path": "builtin:terse-unsafe", "seed": 0, "limit": 1}'
    args = gated_eval_args(sae_dir, gate, unsafe, out)
    assert main(args) == 2
    line = error_line(capsys)
    assert "shares 1 of its 1 prompts with the fitting set terse-unsafe (gate.cross_fit_pos" in line
    # one after the cross-fitted ones is not
    after = {"path": "builtin:terse-unsafe", "seed": 0, "offset": 6, "limit": 1}
    args[args.index("--unsafe") + 1] = json.dumps([after])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "gate probe, 3-fold cross-fitted: threshold" in printed
    g = json.loads((out / "results.json").read_text())["gate"]
    assert (g["n_positive"], g["n_negative"], g["cross_fit_folds"]) == (6, 6, 3)
    # A fixed threshold: the pairs still train the probe, nothing is chosen.
    args[args.index("--gate") + 1] = json.dumps({**gate, "threshold": 0.5})
    assert main(args) == 0
    g = json.loads((out / "results.json").read_text())["gate"]
    assert g == {"threshold": 0.5, "chosen_on_validation": False}
    gate["folds"] = 1
    args[args.index("--gate") + 1] = json.dumps(gate)
    assert main(args) == 2
    assert "gate.folds must be at least 2 to cross-fit, got 1" in error_line(capsys)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_steering_config_parses(config, capsys):
    command = config.stem
    assert main([command, "--config", str(config), "--print_config"]) == 0
    assert "sae:" in capsys.readouterr().out
    assert config.read_text().startswith("#"), "a config starts with a comment giving its command"


def test_the_saved_config_holds_every_default_and_reads_back(tmp_path, capsys):
    # A gate given in part takes the rest from GateConfig's defaults, prompt sets included: the
    # YAML written beside the results (and printed by --print_config) holds them all and
    # --config reads it back to the same config.
    argv = ["--sae", "s", "--gate", '{"kind": "probe", "folds": 3}']
    cfg, text = parse_config(EvalRefusalConfig, argv, "eval-refusal")
    assert "Unable" not in text and "builtin:terse-unsafe" in text
    (tmp_path / "c.yaml").write_text(text)
    again, _ = parse_config(EvalRefusalConfig, ["--config", str(tmp_path / "c.yaml")], "x")
    assert again == cfg and again.gate.folds == 3
    assert isinstance(again.gate.cross_fit_positive[0], PromptSet)
    assert main(["eval-refusal", *argv, "--print_config"]) == 0
    assert capsys.readouterr().out == text


def test_a_missing_sae_is_one_line_and_exit_status_2(tmp_path, capsys):
    assert main(["steer", "--sae", str(tmp_path / "nope"), "--features", "[1]"]) == 2
    assert "nope" in error_line(capsys)


def test_a_feature_outside_the_sae_is_one_line_before_the_lm_loads(sae_dir, capsys, monkeypatch):
    import saetrain.data.lm as lm

    def no_lm(*a, **k):
        raise AssertionError("the LM was loaded")

    monkeypatch.setattr(lm, "load_lm", no_lm)
    args = ["steer", "--sae", str(sae_dir), "--features", "[999]"]  # the default strength unit
    assert main([*args, *FAST]) == 2
    assert "features [999] do not exist: the SAE has 64 latents" in error_line(capsys)


def no_lm(monkeypatch):
    """Make loading an LM fail the test."""
    import saetrain.data.lm as lm

    def fail(*a, **k):
        raise AssertionError("the LM was loaded")

    monkeypatch.setattr(lm, "load_lm", fail)


def small_eval_args(sae_dir, out) -> list[str]:
    """eval-refusal of the baseline and feature 3 added at strength 2, on three prompts."""
    args = ["eval-refusal", "--sae", str(sae_dir), "--features", "[3]", "--op", "add"]
    args += ["--strength_unit", "absolute", "--strengths", "[2]", "--fluency_loss", "false"]
    args += ["--unsafe", '[{"path": "builtin:harmful", "limit": 2}]']
    args += ["--safe", '[{"path": "builtin:harmless", "limit": 1}]', "--out_dir", str(out)]
    return [*args, *FAST]


def test_eval_refusal_replaces_earlier_results_only_when_told_and_then_whole(
    sae_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "eval"
    args = small_eval_args(sae_dir, out)
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"results.json", "responses.jsonl", "config.yaml"} <= set(before)
    with monkeypatch.context() as m:  # refused in one line, before the LM loads
        no_lm(m)
        assert main(args) == 2
    line = error_line(capsys)
    assert f"{out} already exists and is not empty: choose another --out_dir or pass " in line
    assert "--overwrite true to replace it" in line
    # Interrupted while writing its report: the earlier results stay whole, nothing half-written.
    import saetrain.evals.tradeoff as tradeoff

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tradeoff, "write_tradeoff_report", interrupted)
        assert main([*args, "--overwrite", "true"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # no temporary folder left
    # Replaced: the new results, and nothing left of the earlier run.
    (out / "notes.txt").write_text("from the earlier run")
    assert main([*args, "--strengths", "[4]", "--overwrite", "true"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["setting"] for r in results["rows"]} == {"baseline", "add x4"}
    assert not (out / "notes.txt").exists() and (out / "responses.jsonl").is_file()
    assert "overwrite: true" in (out / "config.yaml").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]


def test_features_refuses_a_used_out_dir_and_one_holding_its_sae_before_the_lm_loads(
    sae_dir, tmp_path, capsys, monkeypatch
):
    no_lm(monkeypatch)
    out = tmp_path / "features"
    out.mkdir()
    (out / "features.json").write_text("{}")
    args = ["features", "--sae", str(sae_dir), *FAST]
    assert main([*args, "--out_dir", str(out)]) == 2
    assert f"{out} already exists and is not empty: choose another --out_dir" in error_line(capsys)
    # --overwrite true would delete the SAE it reads with the folder that holds it: refused
    assert main([*args, "--out_dir", str(sae_dir.parent), "--overwrite", "true"]) == 2
    assert f"holds {sae_dir}, which --overwrite true would delete" in error_line(capsys)
    assert (out / "features.json").read_text() == "{}" and (sae_dir / "cfg.json").is_file()


def test_an_arm_feature_outside_the_sae_is_one_line_before_the_lm_loads(
    sae_dir, tmp_path, capsys, monkeypatch
):
    no_lm(monkeypatch)
    args = small_eval_args(sae_dir, tmp_path / "eval")
    args += ["--arms", '[{"kind": "none"}, {"kind": "sae_clamp", "features": [64]}]']
    assert main(args) == 2
    assert "arm sae_clamp: features [64] do not exist: the SAE has 64 latents" in error_line(capsys)


def test_a_corrupt_features_table_is_one_line_naming_it(sae_dir, tmp_path, capsys):
    table = tmp_path / "features.json"
    table.write_text('{"methods": {"response": {"rows": [')
    args = ["steer", "--sae", str(sae_dir), "--features", "[3]", "--features_table", str(table)]
    args += ["--strength_unit", "max_activation", *FAST]
    assert main(args) == 2
    assert f"features_table {table} is not valid JSON (Expecting value" in error_line(capsys)
    table.write_text('{"rows": []}')
    assert main(args) == 2
    assert f"features_table {table} has no methods with rows of feature" in error_line(capsys)


def test_a_bad_option_value_is_one_line_and_exit_status_2(capsys):
    assert main(["eval-refusal", "--sae", "x", "--unsafe", '[{"path": "a.csv", "limit": 0}]']) == 2
    assert "limit" in error_line(capsys)
