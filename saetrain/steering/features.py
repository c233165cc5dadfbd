"""Find refusal features: rank SAE latents three ways and write the table as JSON and text.

    table = find_features(model, tok, sae, harmful, harmless, methods=("response", "contrast"))
    write_table(table, "out/features")   # features.json + features.txt

- ``response`` (O'Brien et al. 2024): let the model answer the harmful prompts, keep the
  replies the judge calls refusals, and rank latents by their mean activation on the refusal's
  tokens minus their mean on the model's replies to harmless prompts. A model that refuses
  fewer than ``min_refusals`` prompts gets the built-in refusal replies teacher-forced after
  the harmful prompts instead (the table records which).
- ``contrast``: rank latents by mean activation over the harmful prompts' tokens minus the
  harmless prompts', with Cohen's d and how often each fires in either set.
- ``effect``: clamp each of the best candidates of the other rankings on a few validation
  prompts and rank them by the rise in refusal on harmful prompts (the rise on harmless ones
  is reported beside it, with a fluency score).

Statistics skip the first position, special and chat-template tokens, and massive-activation
tokens (latent values there are 100x the usual and picked useless features; issue #5). Each
row keeps the latent's largest activation on the positive side (``max_pos``) and the token
contexts where it fires most. ``effect`` clamps at ``effect_strength`` times a unit per latent:
``max_pos`` by default, or (``effect_unit``, as ``saetrain features`` does) the latent's 99.9th
percentile on the SAE's corpus sample, which does not move with the ranking prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data.lm import residual_stream
from ..errors import UserError
from . import builtin
from .generate import generate, pad_token_id, render
from .hooks import Intervention, sae_layer, usable_tokens
from .judge import KeywordJudge
from .prompts import PromptRecord
from .stats import cohens_d, distinct_n


@dataclass
class Doc:
    """A token sequence and the range of its tokens that counts."""

    ids: list[int]
    span: tuple[int, int]


@dataclass
class CodedDoc:
    """The SAE codes of a document's usable tokens."""

    ids: list[int]
    positions: Tensor  # (n,) token positions that were kept
    latent_acts: Tensor  # (n, k)
    latent_indices: Tensor  # (n, k)


def prompt_doc(tokenizer, prompt: str | list[str]) -> Doc:
    """The chat-formatted prompt (with generation prompt); every token counts."""
    turns = [prompt] if isinstance(prompt, str) else prompt
    ids = render(tokenizer, [{"role": "user", "content": t} for t in turns])
    return Doc(ids, (0, len(ids)))


def reply_doc(tokenizer, prompt: str, reply: str) -> Doc:
    """The prompt followed by ``reply``; only the reply's tokens count."""
    p = render(tokenizer, [{"role": "user", "content": prompt}])
    r = tokenizer(reply, add_special_tokens=False)["input_ids"]
    return Doc(p + r, (len(p), len(p) + len(r)))


@torch.no_grad()
def encode_docs(
    model, tokenizer, sae, docs: Sequence[Doc], *, layer=None, batch_size=8, outlier_multiple=10.0
) -> list[CodedDoc]:
    """Run the LM up to ``layer`` on ``docs`` and encode their usable span tokens."""
    layer = sae_layer(sae) if layer is None else layer
    device = next(model.parameters()).device
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    coded = []
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        width = max(len(d.ids) for d in chunk)
        ids = torch.full((len(chunk), width), pad_token_id(tokenizer), dtype=torch.long)
        keep = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, d in enumerate(chunk):  # right padding: positions need no correction
            ids[i, : len(d.ids)] = torch.tensor(d.ids)
            keep[i, d.span[0] : d.span[1]] = True
        mask = (torch.arange(width) < torch.tensor([len(d.ids) for d in chunk])[:, None]).long()
        acts = residual_stream(model, ids.to(device), [layer], mask.to(device))[layer].cpu()
        positions = torch.arange(width).expand(len(chunk), width)
        keep = usable_tokens(
            acts,
            keep,
            input_ids=ids,
            ignore_ids=special,
            positions=positions,
            outlier_multiple=outlier_multiple,
        )
        for i, d in enumerate(chunk):
            pos = keep[i].nonzero().flatten()
            la, li = sae.encode(acts[i, pos].to(sae.device, sae.dtype))
            coded.append(CodedDoc(d.ids, pos, la.float().cpu(), li.cpu()))
    return coded


