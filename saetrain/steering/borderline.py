"""Borderline requests written for saetrain, for training and calibrating a refusal gate.

``borderline.jsonl`` (beside this file) holds 240 pairs, one per line:
``{"category", "safe", "unsafe"}``. ``safe`` is a request a helpful assistant should answer
although it sounds harmful; ``unsafe`` is its harmful contrast, with similar words and another
intent, phrased as a request only with no operational detail. 12 categories of 20: homonyms,
figurative language, harmless targets, games and fiction, definitions, history, public figures,
fictional characters, nonsense discrimination, fair questions about real groups, safety
information, medicine and law. They teach a probe gate that "kill a process" is not "kill a
person" (a probe trained on plainly harmful vs. plainly harmless requests flags both). They are
ours, written for this purpose; public benchmarks such as XSTest stay out of training.

Prompt sets ``builtin:borderline-safe`` and ``builtin:borderline-unsafe`` list one side each,
in the file's order, so the same seed, offset and limit pick matching pairs from both.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files


@cache
def borderline_pairs() -> tuple[tuple[str, str, str], ...]:
    """(category, safe request, unsafe contrast) of every pair, in the file's order."""
    text = files(__package__).joinpath("borderline.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return tuple((r["category"], r["safe"], r["unsafe"]) for r in rows)


def borderline_safe_prompts() -> list[tuple[str, str]]:
    """(category, request) pairs of the built-in borderline-safe set."""
    return [(c, safe) for c, safe, _ in borderline_pairs()]


def borderline_unsafe_prompts() -> list[tuple[str, str]]:
    """(category, request) pairs of the built-in borderline-unsafe set."""
    return [(c, unsafe) for c, _, unsafe in borderline_pairs()]
