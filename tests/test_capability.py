"""Capability under steering (issue #5): local MMLU / GSM8K / TruthfulQA files become lm-eval
tasks, lm-eval scores them on a tiny steered model, ``eval-capability`` writes its files, and the
training callback logs the loss recovered without changing training."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from lmfixtures import error_line

from saetrain import SAE
from saetrain.cli import main
from saetrain.data.lm import decoder_layers, load_lm
from saetrain.steering import FeatureGate, Intervention
from saetrain.steering.capability import evaluate_capability, interval
from saetrain.steering.evaluate import Setting
from saetrain.steering.tasks import (
    CapabilityData,
    gsm8k_rows,
    mmlu_rows,
    resolve_tasks,
    truthfulqa_rows,
)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["mmlu", "gsm8k", "truthfulqa_mc1", "truthfulqa_mc2"]
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval (pip install saetrain[eval])"
)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> CapabilityData:
    """Tiny files in the three formats of ../shared/data/capability."""
    root = tmp_path_factory.mktemp("capability")
    head = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
    for subject in ("anatomy", "world_religions"):
        for split, n in (("test", 4), ("dev", 2)):
            rows = [
                [f"{subject} {split} q{i}?", "red", "blue", "sun", "sky", i % 4] for i in range(n)
            ]
            _csv(root / "mmlu" / split / f"{subject}_{split}.csv", head, rows)
    with (root / "gsm8k.jsonl").open("w") as f:
        for i in range(6):
            f.write(
                json.dumps({"question": f"{i} plus 2?", "answer": f"{i}+2\n#### {i + 2}"}) + "\n"
            )
    head = ["Type", "Question", "Best Answer", "Correct Answers", "Incorrect Answers"]
    rows = [
        [
            "A",
            f"Is the sky blue {i}?",
            "Yes",
            "Yes; Mostly",
            "No; It is red",
        ]
        for i in range(4)
    ]
    _csv(root / "truthfulqa.csv", head, rows)
    return CapabilityData(
        mmlu=str(root / "mmlu"),
        gsm8k=str(root / "gsm8k.jsonl"),
        truthfulqa=str(root / "truthfulqa.csv"),
    )


def test_local_files_become_tasks_with_same_subject_shots_and_held_out_gsm8k_examples(data):
    mmlu = mmlu_rows(data.mmlu, shots=2)
    assert len(mmlu) == 8 and {r["subject"] for r in mmlu} == {"anatomy", "world_religions"}
    row = next(r for r in mmlu if r["subject"] == "world_religions")
    assert row["fewshot"].startswith(
        "The following are multiple choice questions (with answers) about world religions."
    )
    assert (
        "world_religions dev q1?\nA. red\nB. blue\nC. sun\nD. sky\nAnswer: B\n\n" in row["fewshot"]
    )
    assert "anatomy" not in row["fewshot"]
    tqa = truthfulqa_rows(data.truthfulqa)[0]
    assert tqa["mc1_targets"] == {"choices": ["Yes", "No", "It is red"], "labels": [1, 0, 0]}
    assert tqa["mc2_targets"]["labels"] == [1, 1, 0, 0]
    assert len(gsm8k_rows(data.gsm8k)) == 6


def test_limit_samples_questions_and_gsm8k_shots_are_never_evaluated(data, tmp_path):
    tasks = resolve_tasks(TASKS, data, tmp_path, limit={"gsm8k": 3, "mmlu": 5}, gsm8k_shots=2)
    assert [t.lm_eval_name for t in tasks] == [f"saetrain_{t}" for t in TASKS]
    assert [t.limit for t in tasks] == [5, 3, None, None]
    read = lambda name: [json.loads(x) for x in (tmp_path / "data" / name).read_text().splitlines()]  # noqa: E731
    test, shots = read("gsm8k_test.jsonl"), read("gsm8k_fewshot.jsonl")
    assert len(test) == 3 and [s["question"] for s in shots] == ["4 plus 2?", "5 plus 2?"]
    assert not {r["question"] for r in test} & {s["question"] for s in shots}
    mmlu = read("mmlu_test.jsonl")
    assert len(mmlu) == 5 and {r["subject"] for r in mmlu} == {"anatomy", "world_religions"}
    assert len(read("truthfulqa.jsonl")) == 4


def test_intervals_are_wilson_for_accuracies_and_normal_for_scores():
    mean, lo, hi, kind = interval([1.0, 0.0, 1.0, 1.0])
    assert (mean, kind) == (0.75, "wilson") and 0.2 < lo < 0.75 < hi < 1.0
    mean, lo, hi, kind = interval([0.2, 0.4, 0.6])
    assert kind == "normal" and mean == pytest.approx(0.4)
    assert (lo, hi) == pytest.approx((0.4 - 1.96 * 0.2 / 3**0.5, 0.4 + 1.96 * 0.2 / 3**0.5))


@pytest.fixture(scope="module")
def steered_run(tiny_model_dir, sae_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cap")
    model, tok = load_lm(str(tiny_model_dir))
    sae = SAE.load(sae_dir)
    ids = torch.tensor([[256, 40, 50, 60, 70]])
    before = model(ids).logits
    kw = dict(limit=3, mmlu_shots=1, gsm8k_shots=1, max_gen_toks=4)
    tasks = resolve_tasks(TASKS, data, out / "tasks", **kw)
    ivs = [Intervention([3, 5], "add", 8.0)]
    settings = [
        Setting("baseline"),
        Setting("add x8", ivs, strength=8),
        # Gates that open on every request and on none: steered and baseline, exactly.
        Setting("open gate", ivs, FeatureGate(sae, 3, threshold=-math.inf), 8, "gated"),
        Setting("shut gate", ivs, FeatureGate(sae, 3, threshold=math.inf), 8, "gated"),
    ]
    rows = evaluate_capability(
        model,
        tok,
        sae,
        settings,
        tasks,
        task_dir=out / "tasks",
        layer=1,
        batch_size=4,
        samples_path=out / "samples.jsonl",
        fluency_pairs=[("hi", "hello there")],
    )
    return model, ids, before, rows, out


@needs_lm_eval
def test_lm_eval_scores_local_tasks_under_steering_within_range(steered_run):
    _, _, _, rows, _ = steered_run
    settings = ("baseline", "add x8", "open gate", "shut gate")
    assert [(r["setting"], r["task"]) for r in rows] == [(s, t) for s in settings for t in TASKS]
    for r in rows:
        assert r["n"] == 3 and 0 <= r["ci_low"] <= r["value"] <= r["ci_high"] <= 1
    kinds = {r["task"]: r["interval"] for r in rows}
    assert kinds == {
        "mmlu": "wilson",
        "gsm8k": "wilson",
        "truthfulqa_mc1": "wilson",
        "truthfulqa_mc2": "normal",
    }
    loss = {r["setting"]: r["loss_delta"] for r in rows}
    assert loss["baseline"] == loss["shut gate"] == 0 and loss["add x8"] == loss["open gate"] != 0
    opened = {r["setting"]: r["gate_open_rate"] for r in rows}
    assert opened == {"baseline": None, "add x8": None, "open gate": 1.0, "shut gate": 0.0}


@needs_lm_eval
def test_steering_changes_loglikelihoods_and_its_hooks_are_gone_afterwards(steered_run):
    model, ids, before, _, out = steered_run
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    mmlu = [x for x in lines if x["task"] == "saetrain_mmlu"]
    ll = {(x["setting"], x["doc_id"]): [c[0] for c in x["filtered_resps"]] for x in mmlu}
    assert len(ll) == 12 and all(ll["baseline", i] != ll["add x8", i] for i in range(3))
    assert all(ll["open gate", i] == ll["add x8", i] for i in range(3))
    assert all(ll["shut gate", i] == ll["baseline", i] for i in range(3))
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not any(block._forward_hooks for block in decoder_layers(model))
    torch.testing.assert_close(model(ids).logits, before)


@needs_lm_eval
def test_eval_capability_cli_writes_results_summary_and_the_tradeoff_plot(
    sae_dir, data, tmp_path, capsys
):
    refusal = tmp_path / "refusal.json"
    row = dict(category="all", kind="unsafe", loss_delta=None, set="x", series="steered")
    rows = [
        {**row, "setting": s, "refusal_rate": r, "baseline": s == "baseline", "strength": None}
        for s, r in (("baseline", 0.2), ("add x6", 0.9))
    ]
    refusal.write_text(json.dumps({"rows": rows}))
    out = tmp_path / "cap"
    args = ["eval-capability", "--sae", str(sae_dir), "--features", "[3]", "--op", "add"]
    args += [
        "--strength_unit",
        "absolute",
        "--strengths",
        "[6]",
        "--tasks",
        "[mmlu, truthfulqa_mc1]",
    ]
    args += ["--data.mmlu", data.mmlu, "--data.truthfulqa", data.truthfulqa, "--limit", "2"]
    args += ["--mmlu_shots", "1", "--batch_size", "4", "--refusal_results", str(refusal)]
    assert main([*args, "--out_dir", str(out)]) == 0
    names = {
        "results.json",
        "capability.json",
        "summary.md",
        "samples.jsonl",
        "config.yaml",
        "tradeoff.png",
    }
    assert names <= {p.name for p in out.iterdir()}
    scores = json.loads((out / "capability.json").read_text())
    assert set(scores) == {"baseline", "add x6"} and all(0 <= v <= 1 for v in scores.values())
    # written in a temporary folder renamed to out: the tasks' data paths point into out
    task = (out / "tasks" / "saetrain_mmlu.yaml").read_text()
    assert str(out.resolve() / "tasks" / "data") in task and ".tmp-" not in task
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap", "refusal.json"]
    assert "| add x6 |" in capsys.readouterr().out
    # With a gate: gated rows, the gate's own rates on its validation prompts, its open rate.
    gate = {
        "kind": "probe",
        "train_positive": [{"path": "builtin:harmful", "limit": 6}],
        "train_negative": [{"path": "builtin:harmless", "limit": 6}],
        "val_positive": [{"path": "builtin:harmful", "offset": 6, "limit": 4}],
        "val_negative": [{"path": "builtin:harmless", "offset": 6, "limit": 4}],
        "cross_fit_positive": [],
        "cross_fit_negative": [],
    }
    gated = tmp_path / "gated"
    args += ["--gate", json.dumps(gate), "--out_dir", str(gated)]
    assert main(args) == 0
    scores = json.loads((gated / "capability.json").read_text())
    assert set(scores) == {"baseline", "add x6", "add x6 gated"}
    assert json.loads((gated / "gate.json").read_text())["n_positive"] == 4
    rows = json.loads((gated / "results.json").read_text())["rows"]
    assert all(0 <= r["gate_open_rate"] <= 1 for r in rows if r["setting"] == "add x6 gated")
    assert "gate open" in (gated / "summary.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--data.gsm8k", "/nonexistent/gsm8k.jsonl", "--tasks", "[gsm8k]"],
            "gsm8k data /nonexistent/gsm8k.jsonl does not exist",
        ),
        (
            ["--tasks", "[mmlu]", "--data.mmlu", "BAD", "--mmlu_shots", "0"],
            "lacks the mmlu columns ['choice3']",
        ),
        pytest.param(
            ["--tasks", "[no_such_task]"], "unknown task 'no_such_task'", marks=needs_lm_eval
        ),
        (["--positions", "generated"], "positions must be all for eval-capability"),
    ],
)
def test_bad_capability_input_gives_one_clear_line(extra, message, sae_dir, tmp_path, capsys):
    if "BAD" in extra:
        _csv(
            tmp_path / "bad" / "test" / "x_test.csv",
            ["question", "choice0", "choice1", "choice2", "answer"],
            [],
        )
        extra = [str(tmp_path / "bad") if e == "BAD" else e for e in extra]
    out = str(tmp_path / "out")
    assert main(["eval-capability", "--sae", str(sae_dir), "--out_dir", out, *extra]) == 2
    assert message in error_line(capsys)


def test_eval_capability_refuses_a_used_out_dir_before_the_tasks_and_the_lm(
    sae_dir, tmp_path, capsys, monkeypatch
):
    import saetrain.data.lm as lm
    import saetrain.steering.capability as capability

    def fail(*a, **k):
        raise AssertionError("the tasks or the LM were loaded")

    monkeypatch.setattr(lm, "load_lm", fail)
    monkeypatch.setattr(capability, "resolve_tasks", fail)
    (tmp_path / "cap").mkdir()
    (tmp_path / "cap" / "results.json").write_text("{}")
    args = ["eval-capability", "--sae", str(sae_dir), "--out_dir", str(tmp_path / "cap")]
    assert main(args) == 2
    assert "cap already exists and is not empty: choose another --out_dir or pass " in (
        error_line(capsys)
    )
    assert (tmp_path / "cap" / "results.json").read_text() == "{}"


CALLBACK = """
trainer:
  max_steps: 5
  callbacks:
    - class_path: saetrain.steering.callback.SteeringEvalCallback
      init_args:
        every_n_steps: 5
        sequences: 2
        features: [3]
        op: add
        strength: 8.0
        unsafe: {path: "builtin:harmful", limit: 2}
        max_new_tokens: 3
