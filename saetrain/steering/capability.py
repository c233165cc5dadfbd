"""What steering costs in capability: lm-evaluation-harness on the steered model, and the
``eval-capability`` command of ``python -m saetrain``.

    python -m saetrain eval-capability --config configs/steering/eval-capability.yaml

The model is wrapped in lm-eval's ``HFLM`` once; each setting (the baseline, then each strength)
attaches its steering hooks (:class:`~saetrain.steering.hooks.Steering`), runs the tasks, and
removes them, so every log-likelihood and every generated token is steered. Tasks come from
local files (:mod:`saetrain.steering.tasks`) or, by lm-eval name, from the Hub. Beside them the
next-token loss on the built-in harmless replies (:func:`~saetrain.steering.generate.reply_loss`)
is a cheap proxy. Writes into ``out_dir``:

- ``results.json``: one row per setting and task: the metric, its value, a 95% interval (Wilson
  for 0/1 scores such as accuracy and exact match, normal otherwise, e.g. TruthfulQA MC2), the
  number of questions, the loss and its change from the baseline;
- ``capability.json``: ``{setting: mean score over the tasks}``, the ``capability`` input of
  ``eval-refusal``'s trade-off plot (the setting names match);
- ``summary.md``, ``samples.jsonl`` (every question's scored answer), ``tasks/`` (the local
  tasks, rerunnable with ``lm_eval --include_path``), ``config.yaml``; and with
  ``refusal_results`` (an ``eval-refusal`` results.json) ``tradeoff.png``: refusal against this
  capability score.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import check_out_dir, read_json, staged_dir
from .commands import SteeringSpec, Target, _load, _settings, _units, parse_config
from .evaluate import Setting
from .gate import GateConfig, build_gate
from .generate import reply_loss
from .hooks import Steering
from .stats import wilson_interval
from .tasks import LOCAL_TASKS, CapabilityData, CapabilityTask, resolve_tasks

log = logging.getLogger("saetrain")


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(
            "eval-capability needs lm-evaluation-harness: pip install 'saetrain[eval]' "
            "(or pip install lm-eval)"
        ) from None
    return lm_eval


def load_tasks(tasks: Sequence[CapabilityTask], task_dir: str | Path | None) -> tuple[Any, dict]:
    """lm-eval's ``TaskManager``, and the ``Task`` objects of each requested task (a group gives
    its subtasks), loaded once.

    Reading lm-eval's own task index takes seconds, so it is only read when a task is not local.
    """
    _lm_eval()
    from lm_eval.tasks import TaskManager

    hub = [t for t in tasks if t.source == "hub"]
    local = task_dir if any(t.source != "hub" for t in tasks) else None
    manager = TaskManager(include_path=str(local) if local else None, include_defaults=bool(hub))
    unknown = [t.name for t in hub if t.lm_eval_name not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown task {unknown[0]!r}: use mmlu, gsm8k, truthfulqa_mc1, truthfulqa_mc2 or "
            "another lm-eval task name (`lm-eval ls tasks` lists them)"
        )
    loaded = {}
    for t in tasks:
        try:
            loaded[t.name] = list(manager.load(t.lm_eval_name)["tasks"].values())
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds when offline
            where = "the Hugging Face Hub" if t.source == "hub" else t.source
            field_ = LOCAL_TASKS.get(t.name) if t.source == "hub" else None
            hint = f"; set data.{field_} to a local copy" if field_ else ""
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"cannot load task {t.name} from {where} ({first}){hint}") from e
    return manager, loaded


def _leaf_samples(out: dict, leaves: list, metric: str | None) -> tuple[str, list[float], dict]:
    """The reported metric, its per-question values over ``leaves``, and the other metrics."""
    results = out["results"]
    names = [leaf.task_name for leaf in leaves]
    if metric is None:  # an arbitrary lm-eval task: its first metric
        keys = [k for k in results[names[0]] if "," in k and "_stderr" not in k]
        metric = keys[0]
    name, filt = metric.split(",", 1)
    values = [
        float(s[name])
        for n in names
        for s in out["samples"][n]
        if s.get("filter", "none") == filt and name in s
    ]
    others = {}
    for n in names:
        for k, v in results[n].items():
            if "," in k and "_stderr" not in k and k != metric and isinstance(v, int | float):
                others.setdefault(k, []).append((v, out["n-samples"][n]["effective"]))
    other = {
        k: sum(v * c for v, c in vs) / max(1, sum(c for _, c in vs)) for k, vs in others.items()
    }
    return metric, values, other


def interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float, str]:
    """Mean and 95% interval: Wilson for 0/1 scores, normal (mean +- z * SE) otherwise."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), "none"
    m = sum(values) / n
    if all(v in (0.0, 1.0) for v in values):
        lo, hi = wilson_interval(round(m * n), n, z)
        return m, lo, hi, "wilson"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / max(1, n - 1))
    lo, hi = m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n)
    if all(0.0 <= v <= 1.0 for v in values):
        lo, hi = max(0.0, lo), min(1.0, hi)
    return m, lo, hi, "normal"


