"""The LightningModule that trains Top-k SAEs on batches of activations.

One SAE by default, on (B, d_in) batches. With several hookpoints (``data.layer: [3, 5]``,
batches (B, n_hookpoints, d_in)) and/or ``model.sae_variants`` (other sizes or k), one SAE per
(hookpoint, variant) pair trains on the same batches, so the LM forward pass is paid once for
all of them (issue #3). Each SAE's loss = FVU (summed over Matryoshka prefixes, issue #22) +
auxk_coef * AuxK; the losses are summed, which
leaves each SAE's gradients exactly what they would be alone. Adam with linear warm-up and a
decay to zero, one parameter group per SAE; the decoder's rows stay unit-norm (gradient
projected before each step, rows renormalised after: :class:`~saetrain.optim.DecoderNormAdam`,
one pass with Adam's update on CUDA). Dead-latent counters are buffers, so they are saved in
and restored from checkpoints.

Under ``--trainer.strategy fsdp2`` (Lightning's ModelParallelStrategy) :meth:`configure_model`
shards each SAE with FSDP2's ``fully_shard`` over the data-parallel ranks, by whole rows: between
steps each rank keeps 1/world_size of the weights, gradients and Adam's state (see ``sae.py``).
"""

from __future__ import annotations

import math
import random
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.regression import ExplainedVariance

from .errors import UserError
from .optim import DecoderNormAdam
from .sae import SAE, SAEConfig


def default_lr(num_latents: int, base: float = 2e-3) -> float:
    """Adam learning rate scaled as 1 / sqrt(num_latents / 2^14) (Gao et al. 2024).

    The base 2e-3 (2.8e-3 at 8,192 latents) was chosen by measurement on 655k SmolLM2 layer-15
    activations (8,192 latents, k=32, batch 4,096): held-out FVU 0.280 at lr 1.4e-3, 0.249 at
    3e-3, 0.238 at 5e-3 but with 1.5% dead latents; sparsify's 2e-4 base is far slower.
    """
    return base / math.sqrt(num_latents / 2**14)


DECAY_START = 0.8
"""The fraction of the run after which the learning rate decays, unless configured."""


