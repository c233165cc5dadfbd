"""Held-out quality of saetrain, SAELens and sparsify SAEs trained on the same activations (#6).

    /tmp/peers-venv/bin/python benchmarks/quality_vs_peers.py --cache /tmp/qs-cache --steps 270 \
        --out /tmp/quality [--lm-loss]
    python benchmarks/quality_vs_peers.py --lm-loss-only --out /tmp/quality   # LM part alone
    /tmp/peers-venv/bin/python benchmarks/quality_vs_peers.py --cache DIR --steps 5 \
        --num-latents 128 --k 4 --batch 64 --out /tmp/q-smoke                # smoke test

Needs the peers venv of ``bash scripts/check_interop.sh`` for training; ``--lm-loss-only`` reads
the saved folders with ``saetrain.load_sae`` alone, so it also runs in the main environment.

Data: one ``CacheReader`` over ``--cache`` (seed = the cache's data seed, shards shuffled, the
quickstart's 131,072-row buffer); each step's (batch, d_in) batch is read once and handed to
all three libraries in turn, so they see the same activations in the same order (a cache
shorter than steps * batch is read again, reshuffled). The same num_latents (8,192), k (32),
batch (4,096 tokens) and steps for all; fp32 parameters and inputs (on CUDA sparsify's forward
autocasts itself to bf16, as in its own trainer); each library's own initialisation
(each seeded with --seed), loss, optimiser and schedule, as its trainer does:

- saetrain (``SAEModule``; ``saetrain/module.py``): ``SAE(SAEConfig(...))`` defaults: inputs
  scaled to unit mean squared norm and b_dec = the mean, both from the first batch
  (``init_from_data``); loss fvu + 1/32 AuxK (k_aux = d_in // 2); Adam lr ``default_lr``
  (2e-3 / sqrt(num_latents / 2^14)), betas (0.9, 0.999), eps 6.25e-10; linear warm-up over
  --warmup steps (25, the quickstart's), linear decay to 0 from 80% of the steps; the decoder
  gradient projected before and rows renormalised after each step.
- SAELens (``TopKTrainingSAE`` stepped by its own ``SAETrainer.step``): the defaults of
  ``TopKTrainingSAEConfig`` (decoder_init_norm 0.1 with W_enc = W_dec.T, b_dec = 0 (SAELens 6
  has no data init), normalize_activations "none", rescale_acts_by_decoder_norm True, AuxK
  with aux_loss_coefficient 1, k_aux = d_in // 2) and of ``SAETrainerConfig`` /
  ``LanguageModelSAERunnerConfig`` (``sae_lens/config.py``): Adam lr 3e-4, betas (0.9, 0.999),
  "constant" schedule, no warm-up, no decay; its step clips the gradient norm to 1 and keeps
  no unit-norm decoder (it divides by the row norms instead). Saved with
  ``save_inference_model``, as its runner's ``save_final_sae`` does.
- sparsify (``SparseCoder``, stepped as ``sparsify/trainer.py`` does; defaults of its
  ``TrainConfig``, ``sparsify/config.py``): decoder = encoder rows at unit norm, b_dec = the
  first batch's mean, decoder re-normalised before each forward and its gradient projected;
  optimizer "signum" (SignSGD in schedulefree's ScheduleFreeWrapper, momentum 0.95, lr
  5e-3 / sqrt(num_latents / 2^14), no schedule), or with ``--sparsify-optimizer adam`` torch
  Adam at 2e-4 / sqrt(num_latents / 2^14) with 1,000 warm-up steps and linear decay to 0;
  auxk_alpha 0 (its default: AuxK off; ``--sparsify-auxk-alpha 0.03125`` turns it on).
  Saved with ``save_to_disk`` after ``ScheduleFreeWrapper.eval()`` (its checkpoint does that).

Dead latents: --dead-tokens (250,000, the quickstart's) for all three: saetrain's
dead_tokens_threshold, sparsify's dead_feature_threshold, and SAELens' dead_feature_window,
which counts steps: round(dead_tokens / batch) of them (61 at batch 4,096; each of the three
then calls a latent dead after 62 unfired steps). Reported both ways:
the library's own count at the end of training, and latents that never fire on the val set.

Measured the same way for all three, each folder loaded back with ``saetrain.load_sae`` (first
checked against the library's own reconstruction, max |difference| <= 1e-5 times max(1, the
largest |x_hat|)): held-out FVU = sum |x - x_hat|^2 / sum |x - mean(x)|^2 over all of the
cache's val activations, L0, latents unfired on val; plus training time (the steps alone, not
the data reading). ``--lm-loss``: next-token loss of the LM with its layer's output replaced by
each SAE's reconstruction on --lm-sequences held-out sequences (the cache's val documents;
``saetrain.steering.callback.splice_losses`` via ``SteeringEvalCallback.measure``, so the same
tokens as in training are replaced) and the loss recovered relative to zero ablation.
Writes --out/{saetrain,saelens,sparsify}/, results.json and results.md; prints the target:
saetrain's FVU within 2% (relative) of the best peer's or better, and no more latents unfired
on val than the peer with the fewest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saetrain import SAE, load_sae
from saetrain.data.cache import CacheReader, load_manifest
from saetrain.steering.callback import SteeringEvalCallback

LIBS = ("saetrain", "saelens", "sparsify")
EVAL_ROWS = 8192  # val rows per chunk


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def stream(reader: CacheReader) -> Iterator[Tensor]:
    """The reader's (B, d_in) batches, epoch after epoch."""
    while True:
        empty = True
        for batch in reader:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{reader.path} gave no batch: lower --batch")