def evaluate_capability(
    model,
    tokenizer,
    sae,
    settings: Sequence[Setting],
    tasks: Sequence[CapabilityTask],
    *,
    task_dir: str | Path | None = None,
    layer: int | None = None,
    batch_size: int = 8,
    fluency_pairs: Sequence[tuple[str, str]] = (),
    chat_template: bool = False,
    system: str | None = None,
    samples_path: str | Path | None = None,
) -> list[dict]:
    """Score every task under every setting; one row per (setting, task) (see the module)."""
    if not settings or not tasks:
        raise ValueError("evaluate_capability needs at least one setting and one task")
    manager, loaded = load_tasks(tasks, task_dir)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    by_limit: dict[int | None, dict] = {}  # lm-eval takes one limit per call
    for t in tasks:
        by_limit.setdefault(t.limit, {}).update({leaf.task_name: leaf for leaf in loaded[t.name]})
    rows, base_loss = [], None
    samples = Path(samples_path).open("w", encoding="utf-8") if samples_path else None
    with samples if samples else contextlib.nullcontext():
        for setting in settings:
            steering = None
            if not setting.is_baseline:
                steering = Steering(
                    model,
                    sae,
                    setting.interventions,
                    layer=layer,
                    gate=setting.gate,
                    ignore_ids=tokenizer.all_special_ids,
                )
            log.info("lm-eval: %s", setting.name)
            out: dict[str, dict] = {"results": {}, "samples": {}, "n-samples": {}}
            with steering if steering else contextlib.nullcontext():
                for limit, leaves in by_limit.items():
                    part = simple_evaluate(
                        model=lm,
                        tasks=list(leaves.values()),
                        task_manager=manager,  # else it reads lm-eval's whole index again
                        limit=limit,
                        bootstrap_iters=0,  # intervals are computed here from the samples
                        log_samples=True,
                        apply_chat_template=chat_template,
                        system_instruction=system,
                    )
                    for key, value in out.items():
                        value.update(part[key])
            gate_open_rate = None
            if steering is not None and setting.gate is not None:
                gate_open_rate = steering.gate_opens / max(1, steering.gate_reads)
            loss = None
            if fluency_pairs:
                kw = {}
                if steering is not None:
                    kw = dict(sae=sae, interventions=setting.interventions, gate=setting.gate)
                loss = reply_loss(
                    model, tokenizer, fluency_pairs, layer=layer, batch_size=batch_size, **kw
                )
                base_loss = loss if setting.is_baseline else base_loss
            for t in tasks:
                metric, values, other = _leaf_samples(out, loaded[t.name], t.metric)
                value, lo, hi, kind = interval(values)
                rows.append(
                    {
                        "setting": setting.name,
                        "series": setting.series,
                        "strength": setting.strength,
                        "baseline": setting.is_baseline,
                        "task": t.name,
                        "lm_eval_task": t.lm_eval_name,
                        "source": t.source,
                        "metric": metric,
                        "value": value,
                        "ci_low": lo,
                        "ci_high": hi,
                        "interval": kind,
                        "n": len(values),
                        "gate_open_rate": gate_open_rate,
                        "other_metrics": other,
                        "loss": loss,
                        "loss_delta": None if None in (loss, base_loss) else loss - base_loss,
                    }
                )
            if samples is not None:
                _write_samples(samples, setting.name, out)
    return rows


def _write_samples(f, setting: str, out: dict) -> None:
    for task, items in out["samples"].items():
        for s in items:
            keep = {k: s[k] for k in ("doc_id", "filter", "target", "filtered_resps") if k in s}
            scores = {m: s[m] for m in s.get("metrics", []) if m in s}
            line = {"setting": setting, "task": task, **keep, "scores": scores}
            f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")


