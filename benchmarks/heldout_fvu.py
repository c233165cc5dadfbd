"""Held-out quality of an exported SAE on documents it never trained on.

    python benchmarks/heldout_fvu.py checkpoints/quickstart

Reads the SAE's own model, layer and data source from its ``cfg.json``, computes activations
the way training does (special tokens, position 0 and massive-activation outliers excluded) for
three document sets, and prints FVU, L0 and the fraction of latents that never fire:
the first ``--val-documents`` documents (held out only when the recipe's ``val_every`` is 1;
the quickstart's are every 50th document), the last ``--tail``
documents of the source, and every ``--stride``-th document from ``--from-doc`` on.
"""

from __future__ import annotations

import argparse

import torch

import saetrain
from saetrain.data.activations import ActivationProducer, pack_documents
from saetrain.data.lm import load_lm
from saetrain.data.sources import TextSource, iter_documents


def evaluate(sae, producer, tokenizer, docs, ctx_len: int, max_tokens: int) -> dict:
    chunks, n = [], 0
    for acts in producer(pack_documents(docs, tokenizer, ctx_len)):
        chunks.append(acts)
        n += len(acts)
        if n >= max_tokens:
            break
    x = torch.cat(chunks)[:max_tokens]  # (n, d_in)
    with torch.no_grad():
        out = sae(x)
    fired = torch.zeros(sae.cfg.num_latents, dtype=torch.bool)
    fired[out.latent_indices[out.latent_acts > 0]] = True
    fvu = (x - out.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return {
        "tokens": len(x),
        "fvu": round(float(fvu), 4),
        "l0": round(float((out.latent_acts > 0).sum(-1).float().mean()), 2),
        "unfired": round(1 - fired.float().mean().item(), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sae", help="exported SAE folder (cfg.json + sae.safetensors)")
    p.add_argument("--tokens", type=int, default=65536, help="activations per document set")
    p.add_argument("--val-documents", type=int, default=200)
    p.add_argument("--tail", type=int, default=400)
    p.add_argument("--from-doc", type=int, default=12000)
    p.add_argument("--stride", type=int, default=20)
    args = p.parse_args()

    sae = saetrain.load_sae(args.sae)
    meta = sae.cfg.extra
    model, tokenizer = load_lm(meta["model"])
    producer = ActivationProducer(
        model,
        tokenizer,
        meta["layer"],
        ctx_len=meta["ctx_len"],
        lm_batch_size=8,
        exclude_special_tokens=meta.get("exclude_special_tokens", True),
        exclude_first_position=meta.get("exclude_first_position", True),
        outlier_multiple=meta.get("outlier_multiple", 10.0),
    )
    docs = list(iter_documents(TextSource(**meta["data"]), tokenizer))
    sets = {
        f"first {args.val_documents}": docs[: args.val_documents],
        f"last {args.tail}": docs[-args.tail :],
        f"every {args.stride}th from {args.from_doc}": docs[args.from_doc :: args.stride],
    }
    print(f"{args.sae}: {len(docs)} documents, trained on {meta.get('tokens_seen')} tokens")
    for name, subset in sets.items():
        stats = evaluate(sae, producer, tokenizer, subset, meta["ctx_len"], args.tokens)
        print(f"  {name:32s} {stats}")


if __name__ == "__main__":
    main()