# ------------------------------------------------------------------ evaluation, same for all


@torch.no_grad()
def reconstruct(sae: SAE, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x_hat (N, d_in), latent_acts and latent_indices (N, k), in chunks."""
    parts = [sae.encode(x[i : i + EVAL_ROWS].to(sae.device)) for i in range(0, len(x), EVAL_ROWS)]
    acts = torch.cat([a for a, _ in parts])
    idx = torch.cat([i for _, i in parts])
    x_hat = torch.cat([sae.decode(a, i).float().cpu() for a, i in parts])
    return x_hat, acts.cpu(), idx.cpu()


def evaluate(sae: SAE, val: Tensor) -> dict[str, float]:
    """Held-out FVU (float64 sums over all of val), L0 and latents never fired on val."""
    x_hat, acts, idx = reconstruct(sae, val)
    x = val.double()
    fvu = (x - x_hat.double()).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    fired = torch.zeros(sae.cfg.num_latents, dtype=torch.bool)
    fired[idx[acts > 0]] = True
    unfired = int((~fired).sum())
    return {
        "fvu": float(fvu),
        "l0": float((acts > 0).sum(-1).float().mean()),
        "unfired_val": unfired,
        "unfired_val_fraction": unfired / sae.cfg.num_latents,
    }


def load_check(ours: Tensor, theirs: Tensor) -> dict[str, Any]:
    """Max |x_hat difference| of load_sae's reconstruction against the library's own."""
    diff = float((ours - theirs).abs().max())
    scale = max(1.0, float(theirs.abs().max()))
    return {"max_abs_diff": diff, "max_abs_x_hat": scale, "ok": diff <= 1e-5 * scale}


# ------------------------------------------------------------------ the three trainers


class SaetrainRun:
    """``SAEModule``'s training of one SAE, without Lightning (see the module docstring)."""

    name = "saetrain"

    def __init__(self, d_in: int, args: argparse.Namespace, device: torch.device):
        from saetrain import DecoderNormAdam, SAEConfig
        from saetrain.module import DECAY_START, default_lr, lr_factor

        torch.manual_seed(args.seed)
        cfg = SAEConfig(d_in, args.num_latents, k=args.k, dead_tokens_threshold=args.dead_tokens)
        self.sae = SAE(cfg, device=device)
        self.lr = default_lr(cfg.num_latents)
        self.opt = DecoderNormAdam(
            self.sae.parameters(), decoders=[self.sae.W_dec], lr=self.lr, betas=(0.9, 0.999),
            eps=6.25e-10, fused=True,
        )  # as SAEModule.configure_optimizers  # fmt: skip
        total, warmup = args.steps, min(args.warmup, args.steps)
        factor = lr_factor(total, warmup)  # SAEModule.configure_optimizers' defaults
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.since_fired = torch.zeros(cfg.num_latents, dtype=torch.long, device=device)
        self.settings = {
            "optimizer": "Adam betas (0.9, 0.999) eps 6.25e-10",
            "lr": self.lr,
            "schedule": (
                f"warm-up {warmup} steps, linear decay to 0 from {DECAY_START:.0%} of the run"
            ),
            "init": "b_dec = batch mean, inputs scaled to unit mean squared norm",
            "auxk": f"coef {cfg.auxk_coef}, k_aux {cfg.k_aux}",
            "dead_threshold": f"{cfg.dead_tokens_threshold} tokens",
        }

    def step(self, x: Tensor) -> None:
        sae = self.sae
        if not bool(sae.initialized):
            sae.init_from_data(x)
        dead = self.since_fired >= sae.cfg.dead_tokens_threshold
        out = sae(x, dead_mask=dead)
        loss = out.fvu + sae.cfg.auxk_coef * out.auxk_loss
        with torch.no_grad():
            fired = torch.zeros_like(dead)
            fired[out.latent_indices.flatten()[out.latent_acts.flatten() > 0]] = True
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
        loss.backward()
        self.opt.step()  # with the decoder-norm step
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()

    def dead_count(self) -> int:
        return int((self.since_fired >= self.sae.cfg.dead_tokens_threshold).sum())

    def save(self, path: Path, meta: dict) -> Path:
        return self.sae.save(path, meta)

    @torch.no_grad()
    def reference(self, path: Path, x: Tensor) -> Tensor:
        """The trained SAE in memory (input scale not folded), which the folder must match."""
        return self.sae(x.to(self.sae.device)).x_hat.float().cpu()


class SaelensRun:
    """SAELens' ``TopKTrainingSAE`` stepped by its own ``SAETrainer`` (config defaults)."""

    name = "saelens"

    def __init__(self, d_in: int, args: argparse.Namespace, device: torch.device, meta: dict):
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.sae import SAEMetadata
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        torch.manual_seed(args.seed)
        hook = f"blocks.{meta['layer']}.hook_resid_post"  # SAELens' name for layer L's output
        cfg = TopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=args.num_latents,
            k=args.k,
            device=str(device),
            metadata=SAEMetadata(model_name=str(meta["model"]), hook_name=hook),
        )
        self.sae = TopKTrainingSAE(cfg)
        lr = SAETrainerConfig.lr  # its default, 3e-4; lr_end = lr / 10 as its runner sets it
        self.window = max(1, round(args.dead_tokens / args.batch))
        tcfg = SAETrainerConfig(
            total_training_samples=args.steps * args.batch,
            train_batch_size_samples=args.batch,
            lr_end=lr / 10,
            device=str(device),
            dead_feature_window=self.window,
        )
        self.trainer = SAETrainer(cfg=tcfg, sae=self.sae, data_provider=iter(()))
        self.sae.to(device)
        self.settings = {
            "optimizer": f"Adam betas ({tcfg.adam_beta1}, {tcfg.adam_beta2}) eps 1e-8, "
            "grad-norm clip 1.0",
            "lr": lr,
            "schedule": f"{tcfg.lr_scheduler_name}, warm-up {tcfg.lr_warm_up_steps}, "
            f"decay {tcfg.lr_decay_steps}",
            "init": f"decoder rows at norm {cfg.decoder_init_norm}, W_enc = W_dec.T, b_dec = 0, "
            f"normalize_activations {cfg.normalize_activations!r}, "
            f"rescale_acts_by_decoder_norm {cfg.rescale_acts_by_decoder_norm}",
            "auxk": f"aux_loss_coefficient {cfg.aux_loss_coefficient}, k_aux {d_in // 2}",
            "dead_threshold": f"{self.window} steps = {self.window * args.batch} tokens",
        }

    def step(self, x: Tensor) -> None:
        self.trainer.maybe_reset_sparsity()  # as its fit loop, around each step
        self.trainer.step(x)
        self.trainer.n_training_steps += 1

    def dead_count(self) -> int:
        return int(self.trainer.dead_neurons.sum())

    def save(self, path: Path, meta: dict) -> Path:
        self.trainer.set_final_sae_metadata()
        self.sae.save_inference_model(str(path))
        return path

    @torch.no_grad()
    def reference(self, path: Path, x: Tensor) -> Tensor:
        import sae_lens

        theirs = sae_lens.SAE.load_from_disk(str(path), device=str(self.sae.device)).eval()
        feats = theirs.encode(x.to(self.sae.device))
        feats = feats.to_dense() if feats.is_sparse else feats
        return theirs.decode(feats).float().cpu()


