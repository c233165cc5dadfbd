"""``python -m saetrain evaluate``: judge SAEs by what they do to the LM, on held-out text
(issue #22). The figures and their definitions are :mod:`saetrain.evals.quality`'s.

    python -m saetrain evaluate --sae checkpoints/quickstart
    python -m saetrain evaluate --sae "[checkpoints/quickstart, exports/qs-saelens]" --docs 100

By default the text is the SAE's own training corpus (``cfg.json`` ``extra.data``) past every
document it trained on (``extra.documents_read``), packed into ``docs`` sequences of the SAE's
``ctx_len`` tokens as in training; ``--data.path`` evaluates on another corpus (from its start,
or past ``--skip_documents``). Several SAEs of the same LM and layer (ours, SAELens' or
sparsify's, in any format ``load_sae`` reads) are measured on the same tokens in one run and
share the LM's clean and ablated passes.

Writes into ``out_dir``: ``eval.json`` (every figure, per SAE and scope, with its definition,
the tokens and documents used and the exclusions), ``summary.md``, and the resolved
``config.yaml``; prints the summary.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..data.sources import TextSource
from ..errors import UserError
from ..files import check_out_dir, staged_dir
from ..progress import format_duration, stage
from .quality import DEFINITIONS, SCOPES, TokenRules, finite, measure

SUMMARY_FIGURES = (
    "fvu",
    "l0",
    "unfired_fraction",
    "ce_clean",
    "ce_spliced",
    "loss_recovered_zero",
    "loss_recovered_mean",
    "delta_loss",
    "kl_spliced",
)


@dataclass
class EvaluateConfig:
    """Reconstruction and next-token figures of SAEs spliced into their LM, on held-out text."""

    sae: list[str] | str
    """SAE folders, checkpoints or Hub ids (any format load_sae reads), all of one LM and layer:
    a list, or one path."""
    names: list[str] | None = None
    """A label per SAE in the outputs; default: each folder's name."""
    model: str | None = None
    """The LM; default: the first SAE's cfg.json extra.model."""
    layer: int | None = None
    """Decoder layer the SAEs read; default: their cfg.json extra.layer (or hookpoint)."""
    data: TextSource | None = None
    """Text to evaluate on; default: the SAE's training corpus (cfg.json extra.data)."""
    skip_documents: int | None = None
    """Documents of that text passed over first; default: with the SAE's own corpus, every
    document it trained on (extra.documents_read), with data given, 0."""
    docs: int = 100
    """Held-out sequences of ctx_len tokens evaluated, packed from consecutive documents."""
    ctx_len: int | None = None
    """Tokens per sequence; default: the SAE's training ctx_len (else 256)."""
    batch_size: int = 4
    """Sequences per LM forward pass."""
    device: str = "cpu"
    """Where to run: cpu, cuda, cuda:1, ..."""
    lm_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    """dtype of the LM's weights; default: the one the SAE was trained with (extra.lm_dtype),
    else float32."""
    out_dir: str = "sae-evals/latest"
    """Where eval.json, summary.md and config.yaml go: a new or empty folder (see overwrite)."""
    overwrite: bool = False
    """Replace a non-empty out_dir (removed only once the new results are complete)."""

    def __post_init__(self) -> None:
        if isinstance(self.sae, str):
            self.sae = [self.sae]
        if not self.sae:
            raise UserError("sae is empty: give at least one SAE folder")
        if self.names is not None and len(self.names) != len(self.sae):
            raise UserError(f"names has {len(self.names)} labels for {len(self.sae)} SAEs")
        for name, value, least in (
            ("docs", self.docs, 1),
            ("batch_size", self.batch_size, 1),
            ("ctx_len", self.ctx_len, 2),
            ("skip_documents", self.skip_documents, 0),
        ):
            if value is not None and value < least:
                raise UserError(f"{name} must be >= {least}, got {value}")


def _layer(sae, path: str) -> int:
    extra = sae.cfg.extra or {}
    if extra.get("layer") is not None and not isinstance(extra["layer"], list):
        return int(extra["layer"])
    found = re.search(r"(?:layers|blocks|h)\.(\d+)", str(extra.get("hookpoint") or ""))
    if found:
        return int(found.group(1))
    raise UserError(f"the SAE {path} records no layer (cfg.json extra.layer): pass --layer")


def _labels(cfg: EvaluateConfig) -> list[str]:
    if cfg.names:
        labels = list(cfg.names)
    else:
        labels = [Path(p.rstrip("/")).name or p for p in cfg.sae]
    if len(set(labels)) != len(labels):  # the same folder name twice: number them
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    return labels


