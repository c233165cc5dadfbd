"""``fit``'s validation in the LM (issue #22): after the held-out FVU, splice each SAE into the
LM on a few held-out sequences and log ``val/loss_recovered``, ``val/kl`` and
``val/delta_loss`` (one SAE; several log ``val/NAME/...``), with :func:`.quality.measure`, the
implementation behind ``python -m saetrain evaluate``, over the tokens the SAE trains on.

``fit`` adds :class:`LMValidation` itself (``--val_lm_sequences``, 0 turns it off). It needs the
live LM and held-out documents: with ``data.cache`` (no LM) or ``data.val_documents: 0`` it says
so once and logs nothing.
"""

from __future__ import annotations

import itertools
import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..data.activations import pack_documents
from .quality import TokenRules, measure

log = logging.getLogger("saetrain")


def rules_of(dm) -> TokenRules:
    """The data module's token exclusions, as :class:`TokenRules`."""
    producer = dm.producer
    return TokenRules(
        special_ids=tuple(int(i) for i in producer.special_ids.tolist()),
        exclude_first_position=producer.exclude_first_position,
        outlier_multiple=dm.hparams.outlier_multiple,
    )


def held_out_ids(dm, sequences: int) -> torch.Tensor | None:
    """(S, ctx_len) token ids: the first ``sequences`` packed from the validation documents."""
    seqs = pack_documents(dm.documents("val"), dm.tokenizer, dm.hparams.ctx_len)
    rows = list(itertools.islice(seqs, sequences))
    return torch.stack(rows) if rows else None


class LMValidation(Callback):
    """Logs loss recovered, KL and delta loss of each SAE spliced into the LM at validation.

    Args:
        sequences: Held-out sequences (of the data module's ctx_len) measured each time.
        batch_size: Sequences per LM forward pass.
    """

    def __init__(self, sequences: int = 4, batch_size: int = 4):
        self.sequences, self.batch_size = sequences, batch_size
        self._ids: torch.Tensor | None = None
        self._said = False

    def _skip(self, why: str) -> None:
        if not self._said:
            log.info("val/loss_recovered and val/kl are not measured: %s", why)
            self._said = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or self.sequences < 1:
            return
        dm = trainer.datamodule
        if getattr(dm, "lm", None) is None:
            self._skip("the activations come from a cache, without the LM (data.cache)")
            return
        # Sharded SAEs are put together by every rank (a collective), measured on rank zero.
        saes = [t.sae.gathered() for t in pl_module.trained]
        if not trainer.is_global_zero:
            return
        if self._ids is None:
            self._ids = held_out_ids(dm, self.sequences)
        if self._ids is None:
            self._skip("the validation documents fill no ctx_len sequence")
            return
        rules = rules_of(dm)
        metrics = {}
        for t, sae in zip(pl_module.trained, saes, strict=True):
            layer = dm.layers[t.hook_index]
            figures = measure(
                dm.lm,
                {t.name: sae},
                self._ids,
                layer,
                rules,
                batch_size=self.batch_size,
                scopes=("trained_tokens",),
            )[t.name]["trained_tokens"]
            prefix = pl_module._prefix(t, "val")
            metrics[prefix + "loss_recovered"] = figures["loss_recovered_zero"]
            metrics[prefix + "kl"] = figures["kl_spliced"]
            metrics[prefix + "delta_loss"] = figures["delta_loss"]
        pl_module.log_dict(metrics, rank_zero_only=True)