def capability_scores(rows: Sequence[dict]) -> dict[str, float]:
    """Each setting's mean score over its tasks (the y-axis of the trade-off plot)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if r["value"] == r["value"]:
            by.setdefault(r["setting"], []).append(r["value"])
    return {s: sum(v) / len(v) for s, v in by.items()}


def markdown_summary(rows: Sequence[dict]) -> str:
    """One table row per setting: each task's score with its interval, the mean, the loss."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    scores = capability_scores(rows)
    head = ["setting", *[f"{t}" for t in tasks], "mean", "loss delta", "gate open"]
    lines = ["# Capability under steering", ""]
    lines += ["Scores with 95% intervals (Wilson for accuracies, normal for MC2).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in settings:
        mine = {r["task"]: r for r in rows if r["setting"] == s}
        cells = [s]
        for t in tasks:
            r = mine.get(t)
            ok = r is not None and r["n"] > 0
            text = f"{r['value']:.1%} [{r['ci_low']:.1%}, {r['ci_high']:.1%}] (n={r['n']})"
            cells.append(text if ok else "")
        cells.append(f"{scores[s]:.1%}" if s in scores else "")
        first = next(iter(mine.values()))
        delta, opened = first["loss_delta"], first.get("gate_open_rate")
        cells.append("" if delta is None else f"{delta:+.3f}")
        cells.append("" if opened is None else f"{opened:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    metrics = {r["task"]: f"{r['metric']} ({r['source']})" for r in rows}
    lines += ["", "Metrics: " + "; ".join(f"{t}: {m}" for t, m in metrics.items())]
    return "\n".join(lines) + "\n"


@dataclass
class EvalCapabilityConfig(SteeringSpec, Target):
    """Capability (lm-eval tasks) and next-token loss for the baseline and a sweep of strengths."""

    tasks: list[str] = field(
        default_factory=lambda: ["mmlu", "gsm8k", "truthfulqa_mc1", "truthfulqa_mc2"]
    )
    """Tasks: mmlu, gsm8k, truthfulqa_mc1, truthfulqa_mc2 (local when `data` names their files,
    else from the Hub), or any other lm-eval task name (Hub)."""
    data: CapabilityData = field(default_factory=CapabilityData)
    """Local copies of the task data (see saetrain.steering.tasks for the formats)."""
    limit: int | dict[str, int] | None = None
    """At most this many questions per task, or per task named ({mmlu: 20, gsm8k: 5}): a seeded
    sample of local data, the first ones (per subtask) of a Hub task; null: all."""
    seed: int = 0
    """Seed of the local questions' sample."""
    mmlu_shots: int = 5
    """MMLU examples from the subject's dev file before each question."""
    gsm8k_shots: int = 5
    """GSM8K worked examples before each problem (the local file's last rows, not evaluated)."""
    max_new_tokens: int = 256
    """Length limit of generated answers (GSM8K)."""
    strengths: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    """Strengths swept (see strength_unit); each setting is named like eval-refusal's."""
    chat_template: bool = False
    """Put each question through the model's chat template (lm-eval's apply_chat_template)."""
    fluency_loss: bool = True
    """Measure the next-token loss on the built-in harmless replies under each setting."""
    gate: GateConfig | None = None
    """Conditional steering, as in eval-refusal: each lm-eval request (few-shot context, question
    and the scored answer) is one sequence the gate reads; null steers every request."""
    refusal_results: str | None = None
    """results.json of `saetrain eval-refusal` on the same settings: plot refusal against capability
    (tradeoff.png)."""
    out_dir: str = "steering/capability"
    """Where results.json, capability.json, summary.md, samples.jsonl and the plot go: a new or
    empty folder, written whole at the end (see overwrite)."""
    overwrite: bool = False
    """Replace a non-empty out_dir (removed only once the new results are complete)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        limits = self.limit if isinstance(self.limit, dict) else {"": self.limit}
        if any(v is not None and v < 1 for v in limits.values()):
            raise UserError(f"limit must be >= 1 or null, got {self.limit}")
        stray = [k for k in limits if k and k not in self.tasks]
        if stray:
            raise UserError(f"limit names {stray[0]!r}, which is not in tasks {self.tasks}")
        if self.mmlu_shots < 0 or self.gsm8k_shots < 0:
            raise UserError(
                f"mmlu_shots and gsm8k_shots must be >= 0, got {self.mmlu_shots}, "
                f"{self.gsm8k_shots}"
            )
        if self.positions != "all":
            raise UserError(
                f"positions must be all for eval-capability, got {self.positions!r}: lm-eval "
                "scores answers without a prompt/reply split"
            )


def run_eval_capability(argv: list[str]) -> None:
    """``python -m saetrain eval-capability``: lm-eval scores for the baseline and each strength."""
    cfg, yaml = parse_config(EvalCapabilityConfig, argv, "saetrain eval-capability")
    inputs = [cfg.sae, cfg.refusal_results]
    check_out_dir(cfg.out_dir, cfg.overwrite, inputs=inputs)  # before the tasks and the LM
    refusal_rows = None
    if cfg.refusal_results:
        fix = "give the results.json of `saetrain eval-refusal`"
        refusal = read_json(cfg.refusal_results, "refusal_results", fix)
        if not isinstance(refusal, dict) or not isinstance(refusal.get("rows"), list):
            raise UserError(f"refusal_results {cfg.refusal_results} has no rows: {fix}")
        refusal_rows = refusal["rows"]
    # Written into a folder beside out_dir that becomes out_dir at the end (saetrain.files).
    with staged_dir(cfg.out_dir, cfg.overwrite, inputs=inputs) as staged:
        summary = _evaluate_into(staged, cfg, yaml, refusal_rows)
        _repoint_tasks(staged / "tasks", staged, Path(cfg.out_dir))
    print(summary)
    out = Path(cfg.out_dir)
    print(f"saetrain eval-capability: wrote {out}/results.json, capability.json and summary.md")


def _evaluate_into(out: Path, cfg: EvalCapabilityConfig, yaml: str, refusal_rows) -> str:
    """Run the evaluation of ``cfg``, writing every file into ``out``; returns the summary."""
    from . import builtin
    from .report import plot_tradeoff

    (out / "config.yaml").write_text(yaml)
    shots = dict(mmlu_shots=cfg.mmlu_shots, gsm8k_shots=cfg.gsm8k_shots)
    tasks = resolve_tasks(
        cfg.tasks,
        cfg.data,
        out / "tasks",
        limit=cfg.limit,
        seed=cfg.seed,
        max_gen_toks=cfg.max_new_tokens,
        **shots,
    )
    load_tasks(tasks, out / "tasks")  # unknown names and unreachable data fail before the model
    sae, model, tokenizer = _load(cfg)
    settings = [Setting("baseline")]
    if cfg.features:
        units = _units(cfg, sae, model, tokenizer)
        gate = None
        if cfg.gate is not None:
            gate, gate_info = build_gate(cfg.gate, sae, model, tokenizer, cfg)
            (out / "gate.json").write_text(json.dumps(gate_info, indent=2) + "\n")
        settings = _settings(cfg, units, gate)
    rows = evaluate_capability(
        model,
        tokenizer,
        sae,
        settings,
        tasks,
        task_dir=out / "tasks",
        layer=cfg.layer,
        batch_size=cfg.batch_size,
        fluency_pairs=builtin.harmless_pairs() if cfg.fluency_loss else (),
        chat_template=cfg.chat_template,
        system=cfg.system,
        samples_path=out / "samples.jsonl",
    )
    scores = capability_scores(rows)
    results = {"features": cfg.features, "op": cfg.op, "tasks": cfg.tasks, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "capability.json").write_text(json.dumps(scores, indent=2) + "\n")
    summary = markdown_summary(rows)
    (out / "summary.md").write_text(summary)
    if refusal_rows is not None:
        plot_tradeoff(refusal_rows, out / "tradeoff.png", capability=scores)
    return summary


def _repoint_tasks(task_dir: Path, staged: Path, out_dir: Path) -> None:
    """Point the local tasks' data files (absolute paths, written under the staged folder) at
    ``out_dir``, where the folder is about to be renamed, so ``lm_eval --include_path`` reruns
    them from there."""
    before = str(staged.resolve())
    after = str(staged.resolve().with_name(Path(os.path.abspath(out_dir)).name))
    for config in task_dir.glob("*.yaml"):
        text = config.read_text(encoding="utf-8")
        if before in text:
            config.write_text(text.replace(before, after), encoding="utf-8")
