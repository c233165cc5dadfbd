"""The LightningModule that trains one Top-k SAE on batches of activations (B, d_in).

Loss = FVU + auxk_coef * AuxK. Adam with linear warm-up and a decay to zero; the decoder's rows
stay unit-norm (gradient projected before each step, rows renormalised after). Dead-latent
counters are buffers, so they are saved in and restored from checkpoints.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.regression import ExplainedVariance

from .sae import SAE, SAEConfig


def default_lr(num_latents: int, base: float = 2e-3) -> float:
    """Adam learning rate scaled as 1 / sqrt(num_latents / 2^14) (Gao et al. 2024).

    The base 2e-3 (2.8e-3 at 8,192 latents) was chosen by measurement on 655k SmolLM2 layer-15
    activations (8,192 latents, k=32, batch 4,096): held-out FVU 0.280 at lr 1.4e-3, 0.249 at
    3e-3, 0.238 at 5e-3 but with 1.5% dead latents; sparsify's 2e-4 base is far slower.
    """
    return base / math.sqrt(num_latents / 2**14)


class FVU(Metric):
    """Fraction of variance unexplained over a whole data set (not a mean of batch FVUs):
    sum |x - x_hat|^2 / sum |x - mean(x)|^2, with the mean over all tokens seen."""

    full_state_update = False

    def __init__(self, d_in: int):
        super().__init__()
        self.add_state("sse", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x_hat: Tensor, x: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.sse += (x - x_hat).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_sq += x.pow(2).sum()
        self.n += x.shape[0]

    def compute(self) -> Tensor:
        total_variance = self.sum_sq - self.sum_x.pow(2).sum() / self.n.clamp_min(1)
        return (self.sse / total_variance.clamp_min(1e-12)).float()


class SAEModule(L.LightningModule):
    """Trains an :class:`~saetrain.sae.SAE` with Lightning.

    Args:
        d_in: Activation width; linked from ``data.d_in`` by the CLI, so leave it unset.
        num_latents: Dictionary size; None means ``expansion_factor * d_in``.
        expansion_factor: Used when ``num_latents`` is None (the paper uses 8).
        k: Latents kept per token.
        k_aux: Dead latents used by AuxK; None means d_in // 2.
        auxk_coef: Weight of the AuxK loss.
        dead_tokens_threshold: Tokens without firing after which a latent counts as dead.
        normalize_activations: Train on inputs scaled to unit mean squared norm.
        b_dec_init: Initialise ``b_dec`` to the data's mean, geometric median, or zeros.
        lr: Adam learning rate; None means :func:`default_lr` for ``num_latents``.
        betas: Adam betas.
        eps: Adam epsilon (Gao et al. use 6.25e-10).
        warmup_steps: Linear learning-rate warm-up.
        lr_decay: After warm-up: linear or cosine decay to zero at the last step, or constant.
        decay_start: Fraction of the run after which the decay starts.
    """

    def __init__(
        self,
        d_in: int | None = None,
        num_latents: int | None = None,
        expansion_factor: int = 8,
        k: int = 32,
        k_aux: int | None = None,
        auxk_coef: float = 1 / 32,
        dead_tokens_threshold: int = 10_000_000,
        normalize_activations: bool = True,
        b_dec_init: Literal["mean", "geometric_median", "zeros"] = "mean",
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 6.25e-10,
        warmup_steps: int = 100,
        lr_decay: Literal["linear", "cosine", "constant"] = "linear",
        decay_start: float = 0.8,
    ):
        super().__init__()
        if expansion_factor < 1:
            raise ValueError(f"model.expansion_factor must be >= 1, got {expansion_factor}")
        if not 0 <= decay_start <= 1:
            raise ValueError(f"model.decay_start must be in [0, 1], got {decay_start}")
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        self.save_hyperparameters()
        self.sae: SAE | None = None
        self.metadata: dict = {}
        if d_in is not None:
            self.configure_model()

    @property
    def sae_config(self) -> SAEConfig:
        hp = self.hparams
        if hp.d_in is None:
            raise ValueError("model.d_in is unknown: it is linked from the data module's LM")
        return SAEConfig(
            d_in=hp.d_in,
            num_latents=hp.num_latents or hp.expansion_factor * hp.d_in,
            k=hp.k,
            k_aux=hp.k_aux,
            auxk_coef=hp.auxk_coef,
            dead_tokens_threshold=hp.dead_tokens_threshold,
            normalize_activations=hp.normalize_activations,
            b_dec_init=hp.b_dec_init,
        )

    def configure_model(self) -> None:
        if self.sae is not None:
            return
        cfg = self.sae_config
        self.sae = SAE(cfg)
        n = cfg.num_latents
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.train_metrics = MetricCollection(
            {"fvu": MeanMetric(), "l0": MeanMetric(), "auxk_loss": MeanMetric()}, prefix="train/"
        )
        self.val_fvu = FVU(cfg.d_in)
        self.val_l0 = MeanMetric()
        self.val_ev = ExplainedVariance(multioutput="variance_weighted")
        self.register_buffer("val_fired", torch.zeros(n, dtype=torch.bool), persistent=False)

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.hparams.dead_tokens_threshold

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        assert self.sae is not None
        if not bool(self.sae.initialized):
            self.sae.init_from_data(batch)
            self._sync_init()
        dead = self.dead_mask
        out = self.sae(batch, dead_mask=dead)
        loss = out.fvu + self.hparams.auxk_coef * out.auxk_loss
        with torch.no_grad():
            fired = torch.zeros_like(dead)
            fired[out.latent_indices.flatten()[out.latent_acts.flatten() > 0]] = True
            tokens = batch.shape[0]
            if self._distributed():  # a latent fired if it fired on any rank
                fired = fired.to(torch.uint8)
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
                fired = fired.bool()
                tokens *= dist.get_world_size()  # every rank trains on batch_size tokens
            self.tokens_since_fired += tokens
            self.tokens_since_fired[fired] = 0
            self.tokens_seen += tokens
            l0 = (out.latent_acts > 0).sum(-1).float().mean()
        self.train_metrics["fvu"](out.fvu.detach())
        self.train_metrics["l0"](l0)
        self.train_metrics["auxk_loss"](out.auxk_loss.detach())
        self.log_dict(self.train_metrics, prog_bar=True)
        self.log("train/loss", loss.detach())
        self.log("train/dead_fraction", dead.float().mean(), prog_bar=True)
        self.log("train/tokens_seen", self.tokens_seen.float())
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    # ---------------------------------------------------------------- several processes

    @staticmethod
    def _distributed() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _sync_init(self) -> None:
        """Average the data-dependent init over ranks, so all start from the same SAE."""
        if self._distributed():
            for t in (self.sae.input_scale, self.sae.b_dec.data):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t /= dist.get_world_size()

    def on_train_end(self) -> None:
        """Check that every rank holds the same dead-latent counters (they are all-reduced)."""
        if self._distributed():
            counters = torch.cat([self.tokens_since_fired, self.tokens_seen.view(1)])
            first = counters.clone()
            dist.broadcast(first, src=0)
            if not torch.equal(first, counters):
                raise RuntimeError(
                    f"rank {dist.get_rank()}'s dead-latent counters differ from rank 0's"
                )

    # ---------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save the random generators too (Lightning does not), for an exact resume.

        As tensors and plain values, so the checkpoint still loads with weights_only=True."""
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another SAE shape in one line; restore the generators."""
        saved = checkpoint.get("hyper_parameters", {})
        now = self.sae_config
        saved_latents = saved.get("num_latents") or saved.get("expansion_factor", 0) * (
            saved.get("d_in") or 0
        )
        for name, old, new in (
            ("d_in", saved.get("d_in"), now.d_in),
            ("num_latents", saved_latents, now.num_latents),
            ("k", saved.get("k"), now.k),
        ):
            if old is not None and old != new:
                raise ValueError(
                    f"the checkpoint's SAE has {name}={old} but this run's has {name}={new}: "
                    "resume with the same model settings, or start a new run"
                )
        rng = checkpoint.get("rng_states")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            random.setstate(rng["python"])
            name, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))

    def on_before_optimizer_step(self, optimizer) -> None:
        self.sae.remove_parallel_grad()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: callbacks (checkpointing) run before that hook.
        self.sae.normalize_decoder()

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        out = self.sae(batch)
        x, x_hat = batch.float(), out.x_hat.float()
        self.val_fvu.update(x_hat, x)
        self.val_l0.update((out.latent_acts > 0).sum(-1).float().mean(), weight=x.shape[0])
        self.val_ev.update(x_hat, x)
        self.val_fired[out.latent_indices[out.latent_acts > 0]] = True

    def on_validation_epoch_end(self) -> None:
        # The metrics' compute() already reduces their states across ranks (the same value
        # on each: sync_dist only silences Lightning's warning); the fired mask is OR-ed here.
        if self._distributed():
            fired = self.val_fired.to(torch.uint8)
            dist.all_reduce(fired, op=dist.ReduceOp.MAX)
            self.val_fired.copy_(fired.bool())
        self.log("val/fvu", self.val_fvu.compute(), prog_bar=True, sync_dist=True)
        self.log("val/l0", self.val_l0.compute(), sync_dist=True)
        self.log("val/explained_variance", self.val_ev.compute(), sync_dist=True)
        self.log("val/unfired_fraction", 1 - self.val_fired.float().mean(), sync_dist=True)
        for m in (self.val_fvu, self.val_l0, self.val_ev):
            m.reset()
        self.val_fired.zero_()

    def configure_optimizers(self):
        cfg = self.sae_config
        lr = self.hparams.lr or default_lr(cfg.num_latents)
        opt = torch.optim.Adam(
            self.sae.parameters(), lr=lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total)
        decay_from = max(warmup, int(self.hparams.decay_start * total))
        kind = self.hparams.lr_decay

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if kind == "constant" or step < decay_from:
                return 1.0
            t = (step - decay_from) / max(1, total - decay_from)
            if kind == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
            return max(0.0, 1.0 - t)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
