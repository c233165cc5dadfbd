"""Steering commands of ``python -m saetrain``: ``features`` and ``steer``, and what the
evaluation commands (``saetrain.evals.commands``, ``eval-capability``) share with them.

    python -m saetrain features --config configs/steering/features.yaml --sae checkpoints/quickstart
    python -m saetrain steer --sae checkpoints/quickstart --features [1234] --prompt "Hi there"

Each takes a YAML ``--config`` (what ``--print_config`` prints), dotted overrides
(``--harmful.limit 16``) and ``--help``; the model and layer default to the ones recorded in
the SAE's ``cfg.json``. ``features`` writes into ``out_dir`` together with the resolved
``config.yaml``; ``steer`` prints the baseline and steered replies side by side. Strengths are
multiples of a unit per feature (``strength_unit``): by default the 99.9th percentile of its
values on a fixed sample of the SAE's training corpus (:mod:`.feature_stats`), so the same
strength means the same push every time."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import UserError
from ..files import check_out_dir, read_json, staged_dir
from .evaluate import Setting
from .hooks import Intervention, Op, Positions
from .prompts import PromptSet, load_prompts

log = logging.getLogger("saetrain")

StrengthUnit = Literal["corpus_p999", "corpus_max", "max_activation", "absolute"]


@dataclass
class Target:
    """The SAE, the model it steers, and how to run it."""

    sae: str
    """Folder of the exported SAE (cfg.json + sae.safetensors)."""
    model: str | None = None
    """The LM: Hub id, folder, .gguf or package:// URI; default: the SAE's cfg.json extra.model."""
    layer: int | None = None
    """Decoder layer whose output the SAE reads; default: the SAE's cfg.json extra.layer."""
    device: str = "cpu"
    """Where to run: cpu, cuda, cuda:1, ..."""
    lm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Dtype of the LM's weights."""
    batch_size: int = 8
    """Prompts generated together (left-padded)."""
    max_new_tokens: int = 64
    """Length limit of each reply."""
    system: str | None = None
    """A system message put before every conversation."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise UserError(
                f"batch_size and max_new_tokens must be >= 1, got {self.batch_size}, "
                f"{self.max_new_tokens}"
            )


@dataclass
class SteeringSpec:
    """Which features to steer and how strongly."""

    features: list[int] = field(default_factory=list)
    """SAE latents to steer together (empty: baseline only)."""
    op: Op = "clamp"
    """clamp (keeps the SAE error), add, or ablate."""
    strength_unit: StrengthUnit = "corpus_p999"
    """Strength as multiples of each feature's 99.9th percentile (corpus_p999) or largest value
    (corpus_max) on a fixed sample of the SAE's training corpus (saetrain.steering.feature_stats:
    computed once, stored beside the SAE), or of its largest activation on refusal text
    (max_activation: from features_table, else the built-in refusals), or as the clamp value /
    add coefficient itself (absolute)."""
    features_table: str | None = None
    """features.json of `saetrain features` to read each feature's max_pos from; eval-refusal
    also checks the prompt sets it records (fitted_on) against the ones it evaluates."""
    positions: Positions = "all"
    """Tokens to steer: all, prompt, or generated."""
    stats_documents: int = 200
    """Documents of the SAE's training corpus the corpus_* units are measured on."""
    stats_source: str | None = None
    """Another corpus for the corpus_* units (default: the one in the SAE's cfg.json)."""

    def __post_init__(self) -> None:
        if any(f < 0 for f in self.features):
            raise UserError(f"features must be latent ids >= 0, got {self.features}")
        if self.stats_documents < 1:
            raise UserError(f"stats_documents must be >= 1, got {self.stats_documents}")
        if hasattr(super(), "__post_init__"):
            super().__post_init__()


