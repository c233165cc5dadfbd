"""Each latent's activation distribution on a fixed sample of the SAE's training corpus: the
units steering strengths are given in, the same every time (issue 20).

Before, "1x max activation" was the largest activation on whichever prompts a ranking had
read: latent 6461 of the quickstart SAE got 26 from the 32 built-in prompts and 49.5 from the
shared sets, and the steering effect moved with it. Here the unit comes from the first
``documents`` documents of the corpus the SAE was trained on (its ``cfg.json`` names it), cut to
``ctx_len`` tokens, with the tokens training leaves out left out here too (special tokens, the
first position, massive-activation outliers). Per latent:

- ``fires``: tokens on which it is among the top k (its firing rate is fires / tokens);
- ``max``: its largest value;
- ``p999``: the 99.9th percentile of its nonzero values (lower nearest rank), robust to a
  single outlier where the max is not.

The statistics are computed once and stored beside the SAE as ``feature_stats.safetensors``
(with how they were made in its metadata), and reused while the sample is the same.

    stats = feature_stats(sae_dir, sae, model, tok, documents=200)
    unit = float(stats.p999[6461])
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor

from ..errors import UserError

log = logging.getLogger("saetrain")

FILE = "feature_stats.safetensors"
QUANTILE = 0.999


@dataclass
class FeatureStats:
    """Per-latent statistics over ``tokens`` tokens of a corpus sample (module docstring)."""

    fires: Tensor
    """(num_latents,) int64: tokens on which each latent is active."""
    max: Tensor
    """(num_latents,) float32: each latent's largest value (0 where it never fires)."""
    p999: Tensor
    """(num_latents,) float32: 99.9th percentile of each latent's nonzero values (0: never)."""
    tokens: int
    """Tokens read."""
    meta: dict
    """How the sample was drawn: source, documents, ctx_len, exclusions."""

    @property
    def firing_rate(self) -> Tensor:
        return self.fires.double() / max(self.tokens, 1)

    def unit(self, feature: int, kind: str) -> float:
        """The unit of strength ``kind`` (corpus_max or corpus_p999) of latent ``feature``."""
        return float((self.max if kind == "corpus_max" else self.p999)[feature])


def quantile_per_latent(values: Tensor, indices: Tensor, num_latents: int, q: float) -> Tensor:
    """(num_latents,) the lower nearest-rank ``q`` quantile of each latent's ``values`` (M,),
    grouped by ``indices`` (M,); 0 for latents with no value."""
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(indices[order], stable=True)]  # by latent, then by value
    counts = torch.bincount(indices, minlength=num_latents)  # (N,)
    starts = torch.cumsum(counts, 0) - counts
    rank = (q * (counts - 1).clamp_min(0).double()).floor().long()
    at = (starts + rank).clamp_max(max(values.numel() - 1, 0))
    out = values[order][at] if values.numel() else torch.zeros(num_latents)
    return torch.where(counts > 0, out, torch.zeros_like(out)).float()


@torch.no_grad()
def collect(
    model, tokenizer, sae, texts, *, layer: int, ctx_len: int = 256, batch_size: int = 8,
    outlier_multiple: float | None = 10.0,
) -> tuple[Tensor, Tensor, Tensor, int]:  # fmt: skip
    """(fires, max, p999, tokens) of ``sae``'s latents over ``texts`` (module docstring)."""
    from ..data.lm import residual_stream
    from .generate import pad_token_id
    from .hooks import usable_tokens

    n = sae.cfg.num_latents
    device = next(model.parameters()).device
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    values, indices, tokens = [], [], 0
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        enc = [
            tokenizer(t, add_special_tokens=True)["input_ids"][:ctx_len]
            for t in texts[start : start + batch_size]
        ]
        enc = [e for e in enc if e]
        if not enc:
            continue
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad_token_id(tokenizer), dtype=torch.long)
        real = torch.zeros((len(enc), width), dtype=torch.bool)
        for i, e in enumerate(enc):  # right padding: positions need no correction
            ids[i, : len(e)] = torch.tensor(e)
            real[i, : len(e)] = True
        acts = residual_stream(model, ids.to(device), [layer], real.long().to(device))[layer]
        acts = acts.cpu()
        keep = usable_tokens(
            acts, real, input_ids=ids, ignore_ids=special,
            positions=torch.arange(width).expand(len(enc), width),
            outlier_multiple=outlier_multiple,
        )  # fmt: skip
        x = acts[keep]  # (M, d)
        tokens += x.shape[0]
        if x.shape[0]:
            la, li = sae.encode(x.to(sae.device, sae.dtype))  # (M, k) each
            active = la > 0
            values.append(la[active].float().cpu())
            indices.append(li[active].cpu())
    if tokens == 0:
        raise UserError("the corpus sample gave no usable tokens: give more or longer documents")
    v, i = torch.cat(values), torch.cat(indices).long()
    fires = torch.bincount(i, minlength=n)
    mx = torch.zeros(n).scatter_reduce(0, i, v, reduce="amax", include_self=True)
    return fires, mx, quantile_per_latent(v, i, n, QUANTILE), tokens


