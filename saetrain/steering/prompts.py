"""Prompt sets for refusal evaluation and feature search: one loader for the usual files.

    records = load_prompts(PromptSet("../shared/data/refusal/xstest_prompts.csv", label="safe"))

Reads CSV (XSTest, AdvBench, JailbreakBench, HarmBench), JSON (a list of strings or of
objects, like refusal_direction's ``{instruction, category}``), JSONL, Parquet (WildGuardTest),
a Hugging Face dataset id (``allenai/wildguardmix`` with ``subset: wildguardtest``), and the
built-in sets ``builtin:harmful`` / ``builtin:harmless`` and the gate's paired sets
``builtin:borderline-safe`` / ``-unsafe`` and ``builtin:terse-safe`` / ``-unsafe`` (see
:mod:`.borderline`). Columns are found by name unless mapped explicitly:

| field    | tried in order (first present wins)                                     |
|----------|-------------------------------------------------------------------------|
| prompt   | prompt, instruction, goal, Goal, Behavior, behavior, question, text     |
| category | category, Category, type, SemanticCategory, subcategory                 |
| label    | label, prompt_harm_label                                                |
| turns    | turns, messages, conversation, conversations                            |

A record with turns is a multi-turn conversation: a list of user messages (strings), or chat
messages of which the user turns are kept; the model answers each in turn and its last reply
is judged. HarmBench's contextual behaviours get their ``ContextString`` before the request.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import borderline, builtin

PROMPT_COLUMNS = (
    "prompt",
    "instruction",
    "goal",
    "Goal",
    "Behavior",
    "behavior",
    "question",
    "text",
)
CATEGORY_COLUMNS = ("category", "Category", "type", "SemanticCategory", "subcategory")
LABEL_COLUMNS = ("label", "prompt_harm_label")
TURNS_COLUMNS = ("turns", "messages", "conversation", "conversations")
Format = Literal["auto", "csv", "json", "jsonl", "parquet", "hf"]
_SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_SUFFIXES[".parquet"] = "parquet"
BUILTIN_SETS = {
    "harmful": (builtin.harmful_prompts, "unsafe"),
    "harmless": (builtin.harmless_prompts, "safe"),
    "borderline-safe": (borderline.borderline_safe_prompts, "safe"),
    "borderline-unsafe": (borderline.borderline_unsafe_prompts, "unsafe"),
    "terse-safe": (borderline.terse_safe_prompts, "safe"),
    "terse-unsafe": (borderline.terse_unsafe_prompts, "unsafe"),
}
"""Sets written for saetrain, by the name that follows ``builtin:`` in a prompt set's path."""


def _builtin_names() -> str:
    return " / ".join(f"builtin:{name}" for name in BUILTIN_SETS)