def load_saes(cfg: EvaluateConfig) -> dict[str, object]:
    """The SAEs by label, checked to share d_in and layer (before any LM loads)."""
    from ..sae import load_sae

    labels = _labels(cfg)
    saes = {label: load_sae(p, device=cfg.device) for label, p in zip(labels, cfg.sae, strict=True)}
    first_path, first = cfg.sae[0], next(iter(saes.values()))
    for sae, path in zip(saes.values(), cfg.sae, strict=True):
        if sae.cfg.d_in != first.cfg.d_in:
            raise UserError(
                f"the SAEs read different widths ({first_path}: d_in {first.cfg.d_in}, {path}: "
                f"{sae.cfg.d_in}): evaluate SAEs of one LM and layer together"
            )
        if cfg.layer is None and _layer(sae, path) != _layer(first, first_path):
            raise UserError(
                f"{path} reads layer {_layer(sae, path)} but {first_path} reads layer "
                f"{_layer(first, first_path)}: evaluate one layer per run, or pass --layer"
            )
        sae.eval()
    return saes


def _check_lm(model_id: str, layer: int, d_in: int) -> None:
    """d_in and layer against the LM's config (no weights read)."""
    from ..data.lm import check_layer_index, hidden_size, load_lm_config, num_layers

    config = load_lm_config(model_id)
    n_layers = num_layers(config)
    if n_layers is not None:
        check_layer_index(layer, n_layers, model_id)
    if hidden_size(config) != d_in:
        raise UserError(
            f"the SAE takes d_in={d_in} but {model_id} has hidden size {hidden_size(config)}: "
            "pass the model the SAE was trained on (--model)"
        )


def _source(cfg: EvaluateConfig, sae, path: str) -> tuple[TextSource, int, str]:
    """The text, the documents to pass over, and why that many."""
    extra = sae.cfg.extra or {}
    if cfg.data is not None:
        skip = cfg.skip_documents or 0
        return cfg.data, skip, f"the first {skip} documents passed over (--skip_documents)"
    data = extra.get("data") or {}
    if not data.get("path"):
        raise UserError(
            f"{path}/cfg.json names no training corpus (extra.data.path): pass --data.path "
            "(and --skip_documents if the SAE trained on its start)"
        )
    fields = TextSource.__dataclass_fields__
    source = TextSource(**{k: v for k, v in data.items() if k in fields})
    if cfg.skip_documents is not None:
        skip = cfg.skip_documents
        return source, skip, f"the first {skip} documents passed over (--skip_documents)"
    read = extra.get("documents_read")
    if read is None:
        raise UserError(
            f"{path}/cfg.json does not say how many documents of {source.path} the SAE trained "
            "on (extra.documents_read, recorded since issue #22): pass --skip_documents N past "
            "them, or --data.path with held-out text"
        )
    return source, int(read), f"past the {int(read)} documents the SAE trained on"


def held_out(
    source: TextSource, tokenizer, skip: int, sequences: int, ctx_len: int
) -> tuple[torch.Tensor, int]:
    """(sequences, ctx_len) token ids packed from ``source``'s documents after the first
    ``skip``, and how many documents were read; a one-line error when there are too few."""
    from ..data.activations import pack_documents
    from ..data.sources import iter_documents

    read = 0

    def counted():
        nonlocal read
        for doc in iter_documents(source, tokenizer, skip=skip):
            read += 1
            yield doc

    try:
        rows = list(itertools.islice(pack_documents(counted(), tokenizer, ctx_len), sequences))
    except UserError:  # the source says what is wrong with it, unless documents were skipped
        if not skip or read:
            raise
        rows = []
    if len(rows) < sequences:
        raise UserError(
            f"{source.path} past document {skip} gives {len(rows)} sequences of {ctx_len} tokens "
            f"({read} documents), fewer than docs={sequences}: lower --docs or --skip_documents, "
            "or give a longer corpus (--data.path)"
        )
    return torch.stack(rows), read