def pooled(coded: Sequence[CodedDoc], num_latents: int) -> tuple[Tensor, Tensor]:
    """Per-document mean and max of every latent over its usable tokens, each (P, N)."""
    means = torch.zeros(len(coded), num_latents)
    maxes = torch.zeros(len(coded), num_latents)
    for i, c in enumerate(coded):
        if c.latent_acts.numel() == 0:
            continue
        idx, val = c.latent_indices.flatten(), c.latent_acts.flatten()
        means[i].index_add_(0, idx, val).div_(c.latent_acts.shape[0])
        maxes[i].scatter_reduce_(0, idx, val, reduce="amax")
    return means, maxes


def contrast(
    pos: Sequence[CodedDoc], neg: Sequence[CodedDoc], num_latents: int, *, top_n=20, rank_by="diff"
) -> list[dict]:
    """Latents that are more active on ``pos`` than on ``neg``, best first."""
    if not pos or not neg:
        raise UserError("ranking features needs documents on both sides (positive and negative)")
    mean_p, max_p = pooled(pos, num_latents)
    mean_n, max_n = pooled(neg, num_latents)
    diff = mean_p.mean(0) - mean_n.mean(0)  # (N,)
    d = cohens_d(mean_p, mean_n)
    key = {"diff": diff, "effect_size": d}[rank_by]
    key = torch.where(max_p.amax(0) > 0, key, torch.full_like(key, -float("inf")))
    order = key.argsort(descending=True)[:top_n]
    return [
        {
            "feature": int(f),
            "diff": float(diff[f]),
            "effect_size": float(d[f]),
            "mean_pos": float(mean_p[:, f].mean()),
            "mean_neg": float(mean_n[:, f].mean()),
            "freq_pos": float((max_p[:, f] > 0).float().mean()),
            "freq_neg": float((max_n[:, f] > 0).float().mean()),
            "max_pos": float(max_p[:, f].max()),
        }
        for f in order.tolist()
        if key[f] > -float("inf")
    ]


def refusal_max_activations(
    model, tokenizer, sae, features: Sequence[int], *, layer=None, batch_size=8
) -> list[float]:
    """Each feature's largest activation on the built-in refusal replies, teacher-forced after
    the built-in harmful prompts: the unit of clamp strength when no feature table is given."""
    refusals = builtin.REFUSALS
    docs = [
        reply_doc(tokenizer, p, refusals[i % len(refusals)])
        for i, (_, p) in enumerate(builtin.harmful_prompts())
    ]
    coded = encode_docs(model, tokenizer, sae, docs, layer=layer, batch_size=batch_size)
    maxes = pooled(coded, sae.cfg.num_latents)[1].amax(0)  # (N,)
    return [float(maxes[f]) for f in features]


def top_contexts(coded: Sequence[CodedDoc], tokenizer, feature: int, *, n=5, window=8) -> list[str]:
    """The ``n`` tokens where ``feature`` is largest, each with ``window`` tokens either side;
    the token itself is marked «like this» and followed by the value."""
    hits = []
    for c in coded:
        vals = (c.latent_acts * (c.latent_indices == feature)).sum(1)  # (n_tokens,)
        for j in vals.nonzero().flatten().tolist():
            hits.append((float(vals[j]), c, int(c.positions[j])))
    hits.sort(key=lambda h: -h[0])
    out = []
    for value, c, p in hits[:n]:
        before = tokenizer.decode(c.ids[max(0, p - window) : p])
        after = tokenizer.decode(c.ids[p + 1 : p + 1 + window])
        text = f"{before}«{tokenizer.decode(c.ids[p : p + 1])}»{after}".replace("\n", "\\n")
        out.append(f"{value:.3g}: {text}")
    return out