@dataclass
class FeaturesConfig(Target):
    """Rank SAE latents as refusal features (see saetrain.steering.features)."""

    harmful: PromptSet = field(default_factory=lambda: PromptSet("builtin:harmful"))
    """Prompts the model should refuse."""
    harmless: PromptSet = field(default_factory=lambda: PromptSet("builtin:harmless"))
    """Prompts it should answer."""
    methods: list[Literal["response", "contrast", "effect"]] = field(
        default_factory=lambda: ["response", "contrast"]
    )
    """Rankings to compute: response (refusal tokens), contrast (prompts), effect (steering)."""
    top_n: int = 20
    """Latents kept per ranking."""
    rank_by: Literal["diff", "effect_size"] = "diff"
    """Order of the response and contrast rankings: mean difference or Cohen's d."""
    contexts: int = 5
    """Top-activating token contexts shown per latent."""
    min_refusals: int = 4
    """Below this many refusals of its own, the model gets built-in refusals teacher-forced."""
    effect_candidates: int = 5
    """Candidates (best of the other rankings) steered by the effect method."""
    effect_strength: float = 2.0
    """Clamp at this multiple of each candidate's effect_unit."""
    effect_unit: Literal["corpus_p999", "corpus_max", "max_activation"] = "corpus_p999"
    """Unit of effect_strength per candidate: its 99.9th percentile or largest value on the
    SAE's corpus sample (as eval-refusal and steer), or its largest activation on these
    ranking prompts (moves with the prompts)."""
    stats_documents: int = 200
    """Documents of the SAE's corpus sample behind the corpus units (see SteeringSpec)."""
    stats_source: str | None = None
    """Corpus of that sample; null: the SAE's own training data (see SteeringSpec)."""
    effect_prompts: int = 8
    """Harmful and harmless validation prompts per candidate."""
    judge: str = "keyword"
    """Refusal judge: keyword, or a classifier's Hub id or folder."""
    judge_kind: Literal["auto", "wildguard", "llama_guard", "harmbench"] = "auto"
    """Prompt format of a model judge; auto goes by its name."""
    out_dir: str = "steering/features"
    """Where features.json, features.txt and config.yaml go: a new or empty folder, written
    whole at the end (see overwrite)."""
    overwrite: bool = False
    """Replace a non-empty out_dir (removed only once the new results are complete)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stats_documents < 1:
            raise UserError(f"stats_documents must be >= 1, got {self.stats_documents}")


@dataclass
class SteerConfig(SteeringSpec, Target):
    """Answer one prompt with and without steering."""

    prompt: str = "Can you tell me how to bake bread?"
    """The user message."""
    strength: float = 2.0
    """Steering strength (see strength_unit)."""
    width: int = 0
    """Width of the side-by-side view; 0 uses the terminal's."""


def _parser(config_cls: type, prog: str):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, description=config_cls.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these options.")
    parser.add_class_arguments(config_cls)
    return parser


def parse_config(config_cls: type, argv: list[str], prog: str) -> tuple[Any, str]:
    """The typed config of ``argv`` and its resolved YAML (``--help``/``--print_config`` exit).

    The YAML is written from the config itself (every value, defaults included), which
    ``--config`` reads back: jsonargparse's own dump cannot write the prompt sets in a nested
    default such as ``gate``'s."""
    print_config = "--print_config" in argv
    argv = [a for a in argv if a != "--print_config"]
    parser = _parser(config_cls, prog)
    ns = parser.parse_args(argv)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    init = instantiate(ns)
    cfg = config_cls(**{f.name: init[f.name] for f in dataclasses.fields(config_cls)})
    text = config_yaml(cfg)
    if print_config:
        print(text, end="")
        raise SystemExit(0)
    return cfg, text


def config_yaml(cfg) -> str:
    """A dataclass config as YAML that ``--config`` reads back."""
    import yaml

    plain = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples become lists
    return yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)


def _load(cfg: Target):
    from ..data.lm import hidden_size, load_lm, pick_dtype
    from ..sae import load_sae
    from .hooks import sae_layer

    sae = load_sae(cfg.sae, device=cfg.device)
    check_features(list(getattr(cfg, "features", None) or []), sae)  # before the LM loads
    for arm in getattr(cfg, "arms", None) or []:  # eval-refusal's arms may name their own
        check_features(list(arm.features or []), sae, f"arm {arm.label}: features")
    model_id = cfg.model or sae.cfg.extra.get("model")
    if not model_id:
        raise UserError(f"{cfg.sae}/cfg.json names no model (extra.model): pass --model")
    if cfg.layer is None:
        cfg.layer = sae_layer(sae)
    dtype = pick_dtype(cfg.lm_dtype, torch.device(cfg.device))
    model, tokenizer = load_lm(model_id, dtype=dtype, device=cfg.device)
    if hidden_size(model.config) != sae.cfg.d_in:
        raise UserError(
            f"the SAE takes d_in={sae.cfg.d_in} but {model_id} has hidden size "
            f"{hidden_size(model.config)}: pass the model the SAE was trained on"
        )
    return sae, model, tokenizer