"""


def test_the_callback_logs_loss_recovered_and_leaves_the_trained_weights_unchanged(
    tiny_model_dir, chat_jsonl, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "cb.yaml").write_text(CALLBACK)
    args = [
        "fit",
        "--config",
        str(ROOT / "recipes" / "tiny.yaml"),
        "--data.model",
        str(tiny_model_dir),
    ]
    args += ["--data.source.path", str(chat_jsonl), "--trainer.max_steps", "5"]
    assert main([*args, "--out_dir", str(tmp_path / "plain")]) == 0
    assert (
        main([*args, "--config", str(tmp_path / "cb.yaml"), "--out_dir", str(tmp_path / "cb")]) == 0
    )
    plain = (tmp_path / "plain" / "tiny" / "sae.safetensors").read_bytes()
    assert (tmp_path / "cb" / "tiny" / "sae.safetensors").read_bytes() == plain
    events = EventAccumulator(str(tmp_path / "cb" / "tiny"))
    events.Reload()
    scalars = {t: [e.value for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    assert len(scalars["lm/loss_recovered"]) == 1 and scalars["lm/loss_clean"][0] > 0
    assert scalars["lm/loss_zero_ablation"][0] != scalars["lm/loss_spliced"][0]
    assert scalars["lm/kl"][0] > 0 and "lm/loss_mean_ablation" in scalars
    assert (
        0 <= scalars["steering/refusal_unsafe"][0] <= 1
        and "steering/refusal_unsafe_baseline" in scalars
    )