def lr_factor(
    total: int,
    warmup: int,
    decay: Literal["linear", "cosine", "constant"] = "linear",
    decay_start: float = DECAY_START,
):
    """The learning-rate multiplier of each step (for ``LambdaLR``): linear warm-up over
    ``warmup`` steps, then constant until ``decay_start`` of the ``total`` steps, then a linear
    or cosine decay to zero at the last step (or no decay)."""
    warmup = min(warmup, total)
    decay_from = max(warmup, int(decay_start * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "constant" or step < decay_from:
            return 1.0
        t = (step - decay_from) / max(1, total - decay_from)
        if decay == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return max(0.0, 1.0 - t)

    return factor


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


# Fields a variant may set, overriding the module's own (see SAEModule).
VARIANT_FIELDS = (
    "num_latents",
    "expansion_factor",
    "k",
    "k_aux",
    "auxk_coef",
    "dead_tokens_threshold",
    "lr",
    "activation",
    "matryoshka_prefixes",
)


# The possible values of each numeric setting: a test and the words an error gives; None is
# always allowed (a derived default). `--model.lr -0.01` once trained to exit 0 (issue #21).
SETTING_RANGES = {
    "num_latents": (lambda v: v >= 1, "an integer >= 1 (or null: expansion_factor * d_in)"),
    "expansion_factor": (lambda v: v >= 1, "an integer >= 1"),
    "k": (lambda v: v >= 1, ">= 1"),
    "k_aux": (lambda v: v >= 0, "an integer >= 0 (or null: d_in // 2)"),
    "auxk_coef": (lambda v: v >= 0, ">= 0"),
    "dead_tokens_threshold": (lambda v: v >= 1, "an integer >= 1"),
    "lr": (lambda v: v > 0, "> 0 (or null: the default for num_latents)"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "eps": (lambda v: v >= 0, ">= 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "decay_start": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "threshold_ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "threshold_start": (lambda v: v >= 0, "an integer >= 0"),
}
INTEGER_SETTINGS = {
    "num_latents",
    "expansion_factor",
    "k",
    "k_aux",
    "dead_tokens_threshold",
    "warmup_steps",
    "threshold_start",
}


def check_settings(values: dict, where: str = "model") -> None:
    """Refuse an impossible value of a setting in ``values`` in one line naming the field (at
    config time, before the LM loads); settings without a range are not looked at."""
    for name, value in values.items():
        if name not in SETTING_RANGES or value is None:
            continue
        test, words = SETTING_RANGES[name]
        numbers = list(value) if isinstance(value, list | tuple) else [value]
        kind = int if name in INTEGER_SETTINGS else int | float
        numeric = all(
            isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) for v in numbers
        )
        if not (numeric and test(value)):
            raise UserError(f"{where}.{name} must be {words}, got {value}")


class TrainedSAE(nn.Module):
    """One SAE with what training keeps beside it: dead-latent counter and metrics."""

    def __init__(self, cfg: SAEConfig, hookpoint: str, hook_index: int, name: str, lr: float):
        super().__init__()
        self.sae = SAE(cfg)
        self.hookpoint, self.hook_index, self.name, self.lr = hookpoint, hook_index, name, lr
        n = cfg.num_latents
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        # No NaN check on the per-step means: each is a host sync on CUDA (a NaN loss shows
        # as a NaN mean rather than being dropped with a warning).
        self.train_metrics = MetricCollection(
            {name: MeanMetric(nan_strategy="disable") for name in ("fvu", "l0", "auxk_loss")}
        )
        self.init_checked = False  # whether sae.initialized was read since this run started
        self.val_fvu = FVU(cfg.d_in)
        self.val_l0 = MeanMetric()
        self.val_ev = ExplainedVariance(multioutput="variance_weighted")
        self.register_buffer("val_fired", torch.zeros(n, dtype=torch.bool), persistent=False)

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.sae.cfg.dead_tokens_threshold

    def inputs(self, batch: Tensor) -> Tensor:
        """This SAE's (B, d_in) slice of a (B, d_in) or (B, n_hookpoints, d_in) batch."""
        return batch if batch.dim() == 2 else batch[:, self.hook_index]


class SAEModule(L.LightningModule):
    """Trains :class:`~saetrain.sae.SAE` s with Lightning.

    Args:
        d_in: Activation width; linked from ``data.d_in`` by the CLI, so leave it unset.
        hookpoints: Names of the hooked layers, in the order of a batch's second axis; linked
            from ``data.hookpoints`` by the CLI. None: one hookpoint, (B, d_in) batches.
        num_latents: Dictionary size; None means ``expansion_factor * d_in``.
        expansion_factor: Used when ``num_latents`` is None (the paper uses 8).
        k: Latents kept per token.
        k_aux: Dead latents used by AuxK; None means d_in // 2.
        auxk_coef: Weight of the AuxK loss.
        dead_tokens_threshold: Tokens without firing after which a latent counts as dead.
        normalize_activations: Train on inputs scaled to unit mean squared norm.
        b_dec_init: Initialise ``b_dec`` to the data's mean, geometric median, or zeros.
        activation: ``topk``, or ``batchtopk``: the top k * B over each batch while training,
            exported as a JumpReLU at a running threshold (see :mod:`saetrain.architectures`).
        threshold_ema: batchtopk: weight of the old value in the threshold's moving average.
        threshold_start: batchtopk: training batches before the threshold estimate starts.
        matryoshka_prefixes: Nested prefixes of latents ``[m1, ..., num_latents]`` whose FVUs
            the loss sums (Matryoshka SAEs); None: the plain loss.
        lr: Adam learning rate; None means :func:`default_lr` for ``num_latents``.
        betas: Adam betas.
        eps: Adam epsilon (Gao et al. use 6.25e-10).
        warmup_steps: Linear learning-rate warm-up.
        lr_decay: After warm-up: linear or cosine decay to zero at the last step, or constant.
        decay_start: Fraction of the run after which the decay starts.
        sae_variants: Several SAEs per hookpoint: a list of dicts, each overriding some of
            num_latents, expansion_factor, k, k_aux, auxk_coef, dead_tokens_threshold, lr,
            activation, matryoshka_prefixes (e.g. ``[{k: 32}, {k: 64, num_latents: 16384}]``).
            None: one SAE per hookpoint.
    """

    def __init__(
        self,
        d_in: int | None = None,
        hookpoints: list[str] | None = None,
        num_latents: int | None = None,
        expansion_factor: int = 8,
        k: int = 32,
        k_aux: int | None = None,
        auxk_coef: float = 1 / 32,
        dead_tokens_threshold: int = 10_000_000,
        normalize_activations: bool = True,
        b_dec_init: Literal["mean", "geometric_median", "zeros"] = "mean",
        activation: Literal["topk", "batchtopk"] = "topk",
        threshold_ema: float = 0.999,
        threshold_start: int = 1000,
        matryoshka_prefixes: list[int] | None = None,
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 6.25e-10,
        warmup_steps: int = 100,
        lr_decay: Literal["linear", "cosine", "constant"] = "linear",
        decay_start: float = DECAY_START,
        sae_variants: list[dict] | None = None,
    ):
        super().__init__()
        check_settings({k: v for k, v in locals().items() if k in SETTING_RANGES})  # the args
        for i, variant in enumerate(sae_variants or []):
            unknown = sorted(set(variant) - set(VARIANT_FIELDS))
            if unknown:
                raise UserError(
                    f"model.sae_variants[{i}] sets {', '.join(unknown)}, which a variant cannot "
                    f"set: choose from {', '.join(VARIANT_FIELDS)}"
                )
            check_settings(variant, f"model.sae_variants[{i}]")
            if variant.get("activation", "topk") not in ("topk", "batchtopk"):
                raise UserError(
                    f"model.sae_variants[{i}].activation must be 'topk' or 'batchtopk', "
                    f"got {variant['activation']!r}"
                )
        if sae_variants is not None and not sae_variants:
            raise UserError("model.sae_variants is empty: list at least one, or leave it unset")
        self.save_hyperparameters()
        self.saes: nn.ModuleDict | None = None
        self._sharded = False
        self.metadata: dict = {}
        if d_in is not None:
            self.configure_model()

    # ---------------------------------------------------------------- the SAEs

    def variant_config(self, variant: dict, where: str = "") -> tuple[SAEConfig, float]:
        """The SAE config and learning rate of one variant (the module's fields, overridden);
        an error in the variant's own fields names it by ``where`` (``model.sae_variants[i]``)."""
        hp = {**self.hparams, **variant}
        if hp["d_in"] is None:
            raise UserError("model.d_in is unknown: it is linked from the data module's LM")
        try:
            cfg = self._sae_config(hp)
        except UserError as e:  # e.g. matryoshka_prefixes that do not end at its num_latents
            if not where:
                raise
            raise UserError(f"{where}: {e}") from None
        return cfg, hp["lr"] or default_lr(cfg.num_latents)

    @staticmethod
    def _sae_config(hp: dict) -> SAEConfig:
        return SAEConfig(
            d_in=hp["d_in"],
            num_latents=hp["num_latents"] or hp["expansion_factor"] * hp["d_in"],
            k=hp["k"],
            k_aux=hp["k_aux"],
            auxk_coef=hp["auxk_coef"],
            dead_tokens_threshold=hp["dead_tokens_threshold"],
            normalize_activations=hp["normalize_activations"],
            b_dec_init=hp["b_dec_init"],
            activation=hp.get("activation", "topk"),
            threshold_ema=hp.get("threshold_ema", 0.999),
            threshold_start=hp.get("threshold_start", 1000),
            matryoshka_prefixes=hp.get("matryoshka_prefixes"),
        )

    @property
    def sae_config(self) -> SAEConfig:
        """The config of the module's own fields (the first variant's base)."""
        return self.variant_config({})[0]

    def configure_model(self) -> None:
        """Build the SAEs (once) and, under ``fsdp2``, shard each with ``fully_shard``."""
        if self.saes is None:
            self._build()
        mesh = self._device_mesh
        if mesh is not None and not self._sharded:
            from torch.distributed.fsdp import fully_shard

            names = mesh.mesh_dim_names or ()
            if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
                raise UserError(
                    "tensor parallelism is not supported for SAEs: use the fsdp2 strategy "
                    "(tensor_parallel_size 1)"
                )
            dp = mesh["data_parallel"] if "data_parallel" in names else mesh
            for t in self.trained:
                fully_shard(t.sae, mesh=dp)
            self._sharded = True

    def _build(self) -> None:
        hookpoints = self.hparams.hookpoints or ["sae"]
        variants = self.hparams.sae_variants or [{}]
        self.saes = nn.ModuleDict()
        # Every SAE is initialised from the same generator state, so each starts as it would
        # in a run of its own (several SAEs per pass train to the same weights as separate runs).
        rng = torch.get_rng_state()
        for h, hookpoint in enumerate(hookpoints):
            for v, variant in enumerate(variants):
                torch.set_rng_state(rng)
                where = f"model.sae_variants[{v}]" if self.hparams.sae_variants else ""
                cfg, lr = self.variant_config(variant, where)
                name = hookpoint
                if len(variants) > 1:
                    name = f"{hookpoint}/{cfg.num_latents}-k{cfg.k}"
                    name += "" if cfg.activation == "topk" else f"-{cfg.activation}"
                    name += "-matryoshka" if len(cfg.matryoshka_prefixes or []) > 1 else ""
                    if any(t.name == name for t in self.saes.values()):
                        name += f"-v{v}"
                self.saes[f"{h}_{v}"] = TrainedSAE(cfg, hookpoint, h, name, lr)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    @property
    def trained(self) -> list[TrainedSAE]:
        return list(self.saes.values())

    @property
    def sae(self) -> SAE:
        """The SAE, when the module trains one (else the first)."""
        return self.trained[0].sae

    @property
    def dead_mask(self) -> Tensor:
        """Dead latents of the (first) SAE."""
        return self.trained[0].dead_mask

    def _prefix(self, t: TrainedSAE, split: str) -> str:
        return f"{split}/" if len(self.saes) == 1 else f"{split}/{t.name}/"

    # ---------------------------------------------------------------- training

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        losses, fired_masks = [], []
        for t in self.trained:
            x = t.inputs(batch)
            if not t.init_checked:  # one host read per run, not per step
                if not bool(t.sae.initialized):
                    t.sae.set_init(*self._sync_init(*t.sae.data_init(x)))
                t.init_checked = True
            dead = t.dead_mask
            out = t.sae(x, dead_mask=dead)
            # recon_loss: fvu, or the sum of the Matryoshka prefixes' FVUs.
            losses.append(out.recon_loss + t.sae.cfg.auxk_coef * out.auxk_loss)
            with torch.no_grad():
                # Latents with a positive value; the others write to a spare slot (no
                # boolean indexing: that would be a host sync on CUDA).
                n = dead.numel()
                fired = torch.zeros(n + 1, dtype=torch.bool, device=dead.device)
                hit = out.latent_acts > 0
                fired[torch.where(hit, out.latent_indices, n).flatten()] = True
                fired_masks.append(fired[:n])
                l0 = hit.sum(-1).float().mean()
            t.train_metrics["fvu"](out.fvu.detach())
            t.train_metrics["l0"](l0)
            t.train_metrics["auxk_loss"](out.auxk_loss.detach())
            prefix = self._prefix(t, "train")
            self.log_dict({prefix + k: v for k, v in t.train_metrics.items()}, prog_bar=True)
            self.log(prefix + "dead_fraction", dead.float().mean(), prog_bar=True)
        self._count_tokens(batch.shape[0], fired_masks)
        loss = torch.stack(losses).sum() if len(losses) > 1 else losses[0]
        self.log("train/loss", loss.detach())
        self.log("train/tokens_seen", self.tokens_seen.float())
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    @torch.no_grad()
    def _count_tokens(self, tokens: int, fired_masks: list[Tensor]) -> None:
        """Advance the dead-latent counters; a latent fired if it fired on any rank."""
        fired_all = torch.cat(fired_masks)
        if self._distributed():  # one all-reduce for every SAE's mask
            fired_u8 = fired_all.to(torch.uint8)
            dist.all_reduce(fired_u8, op=dist.ReduceOp.MAX)
            fired_all = fired_u8.bool()
            tokens *= dist.get_world_size()  # every rank trains on batch_size tokens
        sizes = [m.numel() for m in fired_masks]
        for t, fired in zip(self.trained, fired_all.split(sizes), strict=True):
            t.tokens_since_fired += tokens
            t.tokens_since_fired.masked_fill_(fired, 0)
        self.tokens_seen += tokens

    # ---------------------------------------------------------------- several processes

    @staticmethod
    def _distributed() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _sync_init(self, scale: Tensor, b_dec: Tensor) -> tuple[Tensor, Tensor]:
        """Average the data-dependent init over ranks, so all start from the same SAE."""
        if self._distributed():
            for t in (scale, b_dec):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t /= dist.get_world_size()
        return scale, b_dec

    @torch.no_grad()
    def _sync_thresholds(self) -> None:
        """Average the batchtopk SAEs' JumpReLU thresholds over ranks (each rank estimates its
        own from its own batches). The estimate is a moving average, linear in each batch's
        value and updated at the same steps on every rank, so averaging where the threshold is
        read (validation, checkpoints, the export at the end: the hooks below) gives what
        averaging every step would, with no collective per step."""
        ts = [t.sae.threshold for t in self.trained if t.sae.cfg.activation == "batchtopk"]
        if not ts or not self._distributed():
            return
        flat = torch.cat([t.reshape(-1).float() for t in ts])  # one all-reduce for all SAEs
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        for t, mean in zip(ts, flat.split([t.numel() for t in ts]), strict=True):
            t.copy_(mean.view_as(t))

    def on_validation_epoch_start(self) -> None:
        self._sync_thresholds()  # eval mode uses the threshold

    def on_train_epoch_end(self) -> None:
        # Before the callbacks' on_train_end (ExportSAE writes the SAEs there) and the
        # ModelCheckpoint saves of the epoch's end.
        self._sync_thresholds()

    def on_fit_start(self) -> None:
        # The kernel choices `python -m saetrain tune-kernels` stored for this GPU model (each
        # process sets its own; rank 0 says which).
        from .kernel_choices import use_stored

        use_stored(self.device, log=rank_zero_info)

    def on_train_end(self) -> None:
        """Check that every rank holds the same dead-latent counters (they are all-reduced)."""
        if self._distributed():
            counters = torch.cat([t.tokens_since_fired for t in self.trained])
            counters = torch.cat([counters, self.tokens_seen.view(1)])
            first = counters.clone()
            dist.broadcast(first, src=0)
            if not torch.equal(first, counters):
                raise RuntimeError(
                    f"rank {dist.get_rank()}'s dead-latent counters differ from rank 0's"
                )

    # ---------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save the random generators too (Lightning does not), for an exact resume.

        As tensors and plain values, so the checkpoint still loads with weights_only=True.
        Every rank takes part in a save (rank 0 writes), so the thresholds are averaged here
        and the averages replace the state dict's copies (which may be copies, under FSDP2)."""
        self._sync_thresholds()
        state = checkpoint.get("state_dict") or {}
        for name, buf in self.named_buffers():
            if name.endswith("sae.threshold") and name in state:
                state[name] = buf.detach().to(state[name].device, copy=True)
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
            ("activation", saved.get("activation"), now.activation),
            ("sae_variants", saved.get("sae_variants"), self.hparams.sae_variants),
        ):
            if name in saved and old != new:
                raise UserError(
                    f"the checkpoint's SAE has {name}={old} but this run's has {name}={new}: "
                    "resume with the same model settings, or start a new run"
                )
        if "hookpoints" in saved and saved["hookpoints"] != self.hparams.hookpoints:
            raise UserError(
                f"the checkpoint's SAEs read {saved['hookpoints']} but data.layer gives "
                f"{self.hparams.hookpoints}: resume with the same data.layer, or start a new run"
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
        # Lightning clips gradients after this hook: when it clips, the decoder gradients are
        # projected here, so the norm is the projected gradients' (see configure_optimizers).
        if not getattr(optimizer, "project_decoders", True):
            for t in self.trained:
                t.sae.remove_parallel_grad()

    # ---------------------------------------------------------------- validation

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        for t in self.trained:
            x = t.inputs(batch)
            out = t.sae(x)
            x, x_hat = x.float(), out.x_hat.float()
            t.val_fvu.update(x_hat, x)
            t.val_l0.update((out.latent_acts > 0).sum(-1).float().mean(), weight=x.shape[0])
            t.val_ev.update(x_hat, x)
            t.val_fired[out.latent_indices[out.latent_acts > 0]] = True

    def on_validation_epoch_end(self) -> None:
        # The metrics' compute() already reduces their states across ranks (the same value
        # on each: sync_dist only silences Lightning's warning); the fired mask is OR-ed here.
        for t in self.trained:
            if self._distributed():
                fired = t.val_fired.to(torch.uint8)
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
                t.val_fired.copy_(fired.bool())
            p = self._prefix(t, "val")
            self.log(p + "fvu", t.val_fvu.compute(), prog_bar=True, sync_dist=True)
            self.log(p + "l0", t.val_l0.compute(), sync_dist=True)
            self.log(p + "explained_variance", t.val_ev.compute(), sync_dist=True)
            self.log(p + "unfired_fraction", 1 - t.val_fired.float().mean(), sync_dist=True)
            for m in (t.val_fvu, t.val_l0, t.val_ev):
                m.reset()
            t.val_fired.zero_()

    def configure_optimizers(self):
        # One Adam, one parameter group per SAE with its own learning rate; Adam's update is
        # per tensor, so each SAE steps exactly as it would alone. The optimizer also takes
        # the decoder-norm step: the gradient's projection (here in on_before_optimizer_step
        # when Lightning clips gradient norms) and the renormalisation after Adam's update.
        groups = [{"params": list(t.sae.parameters()), "lr": t.lr} for t in self.trained]
        # The fused kernel: on this 2-core CPU 48 ms against 209 ms for the default loop over
        # 2 x 16,384 x 576 parameters (a third of a training step); CUDA and CPU support it.
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        opt = DecoderNormAdam(
            groups,
            decoders=[t.sae.W_dec for t in self.trained],
            project_decoders=not self.trainer.gradient_clip_val,
            betas=tuple(self.hparams.betas),
            eps=self.hparams.eps,
            fused=fused or None,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        hp = self.hparams
        factor = lr_factor(total, hp.warmup_steps, hp.lr_decay, hp.decay_start)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
