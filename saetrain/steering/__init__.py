"""Steering with SAE features, and refusal evaluation (issue #5), after the data path:
prompts -> generation under hooks -> judge -> rates -> report.

| file | stage |
|---|---|
| ``prompts.py``, ``builtin.py`` | prompt sets: XSTest/AdvBench/JBB/HarmBench CSV, JSON, JSONL, Parquet, Hub; the built-in set |
| ``hooks.py`` | :func:`steer`: clamp / add / ablate latents on the residual stream, KV-cache safe |
| ``gate.py`` | conditional steering: feature and probe gates, threshold chosen on validation prompts |
| ``generate.py`` | batched greedy chat generation (multi-turn too) and next-token loss on fixed replies |
| ``judge.py`` | refusal judges: keywords, WildGuard, Llama Guard, HarmBench's classifier |
| ``features.py`` | finding refusal features: response tokens, prompt contrast, steering effect |
| ``evaluate.py``, ``stats.py``, ``report.py`` | rates with Wilson intervals, fluency, plots, markdown |
| ``tasks.py``, ``capability.py`` | capability under steering: MMLU/GSM8K/TruthfulQA from local files or the Hub through lm-eval; the ``eval-capability`` command |
| ``callback.py`` | :class:`SteeringEvalCallback`: loss recovered by the spliced SAE (and refusal under steering) during ``fit`` |
| ``commands.py`` | the commands ``features``, ``steer`` and ``eval-refusal`` of ``python -m saetrain`` |

    import saetrain
    from saetrain.steering import Intervention, generate, steer
    sae = saetrain.load_sae("checkpoints/quickstart")
    with steer(model, sae, Intervention([1234], "clamp", 8.0)):   # around any forward/generate
        out = model.generate(**batch)
    gens = generate(model, tok, ["How do I pick a lock?"], sae=sae,
                    interventions=[Intervention([1234], "clamp", 8.0, positions="generated")])
"""  # noqa: E501

from .capability import evaluate_capability
from .direction import Direction, DirectionEdit, fit_direction, random_direction
from .evaluate import EvalSet, Setting, evaluate_refusal
from .features import find_features, write_table
from .gate import FeatureGate, GateCalibration, ProbeGate, calibrate, choose_threshold, fit_probe
from .generate import Generation, generate, reply_loss
from .hooks import Intervention, Steering, edit, steer
from .judge import (
    REFUSAL_PHRASES,
    HarmBenchJudge,
    KeywordJudge,
    LlamaGuardJudge,
    Verdict,
    WildGuardJudge,
    judge_accuracy,
    make_judge,
)
from .prompts import PromptRecord, PromptSet, load_prompts, normalise_prompt, prompt_sources
from .stats import wilson_interval
from .tasks import CapabilityData, resolve_tasks

__all__ = [
    "Direction",
    "DirectionEdit",
    "fit_direction",
    "random_direction",
    "CapabilityData",
    "EvalSet",
    "FeatureGate",
    "GateCalibration",
    "Generation",
    "HarmBenchJudge",
    "Intervention",
    "KeywordJudge",
    "LlamaGuardJudge",
    "ProbeGate",
    "PromptRecord",
    "PromptSet",
    "REFUSAL_PHRASES",
    "Setting",
    "Steering",
    "Verdict",
    "WildGuardJudge",
    "calibrate",
    "choose_threshold",
    "edit",
    "evaluate_capability",
    "evaluate_refusal",
    "find_features",
    "fit_probe",
    "generate",
    "judge_accuracy",
    "load_prompts",
    "make_judge",
    "normalise_prompt",
    "prompt_sources",
    "reply_loss",
    "resolve_tasks",
    "steer",
    "wilson_interval",
    "write_table",
]


# The command handlers load jsonargparse and matplotlib, so they are imported on use.
def run_features(argv: list[str]) -> None:
    """``python -m saetrain features``."""
    from .commands import run_features as run

    run(argv)


def run_steer(argv: list[str]) -> None:
    """``python -m saetrain steer``."""
    from .commands import run_steer as run

    run(argv)


def run_eval_capability(argv: list[str]) -> None:
    """``python -m saetrain eval-capability``."""
    from .capability import run_eval_capability as run

    run(argv)
