"""Capability tasks for lm-evaluation-harness from local files, so ``eval-capability`` runs
without the Hugging Face Hub: MMLU, GSM8K and TruthfulQA MC1/MC2.

    data = CapabilityData(mmlu="../shared/data/capability/mmlu", gsm8k=".../gsm8k_test.jsonl")
    tasks = resolve_tasks(["mmlu", "gsm8k", "hellaswag"], data, "out/tasks", limit={"mmlu": 20})
    # mmlu, gsm8k -> saetrain_mmlu, saetrain_gsm8k (local); hellaswag -> lm-eval's (Hub)

Each local task is a YAML config plus JSONL data written into ``task_dir``; rerun one with
``lm_eval --include_path out/tasks --tasks saetrain_mmlu ...``. Input formats:

| task | file | columns |
|---|---|---|
| mmlu | folder with ``test/*_test.csv`` and ``dev/*_dev.csv`` | question, choice0..choice3, answer (0-3 or A-D) |
| gsm8k | JSONL | question, answer (the solution, ending in ``#### N``) |
| truthfulqa_mc1/mc2 | CSV | Question, Best Answer, Correct Answers, Incorrect Answers (``;``) |

Prompts, choices, filters and metrics copy lm-eval's own tasks (``mmlu/default``,
``gsm8k/gsm8k.yaml``, ``truthfulqa/truthfulqa_mc{1,2}.yaml``). Where they differ: MMLU is one
task over all subjects whose ``limit`` questions are a seeded sample across subjects, each with
its subject's description and first ``mmlu_shots`` dev questions (lm-eval's 5-shot layout);
GSM8K's few-shot examples are the file's last ``gsm8k_shots`` rows, never evaluated (lm-eval
draws them from the train split); TruthfulQA's MC1 choices are the best answer and the
incorrect ones, MC2's the correct and incorrect ones, as the CSV gives them (the Hub's
``multiple_choice`` config has hand-made MC1 sets, so scores differ slightly).
"""  # noqa: E501

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import UserError

LOCAL_TASKS = {"mmlu": "mmlu", "gsm8k": "gsm8k", "truthfulqa_mc1": "truthfulqa"}
LOCAL_TASKS["truthfulqa_mc2"] = "truthfulqa"
"""Task names that can run from local files, and the CapabilityData field each reads."""
HEADLINE = {"mmlu": "acc,none", "gsm8k": "exact_match,flexible-extract"}
HEADLINE |= {"truthfulqa_mc1": "acc,none", "truthfulqa_mc2": "acc,none"}
"""The metric reported for each known task (other lm-eval tasks: their first metric)."""

MMLU_COLUMNS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
TRUTHFULQA_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
# TruthfulQA's fixed six-shot QA preamble, as in lm-eval's truthfulqa_mc1.yaml.
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)
MC2_RESULTS = "lm_eval.tasks.truthfulqa.utils.process_results_mc2"


@dataclass
class CapabilityData:
    """Local copies of the capability data; a task whose file is not given comes from the Hub."""

    mmlu: str | None = None
    """Folder with test/*_test.csv and dev/*_dev.csv (question, choice0..choice3, answer 0-3)."""
    gsm8k: str | None = None
    """JSONL of question and answer (the worked solution ending in '#### N')."""
    truthfulqa: str | None = None
    """CSV with Question, Best Answer, Correct Answers, Incorrect Answers (';'-separated)."""


@dataclass
class CapabilityTask:
    """One requested task and where lm-eval finds it."""

    name: str
    """The name asked for (mmlu, gsm8k, ... or any lm-eval task)."""
    lm_eval_name: str
    """The name lm-eval knows it by (saetrain_mmlu for a local task)."""
    source: str
    """The local file or folder it was built from, or 'hub'."""
    metric: str | None
    """The reported metric, as lm-eval names it ('acc,none'); None: the task's first."""
    limit: int | None = None
    """At most this many questions (already applied to a local task's file); None: all."""


def _read_csv(path: Path, columns: tuple[str, ...], what: str) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(
                f"{path} lacks the {what} columns {missing}: expected a header row with "
                f"{', '.join(columns)}"
            )
        return list(reader)


def _existing(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"the {what} data {path} does not exist: fix data.{what}, or set it to null to use "
            "the Hub"
        )
    return p