def check_features(features: list[int], sae, what: str = "features") -> None:
    """A one-line error for latent ids the SAE does not have, before any LM pass."""
    bad = [f for f in features if not 0 <= f < sae.cfg.num_latents]
    if bad:
        raise UserError(
            f"{what} {bad} do not exist: the SAE has {sae.cfg.num_latents} latents (ids 0 to "
            f"{sae.cfg.num_latents - 1})"
        )


def _units(cfg, sae, model, tokenizer, features: list[int] | None = None) -> list[float]:
    """Per-feature unit of strength (see ``SteeringSpec.strength_unit``); 1 for absolute."""
    features = list(cfg.features if features is None else features)
    if cfg.strength_unit == "absolute" or cfg.op == "ablate":
        return [1.0] * len(features)
    if cfg.strength_unit in ("corpus_p999", "corpus_max"):
        stats = corpus_stats(cfg, sae, model, tokenizer)
        units = [stats.unit(f, cfg.strength_unit) for f in features]
        silent = [f for f, u in zip(features, units, strict=True) if u <= 0]
        if silent:
            raise UserError(
                f"features {silent} never fire on the {stats.tokens} tokens of the corpus "
                f"sample, so they have no {cfg.strength_unit} unit: use strength_unit: absolute"
            )
        return units
    if cfg.features_table:
        known = _max_positions(cfg.features_table)
        missing = [f for f in features if f not in known]
        if missing:
            raise UserError(
                f"features {missing} are not in {cfg.features_table}: use features from it, "
                "or strength_unit: absolute"
            )
        return [float(known[f]) for f in features]
    from .features import refusal_max_activations

    units = refusal_max_activations(
        model, tokenizer, sae, features, layer=cfg.layer, batch_size=cfg.batch_size
    )
    silent = [f for f, u in zip(features, units, strict=True) if u <= 0]
    if silent:
        raise UserError(
            f"features {silent} never fire on the built-in refusal replies, so they have no "
            "max_activation unit: pass features_table, or strength_unit: absolute"
        )
    return units


def _max_positions(path: str) -> dict[int, float]:
    """Each feature's largest activation on refusal text, from a features.json."""
    what = "give the features.json written by `saetrain features`"
    table = read_json(path, "features_table", what)
    try:
        return {r["feature"]: r["max_pos"] for m in table["methods"].values() for r in m["rows"]}
    except (KeyError, TypeError, AttributeError):
        raise UserError(
            f"features_table {path} has no methods with rows of feature and max_pos: {what}"
        ) from None


def corpus_stats(cfg, sae, model, tokenizer):
    """The SAE's feature statistics on its corpus sample (stored beside it once computed)."""
    from .feature_stats import feature_stats

    sae_dir = Path(cfg.sae) if Path(cfg.sae).is_dir() else None
    return feature_stats(
        sae_dir, sae, model, tokenizer, documents=cfg.stats_documents, source=cfg.stats_source,
        layer=cfg.layer, batch_size=cfg.batch_size,
    )  # fmt: skip


def _interventions(cfg, units: list[float], strength: float) -> list[Intervention]:
    values = [strength * u for u in units]
    return [Intervention(list(cfg.features), cfg.op, values, positions=cfg.positions)]


def _settings(cfg, units: list[float], gate) -> list[Setting]:
    """The baseline, then for each strength the steered setting (unless a gate is given and
    ``gate.compare_ungated`` is off) and the gated one."""
    settings = [Setting("baseline")]
    for s in cfg.strengths:
        ivs = _interventions(cfg, units, s)
        if gate is None or cfg.gate.compare_ungated:
            settings.append(Setting(f"{cfg.op} x{s:g}", ivs, strength=s, series="steered"))
        if gate is not None:
            settings.append(Setting(f"{cfg.op} x{s:g} gated", ivs, gate, s, series="gated"))
    return settings


