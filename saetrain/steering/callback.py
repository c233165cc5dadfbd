"""Measure the SAE inside the LM while it trains: every ``every_n_steps`` steps of ``fit``, splice
the SAE's reconstruction into the residual stream on a few held-out sequences and log the
next-token loss recovered; optionally, refusal rates with a feature steered.

Add it to a fit recipe (or ``--trainer.callbacks+=saetrain.steering.callback.SteeringEvalCallback``)::

    trainer:
      callbacks:
        - class_path: saetrain.steering.callback.SteeringEvalCallback
          init_args: {every_n_steps: 200, sequences: 8}

Logged to TensorBoard (``pl_module.log``, rank zero only), by :func:`saetrain.evals.quality.measure`
(the implementation behind ``evaluate`` and ``fit``'s ``val/loss_recovered``) over the tokens
the SAE trains on:

- ``lm/loss_clean``, ``lm/loss_spliced``, ``lm/loss_zero_ablation``, ``lm/loss_mean_ablation``:
  mean next-token loss (nats) of the unchanged LM, with the hooked layer's output replaced by the
  SAE's reconstruction, by zeros, and by its mean;
- ``lm/loss_recovered`` = (zero - spliced) / (zero - clean): 1 when splicing costs nothing;
  ``lm/kl``: KL(clean || spliced) of the next-token distributions;
- with ``features`` and prompt sets: ``steering/refusal_unsafe`` / ``steering/refusal_safe``
  (keyword judge, greedy replies under ``op``/``strength``) and ``..._baseline`` (unsteered,
  generated once: the LM does not change).

Only the tokens the SAE trains on are replaced (the data module's exclusions: special tokens,
position 0, massive activations) and only the predictions at their positions count; the others
keep their clean activations, since the SAE never learnt them. The held-out sequences are the
first ones packed from the data module's validation documents. The hooks are removed after
each measurement and the RNG state is restored, so training is the same with or without this
callback. (It imports :mod:`saetrain.evals` on use; the redesign of issue #23 moves it there.)
"""  # noqa: E501

from __future__ import annotations

import itertools

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ..data.activations import pack_documents
from ..errors import UserError
from .hooks import Intervention, Op
from .prompts import PromptSet, load_prompts


def _refusal_rate(dm, prompts, **kwargs) -> float:
    """Share of greedy replies the keyword judge calls refusals."""
    from .generate import generate
    from .judge import KeywordJudge

    gens = generate(dm.lm, dm.tokenizer, prompts, **kwargs)
    verdicts = KeywordJudge().judge([g.prompt for g in gens], [g.response for g in gens])
    return sum(bool(v.refused) for v in verdicts) / max(1, len(verdicts))


class SteeringEvalCallback(Callback):
    """Logs the loss recovered by the SAE spliced into the LM (and refusal under steering).

    Args:
        every_n_steps: Measure after every this many optimizer steps (a multiple of the
            trainer's log_every_n_steps).
        sequences: Held-out sequences (of the data module's ctx_len) the loss is measured on.
        features: SAE latents to steer for the refusal rates; empty: no refusal measurement.
        op: clamp, add or ablate.
        strength: Clamp value or add coefficient, in the SAE's latent units.
        unsafe: Prompts the model should refuse (keep it small: each is generated every time).
        safe: Prompts it should answer.
        max_new_tokens: Length limit of each steered reply.
        batch_size: Sequences per LM forward and prompts per generation batch.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        sequences: int = 8,
        features: list[int] | None = None,
        op: Op = "clamp",
        strength: float = 8.0,
        unsafe: PromptSet | None = None,
        safe: PromptSet | None = None,
        max_new_tokens: int = 24,
        batch_size: int = 8,
    ):
        if every_n_steps < 1 or sequences < 1 or max_new_tokens < 1 or batch_size < 1:
            raise UserError(
                "every_n_steps, sequences, max_new_tokens and batch_size must be >= 1, got "
                f"{every_n_steps}, {sequences}, {max_new_tokens}, {batch_size}"
            )
        self.every_n_steps, self.sequences = every_n_steps, sequences
        self.intervention = Intervention(features, op, strength) if features else None
        if self.intervention is not None and unsafe is None and safe is None:
            raise UserError("features need a prompt set to steer: give unsafe and/or safe")
        self.sets = {"unsafe": unsafe, "safe": safe}
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self._input_ids: Tensor | None = None
        self._prompts: dict[str, list] | None = None
        self._baseline: dict[str, float] = {}
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # pl_module.log only writes on steps that are multiples of log_every_n_steps.
        every_log = trainer.log_every_n_steps
        if stage == "fit" and self.every_n_steps % every_log:
            raise UserError(
                f"SteeringEvalCallback every_n_steps={self.every_n_steps} must be a multiple of "
                f"trainer.log_every_n_steps={every_log}, or its measurements are never written"
            )

    def _held_out(self, dm) -> Tensor:
        if self._input_ids is None:
            seqs = pack_documents(dm.documents("val"), dm.tokenizer, dm.hparams.ctx_len)
            rows = list(itertools.islice(seqs, self.sequences))
            if not rows:
                raise UserError(
                    "SteeringEvalCallback needs held-out text: set data.val_documents so the "
                    "validation documents fill at least one ctx_len sequence"
                )
            self._input_ids = torch.stack(rows)  # (S, T)
        return self._input_ids

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        sae, dm = pl_module.sae, trainer.datamodule
        if sae is None or not bool(sae.initialized):
            return
        device = pl_module.device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            metrics = self.measure(dm, sae)
        pl_module.log_dict(metrics, rank_zero_only=True)

    def measure(self, dm, sae) -> dict[str, float]:
        """The metrics of one measurement (see the module docstring)."""
        from ..evals.quality import measure
        from ..evals.validation import rules_of

        figures = measure(
            dm.lm,
            {"sae": sae},
            self._held_out(dm),
            dm.layer,
            rules_of(dm),
            batch_size=self.batch_size,
            scopes=("trained_tokens",),
        )["sae"]["trained_tokens"]
        metrics = {
            "lm/loss_clean": figures["ce_clean"],
            "lm/loss_spliced": figures["ce_spliced"],
            "lm/loss_zero_ablation": figures["ce_zero_ablated"],
            "lm/loss_mean_ablation": figures["ce_mean_ablated"],
            "lm/loss_recovered": figures["loss_recovered_zero"],
            "lm/kl": figures["kl_spliced"],
        }
        if self.intervention is not None:
            metrics |= self._refusal(dm, sae)
        return metrics

    def _refusal(self, dm, sae) -> dict[str, float]:
        if self._prompts is None:
            self._prompts = {
                k: [r.input for r in load_prompts(s)] for k, s in self.sets.items() if s
            }
        kw = dict(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        steer = dict(sae=sae, interventions=[self.intervention], layer=dm.layer)
        out = {}
        for kind, prompts in self._prompts.items():
            out[f"steering/refusal_{kind}"] = _refusal_rate(dm, prompts, **kw, **steer)
            if kind not in self._baseline:  # the LM does not train: measure it once
                self._baseline[kind] = _refusal_rate(dm, prompts, **kw)
            out[f"steering/refusal_{kind}_baseline"] = self._baseline[kind]
        return out
