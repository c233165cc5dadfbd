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

What is fitted is kept apart from what is evaluated (issue 20): ``exclude`` drops a set's rows
whose text (:func:`normalise_prompt`) occurs in other sets, and :func:`prompt_sources` says
where a set's prompts come from, by ``sources`` or by the file's name in :data:`KNOWN_SOURCES`::

    PromptSet("harmful_train.json", exclude=[PromptSet("advbench.csv")])  # no AdvBench prompt
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError
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


BUILTIN_SOURCE = "saetrain-builtin"
"""The source of every built-in set (:data:`BUILTIN_SETS`): written for saetrain."""

KNOWN_SOURCES: dict[str, dict[str, str | None]] = {
    "advbench.csv": {"advbench": "advbench.csv"},
    "harmbench_val.csv": {"harmbench": "harmbench_val.csv"},
    "xstest_prompts.csv": {"xstest": "xstest_prompts.csv"},
    "harmful_train.json": {"advbench": "advbench.csv", "maliciousinstruct": None, "tdc2023": None},
    "harmful_val.json": {"harmbench": "harmbench_val.csv"},
    "harmful_test.json": {"jailbreakbench": None, "harmbench": None, "strongreject": None},
    "harmless_train.json": {"alpaca": None},
    "harmless_val.json": {"alpaca": None},
    "harmless_test.json": {"alpaca": None},
}
"""Where the prompts of the usual files come from, by file name (see ../shared/data/README.md):
each source, and the file that holds every prompt this file took from it (None: no such file
is known). A set that excludes that whole file (no label, offset, limit or exclude of its own)
has none of that source's prompts left, so :func:`prompt_sources` drops the source. The
refusal_direction splits (andyrdt/refusal_direction ``dataset/generate_datasets.ipynb``):
harmful_train samples AdvBench, MaliciousInstruct and TDC2023 (the red-teaming behaviours of
HarmBench's authors, one of which HarmBench val rewords), minus exact duplicates of the val
and test splits; harmful_val is HarmBench val's standard behaviours; harmless_* split Alpaca.
Other files come from their stem, Hub ids from their id, built-in sets from
:data:`BUILTIN_SOURCE`."""

_EDGE = string.punctuation + string.whitespace + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2026"


def normalise_prompt(prompt: str | Sequence[str]) -> str:
    """A prompt's text as overlap checks compare it: a conversation's turns joined, NFKC,
    lowercase, whitespace collapsed, punctuation and quotes around it stripped. "  How do I
    make a bomb?" and '"how do I make a  bomb"' are one prompt."""
    text = prompt if isinstance(prompt, str) else " ".join(prompt)
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return text.strip(_EDGE)


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
    """Skip this many rows (after the label filter, shuffle and exclude)."""
    limit: int | None = None
    """Keep at most this many rows."""
    exclude: list[PromptSet] = field(default_factory=list)
    """Drop rows whose text (normalised: case, spacing, surrounding punctuation) occurs in any
    of these sets, after the shuffle and before offset and limit: e.g. harmful_train.json minus
    advbench.csv, to fit on prompts kept apart from an evaluated set."""
    sources: list[str] | None = None
    """Where the prompts come from (e.g. [advbench]); None looks the file's name up in
    saetrain.steering.prompts.KNOWN_SOURCES (other files: their stem)."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise UserError(f"path must be a non-empty string, got {self.path!r}")
        self.exclude = [
            e if isinstance(e, PromptSet) else PromptSet.from_dict(e) for e in self.exclude
        ]
        if self.sources is not None and (
            not self.sources or not all(isinstance(x, str) and x for x in self.sources)
        ):
            raise UserError(
                f"sources must be a non-empty list of names (or null to look them up), got "
                f"{self.sources!r}"
            )
        if self.format not in ("auto", "csv", "json", "jsonl", "parquet", "hf"):
            raise UserError(
                f"format must be auto, csv, json, jsonl, parquet or hf, got {self.format!r}"
            )
        if self.offset < 0 or (self.limit is not None and self.limit < 1):
            raise UserError(f"offset must be >= 0 and limit >= 1, got {self.offset}, {self.limit}")

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.path.startswith("builtin:"):
            return self.path.removeprefix("builtin:")
        return Path(self.path).stem if Path(self.path).suffix else self.path

    @classmethod
    def from_dict(cls, d: dict) -> PromptSet:
        """The set a dict of its fields describes (as :func:`dataclasses.asdict` writes it, e.g.
        into features.json); fields this version does not know are ignored."""
        if not isinstance(d, dict):
            raise UserError(f"a prompt set must be a mapping of its fields, got {d!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _whole(spec: PromptSet, file: str | None) -> bool:
    """Whether ``spec`` reads every row of the file named ``file``."""
    return (
        file is not None
        and Path(spec.path).name == file
        and spec.label is None
        and spec.offset == 0
        and spec.limit is None
        and not spec.exclude
    )


def prompt_sources(spec: PromptSet) -> list[str]:
    """Where the prompts of ``spec`` come from: its ``sources``, else by :data:`KNOWN_SOURCES`
    less the sources its ``exclude`` removes whole, else the file's stem (a Hub id: the id)."""
    if spec.sources is not None:
        return list(spec.sources)
    if spec.path.startswith("builtin:"):
        return [BUILTIN_SOURCE]
    known = KNOWN_SOURCES.get(Path(spec.path).name)
    if known is None:
        return [Path(spec.path).stem if Path(spec.path).suffix else spec.path]
    return [s for s, file in known.items() if not any(_whole(e, file) for e in spec.exclude)]


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
        raise UserError(
            f"cannot tell how to read {spec.path}: name it .csv, .json, .jsonl or .parquet, "
            "or set format"
        )
    return "hf"


