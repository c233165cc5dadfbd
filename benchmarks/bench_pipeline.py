"""Tokens/second of the training pipeline, side by side in one run (issue #3's benchmark).

    python benchmarks/bench_pipeline.py                      # the quickstart model and data
    python benchmarks/bench_pipeline.py --steps 30 --batch 4096
    python benchmarks/bench_pipeline.py --recipe recipes/tiny.yaml --model DIR --source FILE \
        --batch 128                                          # a smoke test on a tiny model

Rows (activations trained on per second, after a warm-up):
  (a) LM forward alone: packing + the truncated forward + exclusions (ActivationProducer);
      SAE step alone: SAEModule's training step on cached activations, no LM;
  (b) live fit, one SAE: the whole Lightning loop (stream, shuffle buffer, step);
  (c) live fit, 4 SAEs from the same forward pass (4 variants at the hooked layer);
  (d) fit from an activation cache written first (no LM).
and the ratios the issue sets targets for: (b) / the rate implied by adding (a)'s LM time and
the SAE step time (>= 0.85), (c)'s time per token / (b)'s (<= 1.5), (d) / (b) (>= 5).

The shuffle buffer is 4 batches (not the quickstart's 32) so the first batch comes quickly;
everything else is the quickstart recipe's. Run it on a quiet machine: other work only adds
time, so each row is the best of --rounds runs.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from saetrain.data.activations import pack_documents
from saetrain.data.cache import CacheReader, write_cache
from saetrain.data.datamodule import ActivationDataModule
from saetrain.data.sources import TextSource
from saetrain.module import SAEModule

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(Callback):
    """Wall time from the end of step ``skip`` to the end of the last step."""

    def __init__(self, skip: int):
        self.skip, self.start, self.end, self.steps = skip, None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps = trainer.global_step
        if self.steps == self.skip:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


RECIPE = ROOT / "recipes" / "quickstart.yaml"


def recipe() -> dict:
    return yaml.safe_load(RECIPE.read_text())


def make_data(args, **overrides) -> ActivationDataModule:
    data = dict(recipe()["data"])
    source = TextSource(**{**data.pop("source"), **({"path": args.source} if args.source else {})})
    if args.model:
        data["model"] = args.model
    data.update(batch_size=args.batch, buffer_size=4 * args.batch, val_documents=0)
    data.update(overrides)
    return ActivationDataModule(source=source, **data)


def make_module(d_in: int, variants: list[dict] | None = None) -> SAEModule:
    model = dict(recipe()["model"])
    return SAEModule(d_in=d_in, sae_variants=variants, **model)


def timed_fit(args, module: SAEModule, **data) -> float:
    """Activations per second of ``trainer.fit(module, **data)`` between step ``warmup`` and
    the last step (no logging, checkpoints or validation)."""
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        limit_val_batches=0,
    )
    trainer.fit(module, **data)
    return args.steps * args.batch / (timer.end - timer.start)


def fit_rate(args, dm: ActivationDataModule, module: SAEModule) -> float:
    """Activations per second of `fit` between step `warmup` and the last step."""
    return timed_fit(args, module, datamodule=dm)


def lm_rate(dm: ActivationDataModule, tokens: int) -> float:
    """Kept activations per second of packing + the LM forward alone."""
    seqs = pack_documents(dm.documents("train"), dm.tokenizer, dm.hparams.ctx_len)
    chunks = dm.producer(seqs)
    next(chunks)  # warm-up
    start, done = time.perf_counter(), 0
    for chunk in chunks:
        done += chunk.shape[0]
        if done >= tokens:
            break
    return done / (time.perf_counter() - start)


def sae_step_rate(args, acts: torch.Tensor, d_in: int) -> float:
    """Activations per second of SAEModule's training step alone (optimizer included)."""
    batches = list(acts[: (acts.shape[0] // args.batch) * args.batch].split(args.batch))
    loader = itertools.islice(itertools.cycle(batches), args.warmup + args.steps)
    return timed_fit(
        args, make_module(d_in), train_dataloaders=DataLoader(list(loader), batch_size=None)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per fit row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--recipe", help="a fit recipe (model and data); default: quickstart")
    parser.add_argument("--model", help="override the recipe's data.model")
    parser.add_argument("--source", help="override the recipe's data.source.path")
    args = parser.parse_args()
    global RECIPE
    RECIPE = Path(args.recipe) if args.recipe else RECIPE
    torch.manual_seed(0)
    tokens = (args.warmup + args.steps + 4) * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        dm = make_data(args)
        dm.setup()
        d_in = dm.d_in
        best: dict[str, float] = {}

        def keep(name: str, rate: float) -> None:
            best[name] = max(best.get(name, 0.0), rate)
            print(f"  {name:34s} {rate:10.0f} tok/s", flush=True)

        cache = Path(tmp) / "cache"
        write_cache(
            cache,
            dm.train_chunks(),
            manifest=dm.metadata(),
            max_tokens=tokens + 4 * args.batch,
        )
        reader = CacheReader(cache, batch_size=args.batch, buffer_size=4 * args.batch)
        acts = torch.cat(list(itertools.islice(reader, 8)))  # for the SAE step alone
        for _ in range(args.rounds):
            keep("(a) LM forward alone", lm_rate(dm, args.steps * args.batch))
            keep("    SAE step alone", sae_step_rate(args, acts, d_in))
            keep("(b) live fit, 1 SAE", fit_rate(args, make_data(args), make_module(d_in)))
            variants = [{"k": 32}, {"k": 64}, {"num_latents": 4096}, {"num_latents": 16384}]
            four = make_module(d_in, variants)
            keep("(c) live fit, 4 SAEs", fit_rate(args, make_data(args), four))
            cached = make_data(args, cache=str(cache))
            keep("(d) fit from the cache", fit_rate(args, cached, make_module(d_in)))
    implied = 1 / (1 / best["(a) LM forward alone"] + 1 / best["    SAE step alone"])
    b = best["(b) live fit, 1 SAE"]
    print("\nbest of each, and the issue's targets:")
    for name, rate in best.items():
        print(f"  {name:34s} {rate:10.0f} tok/s")
    print(f"  (b) / (LM + SAE step implied {implied:.0f} tok/s) = {b / implied:.2f}   (>= 0.85)")
    print(f"  (c) time per token / (b)'s = {b / best['(c) live fit, 4 SAEs']:.2f}   (<= 1.5)")
    print(f"  (d) / (b) = {best['(d) fit from the cache'] / b:.1f}   (>= 5)")


if __name__ == "__main__":
    main()