class SparsifyRun:
    """sparsify's ``SparseCoder`` trained as its ``Trainer`` does, with its TrainConfig."""

    name = "sparsify"

    def __init__(self, d_in: int, args: argparse.Namespace, device: torch.device, meta: dict):
        from sparsify import SparseCoder, SparseCoderConfig, TrainConfig

        overrides: dict[str, Any] = {}
        if args.sparsify_optimizer:
            overrides["optimizer"] = args.sparsify_optimizer
        if args.sparsify_auxk_alpha is not None:
            overrides["auxk_alpha"] = args.sparsify_auxk_alpha
        self.hookpoint = str(meta.get("hookpoint") or f"layers.{meta['layer']}")
        self.cfg = TrainConfig(
            SparseCoderConfig(num_latents=args.num_latents, k=args.k),
            dead_feature_threshold=args.dead_tokens,
            hookpoints=[self.hookpoint],
            init_seeds=[args.seed],
            log_to_wandb=False,
            **overrides,
        )
        torch.manual_seed(self.cfg.init_seeds[0])
        self.coder = SparseCoder(d_in, self.cfg.sae, device, dtype=torch.float32)
        n = self.coder.num_latents
        self.schedulers: list = []
        if self.cfg.optimizer == "adam":  # trainer.py: torch Adam without bitsandbytes
            from transformers import get_linear_schedule_with_warmup

            lr = self.cfg.lr or 2e-4 / (n / 2**14) ** 0.5
            self.opt = torch.optim.Adam([dict(params=self.coder.parameters(), lr=lr)])
            self.schedulers.append(
                get_linear_schedule_with_warmup(self.opt, self.cfg.lr_warmup_steps, args.steps)
            )
            desc = "Adam (torch defaults)"
            schedule = f"linear warm-up {self.cfg.lr_warmup_steps} steps, linear decay to 0"
        elif self.cfg.optimizer == "signum":
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            lr = self.cfg.lr or 5e-3 / (n / 2**14) ** 0.5
            sign = SignSGD([dict(params=self.coder.parameters(), lr=lr)])
            self.opt = ScheduleFreeWrapper(sign, momentum=0.95)
            self.opt.train()
            desc, schedule = "signum: SignSGD in ScheduleFreeWrapper(momentum 0.95)", "none"
        else:
            raise ValueError(f"--sparsify-optimizer {self.cfg.optimizer!r}: use adam or signum")
        self.since_fired = torch.zeros(n, dtype=torch.long, device=device)
        self.did_fire = torch.zeros(n, dtype=torch.bool, device=device)
        self.first = True
        self.settings = {
            "optimizer": desc,
            "lr": lr,
            "schedule": schedule,
            "init": "W_dec = W_enc (unit rows), b_dec = first batch mean",
            "auxk": f"auxk_alpha {self.cfg.auxk_alpha}"
            + (" (AuxK off)" if self.cfg.auxk_alpha <= 0 else f", k_aux {d_in // 2}"),
            "dead_threshold": f"{self.cfg.dead_feature_threshold} tokens",
        }

    def step(self, x: Tensor) -> None:
        coder, cfg = self.coder, self.cfg
        if self.first:  # "initialize the encoder and decoder biases" on the first step
            coder.b_dec.data = x.mean(0).to(coder.dtype)
            self.first = False
        coder.set_decoder_norm_to_unit_norm()
        dead_mask = self.since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = coder(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        self.did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        for sched in self.schedulers:
            sched.step()
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[self.did_fire] = 0
            self.did_fire.zero_()

    def dead_count(self) -> int:
        return int((self.since_fired > self.cfg.dead_feature_threshold).sum())

    def save(self, path: Path, meta: dict) -> Path:
        if hasattr(self.opt, "eval"):  # ScheduleFreeWrapper: save the averaged weights
            self.opt.eval()
        self.coder.save_to_disk(path / self.hookpoint)
        run = {**self.cfg.to_dict(), "model": meta.get("model")}  # as its CLI's RunConfig
        (path / "config.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
        return path

    @torch.no_grad()
    def reference(self, path: Path, x: Tensor) -> Tensor:
        from sparsify import SparseCoder

        theirs = SparseCoder.load_from_disk(path / self.hookpoint, device=self.coder.device)
        acts, idx, _ = theirs.encode(x.to(self.coder.device))
        return theirs.decode(acts, idx).float().cpu()


# ------------------------------------------------------------------ training and reporting


def train(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train the three SAEs on one stream, save them, measure them; the results dict."""
    warnings.filterwarnings("ignore")
    if not torch.cuda.is_available():  # sparsify picks its Triton decoder whenever triton imports
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    device = torch.device(args.device)
    manifest = load_manifest(args.cache)
    d_in = manifest["d_in"]
    seed = manifest.get("seed") or 0
    reader = CacheReader(
        args.cache,
        batch_size=args.batch,
        buffer_size=max(args.buffer_size, 2 * args.batch),
        seed=seed,
    )
    val = reader.val()
    if val is None:
        raise ValueError(f"{args.cache} holds no val activations: write it with val_documents > 0")
    meta = {k: manifest.get(k) for k in ("model", "layer", "hookpoint", "ctx_len", "data")}
    runs = [
        SaetrainRun(d_in, args, device),
        SaelensRun(d_in, args, device, meta),
        SparsifyRun(d_in, args, device, meta),
    ]
    seconds = dict.fromkeys(LIBS, 0.0)
    batches = stream(reader)
    start = time.perf_counter()
    for step in range(args.steps):
        x = next(batches).to(device)  # (B, d_in), the same batch for all three
        for run in runs:
            sync(device)
            t0 = time.perf_counter()
            run.step(x)
            sync(device)
            seconds[run.name] += time.perf_counter() - t0
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            done = ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
            print(f"step {step + 1}/{args.steps} ({time.perf_counter() - start:.0f}s: {done})")
    tokens = args.steps * args.batch
    results: dict[str, Any] = {}
    for run in runs:
        folder = out / run.name
        run.save(folder, {**meta, "tokens_seen": tokens, "steps": args.steps, "cache": args.cache})
        sae = load_sae(folder, device=device)
        probe = val[: min(len(val), 4096)]
        check = load_check(reconstruct(sae, probe)[0], run.reference(folder, probe))
        if not check["ok"]:
            print(f"WARNING {run.name}: load_sae differs from its own decode: {check}")
        results[run.name] = {
            **run.settings,
            **evaluate(sae, val),
            "dead_own": run.dead_count(),
            "train_seconds": seconds[run.name],
            "train_tokens_per_second": tokens / seconds[run.name],
            "load_check": check,
            "folder": str(folder),
        }
    settings = {
        "cache": str(args.cache),
        "model": manifest.get("model"),
        "layer": manifest.get("layer"),
        "d_in": d_in,
        "num_latents": args.num_latents,
        "k": args.k,
        "batch": args.batch,
        "steps": args.steps,
        "tokens": tokens,
        "epochs": tokens / reader.tokens_per_epoch,
        "dead_tokens": args.dead_tokens,
        "val_tokens": len(val),
        "device": str(device),
        "versions": versions(),
    }
    return {"settings": settings, "libraries": results}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__}
    for pkg in ("saetrain", "sae-lens", "eai-sparsify"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "not installed"
    return found


def lm_losses(results: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """Add each SAE's spliced next-token loss and loss recovered to ``results``."""
    import inspect

    from saetrain.data.datamodule import ActivationDataModule
    from saetrain.data.sources import TextSource

    manifest = load_manifest(results["settings"]["cache"])
    hp = {k: v for k, v in manifest["data_module"].items() if k != "cache"}
    if manifest.get("lm_dtype") in ("float32", "bfloat16", "float16"):
        hp["lm_dtype"] = manifest["lm_dtype"]  # the dtype the activations were made in
    fields = inspect.signature(TextSource).parameters
    source = TextSource(**{k: v for k, v in manifest["data"].items() if k in fields})
    dm = ActivationDataModule(source=source, **hp)
    dm.setup()
    measure = SteeringEvalCallback(sequences=args.lm_sequences, batch_size=args.lm_batch)
    for lib, row in results["libraries"].items():
        sae = load_sae(out / lib)
        metrics = measure.measure(dm, sae)  # the same held-out sequences for every SAE
        row.update({k.removeprefix("lm/"): v for k, v in metrics.items()})
        print(f"{lib}: {metrics}")
    results["settings"]["lm_sequences"] = int(measure._held_out(dm).shape[0])
    results["settings"]["ctx_len"] = dm.hparams.ctx_len


def target(results: dict[str, Any]) -> tuple[bool, str]:
    """saetrain's FVU within 2% of the best peer's (or better), no more unfired latents."""
    libs = results["libraries"]
    ours, peers = libs["saetrain"], [libs[p] for p in LIBS[1:]]
    best_fvu = min(p["fvu"] for p in peers)
    fewest = min(p["unfired_val"] for p in peers)
    fvu_ok = ours["fvu"] <= 1.02 * best_fvu
    dead_ok = ours["unfired_val"] <= fewest
    ok = fvu_ok and dead_ok
    line = (
        f"target {'MET' if ok else 'NOT MET'}: saetrain FVU {ours['fvu']:.4f} vs best peer "
        f"{best_fvu:.4f} ({100 * (ours['fvu'] / best_fvu - 1):+.1f}%, needs <= +2%: "
        f"{'ok' if fvu_ok else 'no'}); unfired on val {ours['unfired_val']} vs fewest peer "
        f"{fewest} ({'ok' if dead_ok else 'no'})"
    )
    return ok, line


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"# SAE quality: saetrain vs SAELens vs sparsify\n\n{s['model']} layer {s['layer']}, "
        f"d_in {s['d_in']}, {s['num_latents']} latents, k {s['k']}, batch {s['batch']}, "
        f"{s['steps']} steps ({s['tokens']} tokens, {s['epochs']:.2f} epochs of the cache), "
        f"held-out FVU on {s['val_tokens']} val tokens; {s['versions']}\n",
        "| library | held-out FVU | L0 | unfired on val | own dead count (threshold) "
        "| train s (tok/s) | optimizer, lr, schedule | init | AuxK | load_sae vs own decode |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lib, r in results["libraries"].items():
        check = r["load_check"]
        lines.append(
            f"| {lib} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['unfired_val']} "
            f"({100 * r['unfired_val_fraction']:.2f}%) | {r['dead_own']} ({r['dead_threshold']}) "
            f"| {r['train_seconds']:.1f} ({r['train_tokens_per_second']:.0f}) "
            f"| {r['optimizer']}, lr {r['lr']:.3g}, {r['schedule']} | {r['init']} | {r['auxk']} "
            f"| {'ok' if check['ok'] else 'DIFFERS'}: max diff {check['max_abs_diff']:.1e} |"
        )
    if all("loss_spliced" in r for r in results["libraries"].values()):
        lines += [
            f"\nNext-token loss on {s.get('lm_sequences')} held-out sequences of "
            f"{s.get('ctx_len')} tokens, layer output replaced by the reconstruction:\n",
            "| library | clean | spliced | zero ablation | loss recovered |",
            "|---|---|---|---|---|",
        ]
        for lib, r in results["libraries"].items():
            lines.append(
                f"| {lib} | {r['loss_clean']:.4f} | {r['loss_spliced']:.4f} "
                f"| {r['loss_zero_ablation']:.4f} | {r['loss_recovered']:.4f} |"
            )
    lines.append(f"\n{target(results)[1]}\n")
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", help="activation cache folder (python -m saetrain cache)")
    p.add_argument("--out", required=True, help="folder for the SAEs and results")
    p.add_argument("--steps", type=int, default=270)
    p.add_argument("--num-latents", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--buffer-size", type=int, default=131072, help="CacheReader shuffle rows")
    p.add_argument("--dead-tokens", type=int, default=250_000, help="dead after this many tokens")
    p.add_argument("--warmup", type=int, default=25, help="saetrain's warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (all three)")
    p.add_argument("--sparsify-optimizer", choices=["signum", "adam"], help="default: its own")
    p.add_argument("--sparsify-auxk-alpha", type=float, help="default: its own (0, AuxK off)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--lm-loss", action="store_true", help="also the spliced LM loss")
    p.add_argument("--lm-loss-only", action="store_true", help="only the LM loss of saved SAEs")
    p.add_argument("--lm-sequences", type=int, default=16, help="held-out sequences")
    p.add_argument("--lm-batch", type=int, default=8, help="sequences per LM forward")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.lm_loss_only:
        file = out / "results.json"
        if not file.is_file():
            p.error(f"--lm-loss-only reads {file}: train first (without --lm-loss-only)")
        results = json.loads(file.read_text())
        if args.cache:
            results["settings"]["cache"] = args.cache
    else:
        if not args.cache:
            p.error("--cache is required to train")
        for name in ("steps", "num_latents", "k", "batch", "dead_tokens"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if out.exists() and any(out.iterdir()):
            p.error(f"{out} is not empty: pick another --out or delete it")
        out.mkdir(parents=True, exist_ok=True)
        results = train(args, out)
        write(results, out)
    if args.lm_loss or args.lm_loss_only:
        lm_losses(results, out, args)
        write(results, out)
    print(markdown(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    if not math.isfinite(results["libraries"]["saetrain"]["fvu"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