def corpus_sample(sae, documents: int, source: str | None = None) -> tuple[object, dict]:
    """The text source to read (``source``, else the SAE's own training data from cfg.json)
    and a description of the sample, for the stored metadata."""
    from ..data.sources import TextSource

    data = dict(sae.cfg.extra.get("data") or {})
    if source is not None:
        data = {"path": source}
    if not data.get("path"):
        raise UserError(
            "the SAE's cfg.json names no training data (extra.data.path): give --stats_source "
            "(a corpus of the kind it was trained on)"
        )
    fields = TextSource.__dataclass_fields__
    src = TextSource(**{k: v for k, v in data.items() if k in fields})
    src.max_documents = documents
    return src, {"source": data["path"], "documents": documents}


def feature_stats(
    sae_dir: str | Path | None, sae, model, tokenizer, *, documents: int = 200,
    source: str | None = None, ctx_len: int | None = None, layer: int | None = None,
    batch_size: int = 8,
) -> FeatureStats:  # fmt: skip
    """The stored statistics of the SAE in ``sae_dir`` when they were made from the same sample,
    else computed now and stored there (see the module docstring)."""
    from ..data.sources import iter_documents
    from .hooks import sae_layer

    if documents < 1:
        raise UserError(f"the feature statistics need documents >= 1, got {documents}")
    src, meta = corpus_sample(sae, documents, source)
    meta.update(
        ctx_len=int(ctx_len or sae.cfg.extra.get("ctx_len") or 256),
        layer=sae_layer(sae) if layer is None else int(layer),
        model=sae.cfg.extra.get("model"),
        quantile=QUANTILE,
        excluded="special tokens, the first position, tokens over 10x the row's median norm",
    )
    path = Path(sae_dir) / FILE if sae_dir is not None else None
    if path is not None and path.is_file():
        try:
            stored = load(path)
        except UserError as e:  # a cache cut short or corrupt: measured again, written over
            log.warning("%s; measuring the statistics again", e)
            stored = None
        if (
            stored is not None
            and stored.meta.get("sample") == meta
            and stored.fires.numel() == sae.cfg.num_latents
        ):
            return stored
    texts = list(iter_documents(src, tokenizer))
    fires, mx, p999, tokens = collect(
        model, tokenizer, sae, texts, layer=meta["layer"], ctx_len=meta["ctx_len"],
        batch_size=batch_size,
    )  # fmt: skip
    stats = FeatureStats(
        fires, mx, p999, tokens, {"sample": meta, "tokens": tokens, "documents_read": len(texts)}
    )
    if path is not None:
        save(stats, path)
    return stats


def save(stats: FeatureStats, path: str | Path) -> Path:
    """Write ``stats`` to ``path`` (a safetensors file, the metadata as JSON in its header),
    through a temporary file renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {"fires": stats.fires.long(), "max": stats.max.float(), "p999": stats.p999.float()}
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(stats.meta)})
    tmp.replace(path)
    return path


def load(path: str | Path) -> FeatureStats:
    """Read statistics written by :func:`save` (a one-line error if the file is not whole)."""
    from ..files import open_safetensors

    with open_safetensors(path) as f:
        try:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            t = {k: f.get_tensor(k) for k in ("fires", "max", "p999")}
        except (json.JSONDecodeError, SafetensorError) as e:
            raise UserError(f"{path} is not a whole feature statistics file ({e})") from None
    return FeatureStats(t["fires"], t["max"], t["p999"], int(meta.get("tokens", 0)), meta)