@dataclass
class PromptSet:
    """Where a set of prompts comes from and how to read it."""

    path: str = "builtin:harmful"
    """A .csv/.json/.jsonl/.parquet file, a Hugging Face dataset id, or a built-in set:
    builtin:harmful, builtin:harmless, builtin:borderline-safe, builtin:borderline-unsafe,
    builtin:terse-safe or builtin:terse-unsafe."""
    name: str | None = None
    """Name in reports; default: the file's stem (or the builtin set's name)."""
    format: Format = "auto"
    """How to read `path`; auto goes by suffix and treats other paths as Hub ids."""
    prompt_column: str | None = None
    """Column holding the request; None tries the usual names (see the module docstring)."""
    category_column: str | None = None
    """Column holding a category for per-category rates; None tries the usual names."""
    label_column: str | None = None
    """Column holding a safe/unsafe-style label; None tries label, prompt_harm_label."""
    label: str | None = None
    """Keep only rows with this label (XSTest: safe or unsafe; WildGuardTest: harmful)."""
    turns_column: str | None = None
    """Column holding a conversation's user turns; None tries turns, messages, conversation."""
    subset: str | None = None
    """Config name of a Hub dataset (e.g. wildguardtest)."""
    split: str = "test"
    """Split of a Hub dataset."""
    seed: int | None = None
    """Shuffle the rows with this seed before offset and limit; None keeps the file order."""
    offset: int = 0
    """Skip this many rows (after the label filter and shuffle)."""
    limit: int | None = None
    """Keep at most this many rows."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"path must be a non-empty string, got {self.path!r}")
        if self.format not in ("auto", "csv", "json", "jsonl", "parquet", "hf"):
            raise ValueError(
                f"format must be auto, csv, json, jsonl, parquet or hf, got {self.format!r}"
            )
        if self.offset < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"offset must be >= 0 and limit >= 1, got {self.offset}, {self.limit}")

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.path.startswith("builtin:"):
            return self.path.removeprefix("builtin:")
        return Path(self.path).stem if Path(self.path).suffix else self.path


@dataclass
class PromptRecord:
    """One prompt (or conversation) of a set."""

    prompt: str
    """The (last) user request."""
    turns: list[str] = field(default_factory=list)
    """All user turns, in order; one for a single-turn prompt."""
    category: str = "all"
    label: str | None = None
    id: str = ""

    def __post_init__(self) -> None:
        if not self.turns:
            self.turns = [self.prompt]

    @property
    def input(self) -> str | list[str]:
        """What :func:`~saetrain.steering.generate.generate` takes: a string or a list of turns."""
        return self.prompt if len(self.turns) == 1 else list(self.turns)


def _format(spec: PromptSet) -> str:
    if spec.format != "auto":
        return spec.format
    suffix = Path(spec.path).suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    if Path(spec.path).exists():
        raise ValueError(
            f"cannot tell how to read {spec.path}: name it .csv, .json, .jsonl or .parquet, "
            "or set format"
        )
    return "hf"


def _rows(spec: PromptSet) -> list[Any]:
    fmt = _format(spec)
    path = Path(spec.path).expanduser()
    if fmt != "hf" and not path.is_file():
        raise FileNotFoundError(
            f"prompt set {spec.path} does not exist: pass a .csv/.json/.jsonl/.parquet file, a Hub "
            "dataset id, or " + _builtin_names()
        )
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    if fmt == "json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"data": [...]} and similar wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list):
            raise ValueError(f"{spec.path}: expected a JSON list of prompts or of objects")
        return data
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    try:
        import datasets

        return list(datasets.load_dataset(spec.path, spec.subset, split=spec.split))
    except Exception as e:  # noqa: BLE001 - any Hub failure gets the same hint
        raise ValueError(
            f"cannot load prompt set {spec.path!r} from the Hugging Face Hub "
            f"({str(e).splitlines()[0][:150] if str(e) else type(e).__name__}): pass a local file"
        ) from e


def _column(
    row: dict, wanted: str | None, candidates: tuple[str, ...], what: str, spec
) -> str | None:
    if wanted is not None:
        if wanted not in row:
            raise ValueError(
                f"{spec.path}: no {what} column {wanted!r}; columns are {', '.join(map(str, row))}"
            )
        return wanted
    return next((c for c in candidates if c in row), None)


def _user_turns(value: Any) -> list[str]:
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [value]
    turns = []
    for turn in value:
        if isinstance(turn, str):
            turns.append(turn)
        elif isinstance(turn, dict):
            role = turn.get("role", turn.get("from", "user"))
            if role in ("user", "human"):
                turns.append(str(turn.get("content", turn.get("value", ""))))
    return turns


def _record(row: Any, i: int, spec: PromptSet) -> PromptRecord:
    if isinstance(row, str):
        return PromptRecord(prompt=row, id=str(i))
    if not isinstance(row, dict):
        raise ValueError(f"{spec.path}: row {i} is neither a string nor an object")
    turns_col = _column(row, spec.turns_column, TURNS_COLUMNS, "turns", spec)
    prompt_col = _column(row, spec.prompt_column, PROMPT_COLUMNS, "prompt", spec)
    cat_col = _column(row, spec.category_column, CATEGORY_COLUMNS, "category", spec)
    label_col = _column(row, spec.label_column, LABEL_COLUMNS, "label", spec)
    turns = _user_turns(row[turns_col]) if turns_col and spec.prompt_column is None else []
    if not turns:
        if prompt_col is None:
            raise ValueError(
                f"{spec.path}: cannot find the prompt column among {', '.join(map(str, row))}; "
                "set prompt_column"
            )
        prompt = str(row[prompt_col])
        context = row.get("ContextString")
        if isinstance(context, str) and context.strip():  # HarmBench contextual behaviours
            prompt = f"{context}\n\n---\n\n{prompt}"
        turns = [prompt]
    rid = row.get("id", row.get("BehaviorID", row.get("Index", i)))
    return PromptRecord(
        prompt=turns[-1],
        turns=turns,
        category=str(row[cat_col]) if cat_col and row.get(cat_col) not in (None, "") else "all",
        label=str(row[label_col]) if label_col and row.get(label_col) is not None else None,
        id=str(rid),
    )


def load_prompts(spec: PromptSet) -> list[PromptRecord]:
    """The records of ``spec``, filtered by label, shuffled, offset and limited as it says."""
    if spec.path.startswith("builtin:"):
        which = spec.path.removeprefix("builtin:")
        if which not in BUILTIN_SETS:
            raise ValueError(f"unknown built-in set {spec.path!r}: use {_builtin_names()}")
        pairs, label = BUILTIN_SETS[which]
        records = [
            PromptRecord(p, category=c, label=label, id=f"{which}-{i}")
            for i, (c, p) in enumerate(pairs())
        ]
    else:
        records = [_record(row, i, spec) for i, row in enumerate(_rows(spec))]
    if spec.label is not None:
        records = [r for r in records if r.label == spec.label]
    if spec.seed is not None:
        random.Random(spec.seed).shuffle(records)
    end = None if spec.limit is None else spec.offset + spec.limit
    records = records[spec.offset : end]
    if not records:
        raise ValueError(
            f"prompt set {spec.path} gave no prompts (label={spec.label!r}, offset={spec.offset}): "
            "check the label filter and the file"
        )
    return records
