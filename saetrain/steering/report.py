"""Plots and a markdown summary of a refusal evaluation (the rows of ``evaluate_refusal``).

    write_report(rows, "out/eval")   # summary.md, refusal_vs_strength.png, tradeoff.png

- ``refusal_vs_strength.png``: refusal rate (95% Wilson interval as error bars) against the
  steering strength, one line per prompt set and series; unsafe sets solid, safe sets dashed,
  the baseline of each set a dotted horizontal line.
- ``tradeoff.png``: each setting as a point, refusal on unsafe prompts against a capability
  score: compliance on safe prompts (1 - their refusal rate) unless ``capability`` gives one per
  setting (e.g. an lm-eval accuracy), and against the rise in next-token loss; the baseline is a
  star.
- ``summary.md``: one table row per setting (rates with intervals per set, fluency), then the
  per-category rates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def _all_rows(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r["category"] == "all"]


def _settings(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["setting"] for r in rows))


def _mean_rate(rows: Sequence[dict], setting: str, kind: str) -> float | None:
    rates = [
        r["refusal_rate"] for r in _all_rows(rows) if r["setting"] == setting and r["kind"] == kind
    ]
    rates = [x for x in rates if x == x]
    return sum(rates) / len(rates) if rates else None


def plot_refusal_vs_strength(rows: Sequence[dict], path: str | Path) -> Path:
    """Refusal rate against strength per set and series (see the module docstring)."""
    rows = _all_rows(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sets = list(dict.fromkeys((r["set"], r["kind"]) for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, kind) in enumerate(sets):
        color = colors[i % len(colors)]
        style = "-" if kind == "unsafe" else "--"
        for series in dict.fromkeys(r["series"] for r in rows if not r["baseline"]):
            pts = sorted(
                (
                    r
                    for r in rows
                    if r["set"] == name and r["series"] == series and not r["baseline"]
                ),
                key=lambda r: r["strength"] if r["strength"] is not None else 0.0,
            )
            if not pts:
                continue
            xs = [r["strength"] if r["strength"] is not None else 0.0 for r in pts]
            ys = [r["refusal_rate"] for r in pts]
            err = [[y - r["ci_low"] for y, r in zip(ys, pts, strict=True)]]
            err.append([r["ci_high"] - y for y, r in zip(ys, pts, strict=True)])
            marker = "o" if series == "steered" else "s"
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                fmt=marker + style,
                color=color,
                capsize=3,
                label=f"{name} ({kind}, {series})",
            )
        for r in rows:
            if r["baseline"] and r["set"] == name:
                ax.axhline(r["refusal_rate"], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("steering strength")
    ax.set_ylabel("refusal rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Refusal vs strength (dotted: baseline; bars: 95% Wilson)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_tradeoff(
    rows: Sequence[dict], path: str | Path, capability: Mapping[str, float] | None = None
) -> Path:
    """Safety against capability, and against the rise in next-token loss, one point per setting."""
    losses = {r["setting"]: r["loss_delta"] for r in _all_rows(rows) if r["loss_delta"] is not None}
    fig, axes = plt.subplots(
        1, 2 if losses else 1, figsize=(11 if losses else 6, 4.5), squeeze=False
    )
    ylabel = "capability" if capability else "compliance on safe prompts (1 - refusal)"
    baseline = {r["setting"] for r in rows if r["baseline"]}
    for setting in _settings(rows):
        x = _mean_rate(rows, setting, "unsafe")
        if x is None:
            continue
        if capability is not None:
            y = capability.get(setting)
        else:
            safe = _mean_rate(rows, setting, "safe")
            y = None if safe is None else 1 - safe
        marker, size = ("*", 220) if setting in baseline else ("o", 50)
        panels = [(axes[0][0], y)] + ([(axes[0][1], losses.get(setting))] if losses else [])
        for ax, yy in panels:
            if yy is not None:
                ax.scatter([x], [yy], marker=marker, s=size, zorder=3)
                ax.annotate(setting, (x, yy), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes[0][0].set_xlabel("refusal on unsafe prompts")
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].set_title("Safety-capability trade-off (star: baseline)")
    if losses:
        axes[0][1].set_xlabel("refusal on unsafe prompts")
        axes[0][1].set_ylabel("next-token loss - baseline (nats)")
        axes[0][1].set_title("Cost in language modelling")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _rate(r: dict) -> str:
    if r["n"] == 0:
        return "n/a"
    return f"{r['refusal_rate']:.0%} [{r['ci_low']:.0%}, {r['ci_high']:.0%}] (n={r['n']})"


def markdown_summary(rows: Sequence[dict], gate: dict | None = None) -> str:
    """A markdown table per setting, the gate (its validation rates, what it opened on), then
    per category (see the module docstring)."""
    top = _all_rows(rows)
    sets = list(dict.fromkeys((r["set"], r["kind"]) for r in top))
    head = ["setting", "strength"] + [f"{s} ({k}) refusal" for s, k in sets]
    head += ["distinct-2", "repetition", "loss delta"]
    lines = ["# Refusal evaluation", "", "Refusal rates with 95% Wilson intervals.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting in _settings(top):
        mine = [r for r in top if r["setting"] == setting]
        cells = [setting, "baseline" if mine[0]["baseline"] else f"{mine[0]['strength']}"]
        for s, k in sets:
            match = [r for r in mine if r["set"] == s and r["kind"] == k]
            cells.append(_rate(match[0]) if match else "")
        d2 = [r["distinct_2"] for r in mine if r["distinct_2"] == r["distinct_2"]]
        rep = [r["repetition"] for r in mine if r["repetition"] == r["repetition"]]
        cells.append(f"{sum(d2) / len(d2):.2f}" if d2 else "")
        cells.append(f"{sum(rep) / len(rep):.2f}" if rep else "")
        delta = mine[0]["loss_delta"]
        cells.append("" if delta is None else f"{delta:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    opened = [r for r in top if r.get("gate_open_rate") is not None]
    if gate or opened:
        lines += ["", "## Gate", ""]
        if gate and gate.get("chosen_on_validation"):
            lo, hi = gate["tpr_interval"]
            flo, fhi = gate["fpr_interval"]
            lines.append(
                f"Threshold {gate['threshold']:.4g}, chosen on validation prompts: TPR "
                f"{gate['tpr']:.1%} [{lo:.1%}, {hi:.1%}] on {gate['n_positive']}, FPR "
                f"{gate['fpr']:.1%} [{flo:.1%}, {fhi:.1%}] on {gate['n_negative']}."
            )
        elif gate:
            lines.append(f"Fixed threshold {gate['threshold']:.4g}.")
        lines += [""] if gate and opened else []
        lines += [
            f"- {r['setting']}: opened on {r['gate_open_rate']:.1%} of {r['set']} ({r['kind']})"
            for r in opened
        ]
    cats = [r for r in rows if r["category"] != "all"]
    if cats:
        lines += [
            "",
            "## Per category",
            "",
            "| setting | set | category | refusal |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r['setting']} | {r['set']} | {r['category']} | {_rate(r)} |" for r in cats]
    return "\n".join(lines) + "\n"


def write_report(
    rows: Sequence[dict], out_dir: str | Path, capability=None, gate: dict | None = None
) -> list[Path]:
    """Write ``summary.md``, ``refusal_vs_strength.png`` and ``tradeoff.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown_summary(rows, gate))
    return [
        out / "summary.md",
        plot_refusal_vs_strength(rows, out / "refusal_vs_strength.png"),
        plot_tradeoff(rows, out / "tradeoff.png", capability),
    ]