def _summary(report: dict) -> str:
    data = report["data"]
    lines = [
        f"# SAE evaluation: {report['model']}, layer {report['layer']}",
        "",
        f"{data['sequences']} sequences of {data['ctx_len']} tokens from {data['source']}, "
        f"documents {data['first_document']} to {data['last_document']} ({data['why']}). "
        f"Trained tokens leave out what training did: {report['exclusions']}.",
        "",
    ]
    for scope in SCOPES:
        tokens = report["saes"][0][scope]["tokens"]
        lines += [f"## {scope.replace('_', ' ')} ({tokens:,} tokens)", ""]
        lines.append("| SAE | " + " | ".join(SUMMARY_FIGURES) + " |")
        lines.append("|---|" + "---|" * len(SUMMARY_FIGURES))
        for entry in report["saes"]:
            row = [_fmt(entry[scope][f]) for f in SUMMARY_FIGURES]
            lines.append(f"| {entry['name']} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Definitions (per token; nats):", ""]
    lines += [f"- `{k}`: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"


def run_evaluate(argv: list[str]) -> None:
    """``python -m saetrain evaluate``: see the module docstring."""
    from ..data.lm import load_lm, pick_dtype
    from ..steering.commands import parse_config

    cfg, config_text = parse_config(EvaluateConfig, argv, "python -m saetrain evaluate")
    check_out_dir(cfg.out_dir, cfg.overwrite, inputs=cfg.sae)  # before anything loads
    saes = load_saes(cfg)
    first = next(iter(saes.values()))
    extra = first.cfg.extra or {}
    layer = cfg.layer if cfg.layer is not None else _layer(first, cfg.sae[0])
    model_id = cfg.model or extra.get("model")
    if not model_id:
        raise UserError(f"{cfg.sae[0]}/cfg.json names no model (extra.model): pass --model")
    _check_lm(model_id, layer, first.cfg.d_in)
    source, skip, why = _source(cfg, first, cfg.sae[0])
    ctx_len = cfg.ctx_len or int(extra.get("ctx_len") or 256)
    dtype_name = cfg.lm_dtype or extra.get("lm_dtype") or "float32"
    dtype = pick_dtype(dtype_name, torch.device(cfg.device))
    t0 = time.perf_counter()
    stage(f"loading the LM {model_id} on {cfg.device} in {str(dtype).removeprefix('torch.')}...")
    model, tokenizer = load_lm(model_id, dtype=dtype, device=cfg.device)
    ids, read = held_out(source, tokenizer, skip, cfg.docs, ctx_len)
    rules = TokenRules.of(first, tokenizer)
    stage(
        f"evaluating {len(saes)} SAE(s) on {ids.numel():,} tokens ({cfg.docs} sequences from "
        f"documents {skip} to {skip + read - 1}, {why})"
    )
    last = [time.perf_counter()]

    def progress(done: int, total: int) -> None:
        if done == total or time.perf_counter() - last[0] > 15:
            last[0] = time.perf_counter()
            stage(f"batch {done}/{total} ({format_duration(last[0] - t0)})")

    figures = measure(model, saes, ids, layer, rules, batch_size=cfg.batch_size, progress=progress)
    report = {
        "model": model_id,
        "layer": layer,
        "lm_dtype": str(dtype).removeprefix("torch."),
        "data": {
            "source": source.path,
            "first_document": skip,
            "last_document": skip + read - 1,
            "why": why,
            "sequences": cfg.docs,
            "ctx_len": ctx_len,
            "tokens": ids.numel(),
        },
        "exclusions": rules.describe(),
        "definitions": {
            **DEFINITIONS,
            "trained_tokens": "the tokens the SAE trains on (training's exclusions); only their "
            "activations are replaced, and only predictions at their positions count",
            "all_tokens": "every token replaced and every prediction counted (as SAELens does)",
        },
        "formulas_checked_against": "sae_lens/evals.py v6.18.0 (get_recons_loss, _kl, "
        "get_downstream_reconstruction_metrics)",
        "seconds": round(time.perf_counter() - t0, 1),
        "saes": [
            {
                "name": label,
                "path": path,
                "activation": saes[label].cfg.activation,
                "k": saes[label].cfg.k,
                "num_latents": saes[label].cfg.num_latents,
                "dead_fraction_training": (saes[label].cfg.extra or {}).get("dead_fraction"),
                **{
                    scope: {k: finite(v) for k, v in figures[label][scope].items()}
                    for scope in SCOPES
                },
            }
            for label, path in zip(saes, cfg.sae, strict=True)
        ],
    }
    summary = _summary(report)
    with staged_dir(cfg.out_dir, cfg.overwrite, inputs=list(cfg.sae)) as out:
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "summary.md").write_text(summary)
        (out / "config.yaml").write_text(config_text)
    print(summary, end="")
    print(f"saetrain evaluate: wrote {cfg.out_dir}/eval.json and summary.md", file=sys.stderr)