def _mmlu_text(row: dict) -> str:
    choices = "".join(f"\n{'ABCD'[i]}. {row[f'choice{i}']}" for i in range(4))
    return f"{row['question'].strip()}{choices}\nAnswer:"


def _answer(row: dict, path: Path) -> int:
    """The right choice's index, from 0-3 or A-D."""
    text = str(row["answer"]).strip()
    answer = "ABCD".index(text) if text in ("A", "B", "C", "D") else -1
    if text.isdigit():
        answer = int(text)
    if not 0 <= answer <= 3:
        raise UserError(f"{path}: answer must be a choice index 0-3 (or A-D), got {text!r}")
    return answer


def mmlu_rows(folder: str, shots: int) -> list[dict]:
    """MMLU test questions of every subject, each with its few-shot prefix (see the module)."""
    root = _existing(folder, "mmlu")
    tests = sorted((root / "test").glob("*.csv"))
    if not tests:
        raise UserError(
            f"no MMLU test files in {root}/test: expected <subject>_test.csv files with "
            f"columns {', '.join(MMLU_COLUMNS)}"
        )
    rows = []
    for path in tests:
        subject = path.stem.removesuffix("_test")
        dev = root / "dev" / f"{subject}_dev.csv"
        if shots and not dev.exists():
            raise UserError(f"{dev} is missing: MMLU few-shot needs it, or set mmlu_shots: 0")
        shot_rows = _read_csv(dev, MMLU_COLUMNS, "mmlu")[:shots] if shots else []
        about = subject.replace("_", " ")
        prefix = f"The following are multiple choice questions (with answers) about {about}.\n\n"
        prefix += "".join(f"{_mmlu_text(r)} {'ABCD'[_answer(r, dev)]}\n\n" for r in shot_rows)
        for r in _read_csv(path, MMLU_COLUMNS, "mmlu"):
            rows.append(
                {
                    "question": r["question"],
                    "choices": [r[f"choice{i}"] for i in range(4)],
                    "answer": _answer(r, path),
                    "subject": subject,
                    "fewshot": prefix,
                }
            )
    return rows


def gsm8k_rows(path: str) -> list[dict]:
    """GSM8K problems ``{question, answer}`` in file order."""
    p = _existing(path, "gsm8k")
    rows = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p} line {i} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "#### " not in str(row.get("answer", "")):
                raise UserError(
                    f"{p} line {i}: expected {{question, answer}} with the answer ending in "
                    "'#### N' (the GSM8K format)"
                )
            rows.append({"question": row["question"], "answer": row["answer"]})
    return rows


def _split(text: str) -> list[str]:
    return list(dict.fromkeys(a.strip() for a in text.split(";") if a.strip()))


def truthfulqa_rows(path: str) -> list[dict]:
    """TruthfulQA questions with MC1 and MC2 targets built from the CSV (see the module)."""
    p = _existing(path, "truthfulqa")
    rows = []
    for r in _read_csv(p, TRUTHFULQA_COLUMNS, "truthfulqa"):
        best, correct = r["Best Answer"].strip(), _split(r["Correct Answers"])
        incorrect = _split(r["Incorrect Answers"])
        if not best or not incorrect:
            continue  # not a multiple-choice question without a right and a wrong answer
        correct = correct if best in correct else [best, *correct]
        rows.append(
            {
                "question": r["Question"].strip(),
                "mc1_targets": {
                    "choices": [best, *incorrect],
                    "labels": [1] + [0] * len(incorrect),
                },
                "mc2_targets": {
                    "choices": correct + incorrect,
                    "labels": [1] * len(correct) + [0] * len(incorrect),
                },
            }
        )
    return rows


def _sample(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:limit] if limit is not None else rows


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path.resolve())


def _write_task(task_dir: Path, config: dict, extra: str = "") -> None:
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)
    (task_dir / f"{config['task']}.yaml").write_text(text + extra, encoding="utf-8")


def _mc_config(name: str, files: dict, split: str) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "output_type": "multiple_choice",
        "test_split": split,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_mmlu(task_dir: Path, folder: str, *, limit, seed: int, shots: int) -> str:
    rows = _sample(mmlu_rows(folder, shots), limit, seed)
    test = _write_jsonl(task_dir / "data" / "mmlu_test.jsonl", rows)
    config = _mc_config("saetrain_mmlu", {"test": test}, "test")
    config |= {
        "num_fewshot": 0,  # the few-shot examples are in each row's `fewshot` prefix
        "doc_to_text": "{{fewshot}}{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}"
        "\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer",
    }
    _write_task(task_dir, config)
    return config["task"]


