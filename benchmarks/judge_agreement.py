"""Agreement of refusal judges with hand labels of our own replies (issue 20 item 5).

    python benchmarks/judge_agreement.py benchmarks/labels/replies-2026-12-04.jsonl
    python benchmarks/judge_agreement.py LABELS --judge allenai/wildguard   # a model judge too
    python benchmarks/judge_agreement.py --sample steering/quickstart/eval/responses.jsonl 150 \
        > to-label.jsonl                   # replies to label, spread over the settings, no verdicts

Prints, per judge, the four-way agreement (refusal / deflection / compliance / degenerate), the
refusal-or-not agreement, each label's precision and recall, and the confusion counts. The
labels and the guide they follow are in benchmarks/labels/.
"""

from __future__ import annotations

import argparse
import json

from saetrain.evals.judge_check import LABELS, agreement, read_labels, sample_replies
from saetrain.steering.judge import make_judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="?", help="a labels JSONL (prompt, response, label)")
    parser.add_argument(
        "--sample", nargs=2, metavar=("RESPONSES", "N"),
        help="print N replies of an eval-refusal responses.jsonl to label, and stop",
    )  # fmt: skip
    parser.add_argument(
        "--judge", action="append", default=None,
        help="keyword (default), or a model judge's Hub id or folder; repeatable",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args()
    if args.sample:
        for row in sample_replies(args.sample[0], int(args.sample[1])):
            print(json.dumps(row, ensure_ascii=False))
        return
    if not args.labels:
        parser.error("give a labels file, or --sample RESPONSES N")
    rows = read_labels(args.labels)
    counts = {lab: sum(r["label"] == lab for r in rows) for lab in LABELS}
    print(f"{len(rows)} labelled replies: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for spec in args.judge or ["keyword"]:
        result = agreement(make_judge(spec), rows)
        if args.json:
            print(json.dumps(result, indent=2))
            continue
        print(f"\njudge {result['judge']}: four-way agreement {result['accuracy']:.1%}, "
              f"refusal-or-not {result['refusal_accuracy']:.1%}")  # fmt: skip
        for lab, m in result["per_label"].items():
            print(
                f"  {lab:<11} n={m['n']:<4} precision {m['precision']:.0%} recall {m['recall']:.0%}"
            )
        print("  confusion (label -> judged):")
        for lab, row in result["confusion"].items():
            print(f"    {lab:<11} " + ", ".join(f"{k} {v}" for k, v in sorted(row.items())))


if __name__ == "__main__":
    main()