def run_features(argv: list[str]) -> None:
    """``python -m saetrain features``: rank refusal features, write features.json/.txt."""
    from .features import find_features, write_table
    from .judge import make_judge

    cfg, yaml = parse_config(FeaturesConfig, argv, "saetrain features")
    check_out_dir(cfg.out_dir, cfg.overwrite, inputs=[cfg.sae])  # before the LM loads
    harmful, harmless = load_prompts(cfg.harmful), load_prompts(cfg.harmless)
    sae, model, tokenizer = _load(cfg)
    effect_unit = None
    if "effect" in cfg.methods and cfg.effect_unit != "max_activation":
        stats = corpus_stats(cfg, sae, model, tokenizer)
        effect_unit = (cfg.effect_unit, lambda f: stats.unit(f, cfg.effect_unit))
    table = find_features(
        model,
        tokenizer,
        sae,
        harmful,
        harmless,
        methods=cfg.methods,
        layer=cfg.layer,
        top_n=cfg.top_n,
        rank_by=cfg.rank_by,
        contexts=cfg.contexts,
        judge=make_judge(cfg.judge, kind=cfg.judge_kind, device=cfg.device),
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        min_refusals=cfg.min_refusals,
        effect_candidates=cfg.effect_candidates,
        effect_strength=cfg.effect_strength,
        effect_prompts=cfg.effect_prompts,
        effect_unit=effect_unit,
    )
    table.update(sae=cfg.sae, model=cfg.model or sae.cfg.extra.get("model"))
    # The sets the ranking was fitted on, as their specs: eval-refusal reloads them and refuses
    # to evaluate on any of their prompts (issue 20).
    table["fitted_on"] = {
        "harmful": dataclasses.asdict(cfg.harmful),
        "harmless": dataclasses.asdict(cfg.harmless),
    }
    with staged_dir(cfg.out_dir, cfg.overwrite, inputs=[cfg.sae]) as staged:
        (staged / "config.yaml").write_text(yaml)
        write_table(table, staged)
    out = Path(cfg.out_dir)
    print((out / "features.txt").read_text())
    print(f"saetrain features: wrote {out / 'features.json'} and {out / 'features.txt'}")


def side_by_side(left: str, right: str, width: int, titles=("baseline", "steered")) -> str:
    """Two texts in columns of ``width`` characters in all."""
    col = max(20, (width - 3) // 2)
    a = [titles[0], "-" * col] + [
        x for p in left.splitlines() or [""] for x in textwrap.wrap(p, col) or [""]
    ]
    b = [titles[1], "-" * col] + [
        x for p in right.splitlines() or [""] for x in textwrap.wrap(p, col) or [""]
    ]
    rows = itertools.zip_longest(a, b, fillvalue="")
    return "\n".join(f"{x:<{col}} | {y}" for x, y in rows)


def run_steer(argv: list[str]) -> None:
    """``python -m saetrain steer``: one prompt, baseline and steered replies side by side."""
    from .generate import generate

    cfg, _ = parse_config(SteerConfig, argv, "saetrain steer")
    if not cfg.features:
        raise UserError("steer needs --features, e.g. --features [1234] (from `saetrain features`)")
    sae, model, tokenizer = _load(cfg)
    ivs = _interventions(cfg, _units(cfg, sae, model, tokenizer), cfg.strength)
    kw = dict(max_new_tokens=cfg.max_new_tokens, system=cfg.system)
    base = generate(model, tokenizer, [cfg.prompt], **kw)[0].response
    steered = generate(
        model, tokenizer, [cfg.prompt], sae=sae, interventions=ivs, layer=cfg.layer, **kw
    )[0].response
    values = ivs[0].values(torch.device("cpu")).tolist()
    how = ", ".join(f"{f}->{v:.3g}" for f, v in zip(cfg.features, values, strict=True))
    width = cfg.width or shutil.get_terminal_size((100, 20)).columns
    print(f"prompt: {cfg.prompt}\n")
    print(side_by_side(base, steered, width, ("baseline", f"steered ({cfg.op} {how})")))