def write_gsm8k(
    task_dir: Path, path: str, *, limit, seed: int, shots: int, max_gen_toks: int
) -> str:
    rows = gsm8k_rows(path)
    if len(rows) <= shots:
        raise UserError(f"{path} has {len(rows)} problems: it needs more than gsm8k_shots={shots}")
    shot_rows, rows = (rows[-shots:], rows[:-shots]) if shots else ([], rows)
    test = _write_jsonl(task_dir / "data" / "gsm8k_test.jsonl", _sample(rows, limit, seed))
    files = {"test": test}
    if shots:
        files["train"] = _write_jsonl(task_dir / "data" / "gsm8k_fewshot.jsonl", shot_rows)
    config = {
        "task": "saetrain_gsm8k",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "output_type": "generate_until",
        "test_split": "test",
        "fewshot_split": "train" if shots else None,
        "num_fewshot": shots,
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
            }
        ],
        "generation_kwargs": {
            "until": ["Question:", "</s>", "<|im_end|>"],
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": max_gen_toks,
        },
        "filter_list": [
            {
                "name": "strict-match",
                "filter": [
                    {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                    {"function": "take_first"},
                ],
            },
            {
                "name": "flexible-extract",
                "filter": [
                    {
                        "function": "regex",
                        "group_select": -1,
                        "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)",
                    },
                    {"function": "take_first"},
                ],
            },
        ],
        "metadata": {"version": 3.0},
    }
    _write_task(task_dir, config)
    return config["task"]


def write_truthfulqa(task_dir: Path, path: str, which: str, *, limit, seed: int) -> str:
    rows = _sample(truthfulqa_rows(path), limit, seed)
    test = _write_jsonl(task_dir / "data" / "truthfulqa.jsonl", rows)
    config = _mc_config(f"saetrain_truthfulqa_{which}", {"validation": test}, "validation")
    config |= {
        "num_fewshot": 0,
        "doc_to_text": TRUTHFULQA_PREAMBLE + "\n\nQ: {{question}}\nA:",
        "doc_to_target": 0,
        "doc_to_choice": f"{{{{{which}_targets.choices}}}}",
    }
    # MC2 scores the probability mass on the true answers with lm-eval's own function.
    extra = f"process_results: !function {MC2_RESULTS}\n" if which == "mc2" else ""
    _write_task(task_dir, config, extra)
    return config["task"]


def resolve_tasks(
    names: list[str],
    data: CapabilityData,
    task_dir: str | Path,
    *,
    limit: int | dict[str, int] | None = None,
    seed: int = 0,
    mmlu_shots: int = 5,
    gsm8k_shots: int = 5,
    max_gen_toks: int = 256,
) -> list[CapabilityTask]:
    """Write the local tasks of ``names`` into ``task_dir``; the others are lm-eval's (Hub).

    ``limit`` caps the questions of every task, or of the tasks a dict names (others: all).
    """
    if not names:
        raise UserError("tasks is empty: name at least one, e.g. [mmlu, gsm8k, truthfulqa_mc1]")
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    for old in task_dir.glob("*.yaml"):
        old.unlink()  # a task left from an earlier run must not be picked up
    tasks = []
    for name in dict.fromkeys(names):
        source = getattr(data, LOCAL_TASKS.get(name, "_"), None)
        cap = limit.get(name) if isinstance(limit, dict) else limit
        kw = dict(limit=cap, seed=seed)
        if source is None:
            tasks.append(CapabilityTask(name, name, "hub", HEADLINE.get(name), cap))
            continue
        if name == "mmlu":
            lm_name = write_mmlu(task_dir, source, shots=mmlu_shots, **kw)
        elif name == "gsm8k":
            lm_name = write_gsm8k(
                task_dir, source, shots=gsm8k_shots, max_gen_toks=max_gen_toks, **kw
            )
        else:
            lm_name = write_truthfulqa(task_dir, source, name.rsplit("_", 1)[1], **kw)
        tasks.append(CapabilityTask(name, lm_name, str(source), HEADLINE[name], cap))
    return tasks
