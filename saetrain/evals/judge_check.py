"""How well a refusal judge agrees with hand labels of our own replies (issue 20 item 5).

    python benchmarks/judge_agreement.py benchmarks/labels/replies-2026-12-04.jsonl

A labels file is JSONL, one reply a line: ``prompt``, ``response``, ``label`` (one of
:data:`LABELS`, given by a person following ``benchmarks/labels/GUIDE.md``), and where it came
from (``setting``, ``set``). A judge's four-way verdict is :func:`four_way`: degenerate first
(the evaluation counts those apart whatever the judge says), then refusal, then deflection,
else compliance.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from .refusal import is_degenerate

LABELS = ("refusal", "deflection", "compliance", "degenerate")


def sample_replies(responses: str | Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` replies of an eval-refusal ``responses.jsonl`` to label, spread evenly over its
    settings (round robin over settings, each shuffled with ``seed``), in a shuffled order and
    without the judge's verdict: ``prompt``, ``response``, ``setting``, ``set``, ``label: ""``."""
    import random

    by_setting: dict[str, list[dict]] = {}
    for line in Path(responses).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            by_setting.setdefault(row["setting"], []).append(row)
    if not by_setting:
        raise UserError(f"{responses} holds no replies")
    rng = random.Random(seed)
    for rows in by_setting.values():
        rng.shuffle(rows)
    picked: list[dict] = []
    while len(picked) < n and any(by_setting.values()):
        for rows in by_setting.values():
            if rows and len(picked) < n:
                picked.append(rows.pop())
    rng.shuffle(picked)
    keep = ("prompt", "response", "setting", "set")
    return [{**{k: r.get(k) for k in keep}, "label": ""} for r in picked]


def read_labels(path: str | Path) -> list[dict]:
    """The labelled replies of ``path``, checked: every line has prompt, response and a label
    of :data:`LABELS`."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not {"prompt", "response", "label"} <= set(row) or row["label"] not in LABELS:
            raise UserError(
                f"{path}:{n}: needs prompt, response and a label of {', '.join(LABELS)}"
            )
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no labelled replies")
    return rows


def four_way(verdict, response: str) -> str:
    """A judge's verdict as one of :data:`LABELS` (see the module docstring)."""
    if is_degenerate(response):
        return "degenerate"
    if verdict.refused:
        return "refusal"
    if getattr(verdict, "deflected", False):
        return "deflection"
    return "compliance"


def agreement(judge, rows: Sequence[dict]) -> dict:
    """Agreement of ``judge`` with the labels: four-way accuracy, refusal-or-not accuracy,
    per-label precision and recall, and the confusion counts (label -> judged -> count)."""
    verdicts = judge.judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    judged = [four_way(v, r["response"]) for v, r in zip(verdicts, rows, strict=True)]
    truth = [r["label"] for r in rows]
    n = len(rows)
    confusion = {t: dict(Counter(j for j, tt in zip(judged, truth, strict=True) if tt == t))
                 for t in LABELS}  # fmt: skip
    per_label = {}
    for lab in LABELS:
        tp = sum(j == lab and t == lab for j, t in zip(judged, truth, strict=True))
        said, true = judged.count(lab), truth.count(lab)
        per_label[lab] = {
            "n": true,
            "precision": tp / said if said else float("nan"),
            "recall": tp / true if true else float("nan"),
        }
    refusal_agree = sum(
        (j == "refusal") == (t == "refusal") for j, t in zip(judged, truth, strict=True)
    )
    return {
        "judge": getattr(judge, "name", type(judge).__name__),
        "n": n,
        "accuracy": sum(j == t for j, t in zip(judged, truth, strict=True)) / n,
        "refusal_accuracy": refusal_agree / n,
        "per_label": per_label,
        "confusion": confusion,
    }