def _json(text: str, spec: PromptSet, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f" line {line}" if line is not None else ""
        raise UserError(f"{spec.path}{where} is not valid JSON ({e}): fix the file") from None


def _rows(spec: PromptSet) -> list[Any]:
    fmt = _format(spec)
    path = Path(spec.path).expanduser()
    if fmt != "hf" and not path.is_file():
        raise UserError(
            f"prompt set {spec.path} does not exist: pass a .csv/.json/.jsonl/.parquet file, a Hub "
            "dataset id, or " + _builtin_names()
        )
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    if fmt == "json":
        data = _json(path.read_text(encoding="utf-8"), spec)
        if isinstance(data, dict):  # {"data": [...]} and similar wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list):
            raise UserError(f"{spec.path}: expected a JSON list of prompts or of objects")
        return data
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as f:
            return [_json(line, spec, i) for i, line in enumerate(f, 1) if line.strip()]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    try:
        import datasets

        return list(datasets.load_dataset(spec.path, spec.subset, split=spec.split))
    except Exception as e:  # noqa: BLE001 - any Hub failure gets the same hint
        raise UserError(
            f"cannot load prompt set {spec.path!r} from the Hugging Face Hub "
            f"({str(e).splitlines()[0][:150] if str(e) else type(e).__name__}): pass a local file"
        ) from e


def _column(
    row: dict, wanted: str | None, candidates: tuple[str, ...], what: str, spec
) -> str | None:
    if wanted is not None:
        if wanted not in row:
            raise UserError(
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
        raise UserError(f"{spec.path}: row {i} is neither a string nor an object")
    turns_col = _column(row, spec.turns_column, TURNS_COLUMNS, "turns", spec)
    prompt_col = _column(row, spec.prompt_column, PROMPT_COLUMNS, "prompt", spec)
    cat_col = _column(row, spec.category_column, CATEGORY_COLUMNS, "category", spec)
    label_col = _column(row, spec.label_column, LABEL_COLUMNS, "label", spec)
    turns = _user_turns(row[turns_col]) if turns_col and spec.prompt_column is None else []
    if not turns:
        if prompt_col is None:
            raise UserError(
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
    """The records of ``spec``, filtered by label, shuffled, less those in its ``exclude`` sets,
    offset and limited as it says."""
    if spec.path.startswith("builtin:"):
        which = spec.path.removeprefix("builtin:")
        if which not in BUILTIN_SETS:
            raise UserError(f"unknown built-in set {spec.path!r}: use {_builtin_names()}")
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
    excluded = 0
    if spec.exclude:  # after the shuffle: excluding nothing leaves the same sample
        gone = {normalise_prompt(r.turns) for e in spec.exclude for r in load_prompts(e)}
        kept = [r for r in records if normalise_prompt(r.turns) not in gone]
        records, excluded = kept, len(records) - len(kept)
    end = None if spec.limit is None else spec.offset + spec.limit
    records = records[spec.offset : end]
    if not records:
        raise UserError(
            f"prompt set {spec.path} gave no prompts (label={spec.label!r}, offset={spec.offset}, "
            f"{excluded} excluded): check the label filter, exclude and the file"
        )
    return records
