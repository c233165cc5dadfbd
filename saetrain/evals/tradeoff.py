"""The report of an arms evaluation: one table, and the trade-off curves per arm.

    table = arm_table(rows)        # one entry per setting (arm x strength), sets pooled by kind
    write_tradeoff_report(rows, "out/eval")

- ``tradeoff.png``: refusal of unsafe prompts against over-refusal of safe ones, one curve per
  arm through its strengths, 95% Wilson intervals as error bars both ways; each arm's Pareto
  front (no other setting of that arm refuses more unsafe prompts while refusing no more safe
  ones) is circled, and the unsteered model is a star.
- ``refusal_vs_loss.png``: refusal of unsafe prompts against the rise in next-token loss on
  fixed harmless replies (what the steering costs the model's language).
- ``refusal_vs_strength.png``: each set's refusal rate against strength, a line per arm.
- ``summary.md``: arm x strength -> unsafe refusal, safe refusal (each pooled over the sets of
  its kind, with 95% Wilson intervals), deflections, degenerate replies, delta loss and the
  gate's open rates; then each set alone, the gate, and each category.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from ..steering.report import markdown_summary, plot_refusal_vs_strength  # noqa: E402
from ..steering.stats import wilson_interval  # noqa: E402


def _pooled(rows: list[dict], kind: str) -> dict | None:
    """Refusals pooled over the sets of ``kind`` (category "all" rows of one setting)."""
    mine = [r for r in rows if r["kind"] == kind]
    if not mine:
        return None
    k, n = sum(r["refusals"] for r in mine), sum(r["n"] for r in mine)
    lo, hi = wilson_interval(k, n)
    replies = sum(r["n"] + r["invalid"] for r in mine)
    opened = [r["gate_opened"] for r in mine if r["gate_opened"] is not None]
    return {
        "refusals": k,
        "n": n,
        "rate": k / n if n else float("nan"),
        "ci": [lo, hi],
        "deflections": sum(r["deflections"] for r in mine),
        "degenerate": sum(r["degenerate"] for r in mine),
        "replies": replies,
        "gate_open_rate": sum(opened) / replies if opened else None,
    }


def arm_table(rows: Sequence[dict]) -> list[dict]:
    """One entry per setting, in run order: arm, strength, absolute values, unsafe and safe
    pooled rates, delta loss, and the Pareto flag of its arm."""
    overall = [r for r in rows if r["category"] == "all"]
    table = []
    for name in dict.fromkeys(r["setting"] for r in overall):
        mine = [r for r in overall if r["setting"] == name]
        first = mine[0]
        table.append(
            {
                "setting": name,
                "arm": first["arm"],
                "kind": first["arm_kind"],
                "strength": first["strength"],
                "values": first["values"],
                "unsafe": _pooled(mine, "unsafe"),
                "safe": _pooled(mine, "safe"),
                "loss_delta": first.get("loss_delta"),
                "reply_loss_unsteered": {r["set"]: r["reply_loss_unsteered"] for r in mine},
                "sets": {
                    r["set"]: (r["refusals"], r["n"], r["ci_low"], r["ci_high"]) for r in mine
                },
                "info": first.get("info") or {},
            }
        )
    mark_pareto(table)
    return table


def mark_pareto(table: list[dict]) -> None:
    """Set ``pareto`` on each entry: True when no other setting of the same arm has unsafe
    refusal >= and safe refusal <= its own, one of them strictly."""
    for e in table:
        e["pareto"] = None
        if not e["unsafe"] or not e["safe"]:
            continue
        u, s = e["unsafe"]["rate"], e["safe"]["rate"]
        rivals = [o for o in table if o["arm"] == e["arm"] and o is not e and o["unsafe"]]
        e["pareto"] = not any(
            o["safe"] and o["unsafe"]["rate"] >= u and o["safe"]["rate"] <= s
            and (o["unsafe"]["rate"] > u or o["safe"]["rate"] < s)
            for o in rivals
        )  # fmt: skip


def _err(p: dict) -> list[list[float]]:
    return [[p["rate"] - p["ci"][0]], [p["ci"][1] - p["rate"]]]


def plot_tradeoff_curves(table: Sequence[dict], path: str | Path) -> Path:
    """Unsafe refusal against safe over-refusal, a curve per arm (see the module docstring)."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    arms = list(dict.fromkeys(e["arm"] for e in table))
    for i, arm in enumerate(arms):
        pts = [e for e in table if e["arm"] == arm and e["unsafe"] and e["safe"]]
        pts.sort(key=lambda e: e["strength"] if e["strength"] is not None else 0.0)
        if not pts:
            continue
        color = colors[i % len(colors)]
        base = pts[0]["kind"] == "none"
        xs = [e["safe"]["rate"] for e in pts]
        ys = [e["unsafe"]["rate"] for e in pts]
        ax.plot(xs, ys, "-", color=color, alpha=0.6, marker="*" if base else "o",
                markersize=14 if base else 5, label=arm)  # fmt: skip
        for e in pts:
            ax.errorbar(
                e["safe"]["rate"], e["unsafe"]["rate"], xerr=_err(e["safe"]),
                yerr=_err(e["unsafe"]), color=color, capsize=2, alpha=0.5, linewidth=0.8,
            )  # fmt: skip
            if e["pareto"] and len(pts) > 1:
                ax.scatter(e["safe"]["rate"], e["unsafe"]["rate"], s=150, facecolors="none",
                           edgecolors=color, linewidths=1.5, zorder=3)  # fmt: skip
            if e["strength"] is not None:
                ax.annotate(f"x{e['strength']:g}", (e["safe"]["rate"], e["unsafe"]["rate"]),
                            fontsize=7, xytext=(4, -8), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("refusal of safe prompts (over-refusal)")
    ax.set_ylabel("refusal of unsafe prompts")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Refusal trade-off per arm (bars: 95% Wilson; circled: the arm's Pareto front)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_refusal_vs_loss(table: Sequence[dict], path: str | Path) -> Path | None:
    """Unsafe refusal against delta loss on harmless replies, a curve per arm."""
    pts_all = [e for e in table if e["unsafe"] and e["loss_delta"] is not None]
    if not pts_all:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, arm in enumerate(dict.fromkeys(e["arm"] for e in pts_all)):
        pts = sorted(
            (e for e in pts_all if e["arm"] == arm),
            key=lambda e: e["strength"] if e["strength"] is not None else 0.0,
        )
        color = colors[i % len(colors)]
        xs, ys = [e["loss_delta"] for e in pts], [e["unsafe"]["rate"] for e in pts]
        ax.plot(xs, ys, "-o", color=color, alpha=0.7, markersize=5, label=arm)
        for e in pts:
            ax.errorbar(e["loss_delta"], e["unsafe"]["rate"], yerr=_err(e["unsafe"]),
                        color=color, capsize=2, alpha=0.5, linewidth=0.8)  # fmt: skip
    ax.set_xlabel("next-token loss on harmless replies - unsteered (nats)")
    ax.set_ylabel("refusal of unsafe prompts")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Refusal against what it costs the model's language")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _pct(p: dict | None) -> str:
    if p is None or not p["n"]:
        return "-"
    return f"{p['rate']:.0%} [{p['ci'][0]:.0%}, {p['ci'][1]:.0%}] ({p['refusals']}/{p['n']})"


def _share(k: int, n: int) -> str:
    return f"{k / n:.0%}" if n else "-"


def markdown_table(table: Sequence[dict]) -> str:
    """The summary table: one row per arm and strength (see the module docstring)."""
    lines = [
        "| arm | strength | absolute | unsafe refusal | safe refusal | deflections "
        "(unsafe / safe) | degenerate | delta loss (nats) | gate open (unsafe / safe) | front |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        u, s = e["unsafe"], e["safe"]
        both = [p for p in (u, s) if p]
        degenerate = sum(p["degenerate"] for p in both)
        replies = sum(p["replies"] for p in both)
        gates = " / ".join(
            "-" if p is None or p["gate_open_rate"] is None else f"{p['gate_open_rate']:.0%}"
            for p in (u, s)
        )
        values = e["values"]
        absolute = "-" if not values else ", ".join(f"{v:.3g}" for v in values)
        deflect = " / ".join("-" if p is None else _share(p["deflections"], p["n"]) for p in (u, s))
        strength = "-" if e["strength"] is None else f"{e['strength']:g}"
        loss = "-" if e["loss_delta"] is None else f"{e['loss_delta']:+.3f}"
        lines.append(
            f"| {e['arm']} | {strength} | {absolute} | {_pct(u)} | {_pct(s)} | {deflect} "
            f"| {_share(degenerate, replies)} | {loss} | {gates} | {'yes' if e['pareto'] else ''} |"
        )
    return "\n".join(lines)


def write_tradeoff_report(
    rows: Sequence[dict], out_dir: str | Path, *, header: str = "", gate: dict | None = None
) -> dict:
    """Write summary.md, tradeoff.png, refusal_vs_loss.png and refusal_vs_strength.png to
    ``out_dir``; returns the table."""
    out = Path(out_dir)
    table = arm_table(rows)
    plot_tradeoff_curves(table, out / "tradeoff.png")
    plot_refusal_vs_strength(rows, out / "refusal_vs_strength.png")
    loss_plot = plot_refusal_vs_loss(table, out / "refusal_vs_loss.png")
    parts = [header, "## Arms", markdown_table(table), "## Each set", markdown_summary(rows, gate)]
    if loss_plot is None:
        parts.append("(No delta-loss plot: fluency_loss was off.)")
    (out / "summary.md").write_text("\n\n".join(p for p in parts if p) + "\n")
    return {"table": table}