def response_docs(
    model, tokenizer, harmful, harmless, *, judge, max_new_tokens=48, batch_size=8, min_refusals=4
) -> tuple[list[Doc], list[Doc], dict]:
    """Documents for the ``response`` method: refusal replies vs replies to harmless prompts."""
    gens = generate(
        model,
        tokenizer,
        [r.prompt for r in harmful],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    verdicts = judge.judge([g.prompt for g in gens], [g.response for g in gens])
    refused = [(g.prompt, g.response) for g, v in zip(gens, verdicts, strict=True) if v.refused]
    info = {"refused": len(refused), "harmful_prompts": len(harmful), "source": "generated"}
    if len(refused) < min_refusals:
        # The model refuses too rarely to learn from its own refusals: teacher-force ours.
        refusals = builtin.REFUSALS
        refused = [(r.prompt, refusals[i % len(refusals)]) for i, r in enumerate(harmful)]
        info["source"] = "teacher_forced"
    answers = generate(
        model,
        tokenizer,
        [r.prompt for r in harmless],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    answer_verdicts = judge.judge([a.prompt for a in answers], [a.response for a in answers])
    answered = [
        a for a, v in zip(answers, answer_verdicts, strict=True) if a.response and not v.refused
    ]
    pos = [reply_doc(tokenizer, p, r) for p, r in refused]
    neg = [reply_doc(tokenizer, g.prompt, g.response) for g in answered]
    return pos, neg, info


def refusal_rate(model, tokenizer, prompts, judge, **kwargs) -> tuple[float, list[str]]:
    gens = generate(model, tokenizer, prompts, **kwargs)
    verdicts = judge.judge([g.prompt for g in gens], [g.response for g in gens])
    return sum(bool(v.refused) for v in verdicts) / max(len(gens), 1), [g.response for g in gens]


def effect_ranking(
    model,
    tokenizer,
    sae,
    candidates: Sequence[dict],
    harmful,
    harmless,
    *,
    judge,
    strength=2.0,
    max_new_tokens=32,
    batch_size=8,
    layer=None,
    unit: Callable[[int], float] | None = None,
) -> list[dict]:
    """Clamp each candidate at ``strength * unit(feature)`` (``unit``: by default the largest
    activation the ranking saw, ``max_pos``) and rank by the rise in refusal."""
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    base_h, _ = refusal_rate(model, tokenizer, harmful, judge, **kw)
    base_s, _ = refusal_rate(model, tokenizer, harmless, judge, **kw)
    rows = []
    for cand in candidates:
        u = unit(cand["feature"]) if unit else 0.0
        u = u if u > 0 else cand["max_pos"]  # a latent silent on the corpus sample: its max
        value = strength * u
        iv = [Intervention([cand["feature"]], "clamp", value)]
        steer_kw = dict(kw, sae=sae, interventions=iv, layer=layer)
        rate_h, texts = refusal_rate(model, tokenizer, harmful, judge, **steer_kw)
        rate_s, _ = refusal_rate(model, tokenizer, harmless, judge, **steer_kw)
        rows.append(
            {
                **cand,
                "unit_value": u,
                "clamp_value": value,
                "refusal_harmful": rate_h,
                "refusal_harmless": rate_s,
                "rise_harmful": rate_h - base_h,
                "rise_harmless": rate_s - base_s,
                "distinct_2": distinct_n(texts, 2),
            }
        )
    rows.sort(key=lambda r: (-r["rise_harmful"], r["rise_harmless"]))
    return rows


def find_features(
    model,
    tokenizer,
    sae,
    harmful: Sequence[PromptRecord],
    harmless: Sequence[PromptRecord],
    *,
    methods: Sequence[str] = ("response", "contrast"),
    layer: int | None = None,
    top_n: int = 20,
    rank_by: str = "diff",
    contexts: int = 5,
    judge=None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    min_refusals: int = 4,
    effect_candidates: int = 5,
    effect_strength: float = 2.0,
    effect_prompts: int = 8,
    effect_unit: tuple[str, Callable[[int], float]] | None = None,
) -> dict:
    """Rank latents by each of ``methods`` (see the module docstring); a JSON-ready dict."""
    unknown = set(methods) - {"response", "contrast", "effect"}
    if unknown or not methods:
        raise UserError(f"methods must be among response, contrast, effect; got {list(methods)}")
    judge = judge or KeywordJudge()
    layer = sae_layer(sae) if layer is None else layer
    enc = dict(layer=layer, batch_size=batch_size)
    n = sae.cfg.num_latents
    table: dict = {"layer": layer, "num_latents": n, "methods": {}}
    for method in [m for m in ("response", "contrast") if m in methods or "effect" in methods]:
        if method == "response":
            pos, neg, info = response_docs(
                model,
                tokenizer,
                harmful,
                harmless,
                judge=judge,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                min_refusals=min_refusals,
            )
        else:
            pos = [prompt_doc(tokenizer, r.input) for r in harmful]
            neg = [prompt_doc(tokenizer, r.input) for r in harmless]
            info = {"harmful_prompts": len(pos), "harmless_prompts": len(neg)}
        cpos = encode_docs(model, tokenizer, sae, pos, **enc)
        cneg = encode_docs(model, tokenizer, sae, neg, **enc)
        rows = contrast(cpos, cneg, n, top_n=top_n, rank_by=rank_by)
        for row in rows:
            row["contexts"] = top_contexts(cpos + cneg, tokenizer, row["feature"], n=contexts)
        if method in methods:
            table["methods"][method] = {**info, "rank_by": rank_by, "rows": rows}
        table.setdefault("_candidates", []).extend(rows[:effect_candidates])
    candidates = {}
    for row in table.pop("_candidates", []):
        candidates.setdefault(row["feature"], row)
    if "effect" in methods:
        val_h = [r.input for r in harmful[:effect_prompts]]
        val_s = [r.input for r in harmless[:effect_prompts]]
        rows = effect_ranking(
            model,
            tokenizer,
            sae,
            list(candidates.values())[:effect_candidates],
            val_h,
            val_s,
            judge=judge,
            strength=effect_strength,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            layer=layer,
            unit=effect_unit[1] if effect_unit else None,
        )
        table["methods"]["effect"] = {
            "strength": effect_strength,
            "unit": effect_unit[0] if effect_unit else "max_activation",
            "prompts": len(val_h),
            "rows": rows,
        }
    return table


COLUMNS = (
    "feature",
    "diff",
    "effect_size",
    "mean_pos",
    "mean_neg",
    "freq_pos",
    "freq_neg",
    "max_pos",
    "rise_harmful",
    "rise_harmless",
    "distinct_2",
)


def format_table(table: dict) -> str:
    """The ranking of every method as plain-text tables, each latent's contexts below it."""
    lines = [f"layer {table['layer']}, {table['num_latents']} latents"]
    for method, result in table["methods"].items():
        info = ", ".join(f"{k}={v}" for k, v in result.items() if k != "rows")
        lines += ["", f"== {method} ({info})"]
        cols = [c for c in COLUMNS if result["rows"] and c in result["rows"][0]]
        lines.append("rank " + " ".join(f"{c:>13}" for c in cols))
        for rank, row in enumerate(result["rows"], 1):
            cells = [f"{row[c]:>13d}" if c == "feature" else f"{row[c]:>13.4g}" for c in cols]
            lines.append(f"{rank:>4} " + " ".join(cells))
            lines += [f"       {ctx}" for ctx in row.get("contexts", [])]
    return "\n".join(lines) + "\n"


def write_table(table: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``features.json`` and ``features.txt`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "features.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "features.txt").write_text(format_table(table))
    return out / "features.json", out / "features.txt"
