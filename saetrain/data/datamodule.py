"""The streaming activation DataModule: text source -> LM -> shuffled activation batches.

Configured from YAML under ``data:`` (see ``recipes/``). The LM is loaded in :meth:`setup`,
never in ``__init__``; ``d_in`` is read from the LM's config alone, so the SAE can be sized
before any weights are loaded.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from .activations import ActivationProducer, pack_documents, shuffle_batches, shuffle_documents
from .lm import (
    check_layer,
    check_layer_index,
    hidden_size,
    load_lm,
    load_lm_config,
    num_layers,
    pick_dtype,
)
from .sources import TextSource, iter_documents

log = logging.getLogger(__name__)


class _Stream(IterableDataset):
    """Wraps a generator function so a DataLoader (num_workers=0) can iterate it."""

    def __init__(self, make_iter):
        self.make_iter = make_iter

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.make_iter()


class ActivationDataModule(L.LightningDataModule):
    """Streams residual-stream activations of a causal LM over a text or chat source.

    Args:
        model: Hub id, local directory, ``.gguf`` file, or ``package://pkg/file.gguf``.
        source: Where the text comes from (see :class:`saetrain.data.sources.TextSource`).
        layer: Decoder layer whose output (the residual stream after it) is read, from 0.
        ctx_len: Tokens per packed sequence fed to the LM.
        lm_batch_size: Sequences per LM forward pass.
        batch_size: Activations (tokens) per SAE training step.
        buffer_size: Activations held in the shuffle buffer (memory: buffer_size * d_in * 4 B).
        lm_dtype: dtype of the LM; ``auto`` is bf16 on GPU and on CPUs where bf16 is faster.
        exclude_special_tokens: Drop BOS, EOS, padding and chat-template tokens.
        exclude_first_position: Drop position 0 of every sequence (an attention sink whose
            norm is far above the rest).
        outlier_multiple: Drop tokens whose norm exceeds this multiple of the running median
            norm; None keeps all.
        val_documents: Documents at the start of the source held out for validation (never
            trained on); 0 disables validation.
        val_tokens: At most this many held-out activations are used for validation.
        document_buffer: Shuffle training documents in a buffer of this many before
            tokenizing (0 keeps the source's order).
        seed: Seed of the shuffle buffers.
    """

    def __init__(
        self,
        model: str,
        source: TextSource,
        layer: int,
        ctx_len: int = 256,
        lm_batch_size: int = 8,
        batch_size: int = 4096,
        buffer_size: int = 131072,
        lm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        exclude_special_tokens: bool = True,
        exclude_first_position: bool = True,
        outlier_multiple: float | None = 10.0,
        val_documents: int = 0,
        val_tokens: int = 65536,
        document_buffer: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        for name, value in (
            ("ctx_len", ctx_len),
            ("lm_batch_size", lm_batch_size),
            ("batch_size", batch_size),
        ):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if layer < 0:
            raise ValueError(f"data.layer must be >= 0, got {layer}")
        if buffer_size < 2 * batch_size:
            raise ValueError(
                f"data.buffer_size={buffer_size} must be at least 2 * data.batch_size "
                f"({2 * batch_size}): raise buffer_size or lower batch_size"
            )
        if document_buffer < 0:
            raise ValueError(f"data.document_buffer must be >= 0, got {document_buffer}")
        if outlier_multiple is not None and outlier_multiple <= 1:
            raise ValueError(f"data.outlier_multiple must be > 1 or null, got {outlier_multiple}")
        self.save_hyperparameters(ignore=["source"])
        self.model_name = model
        self.source = source
        self.layer = layer
        self.lm = None
        self.tokenizer = None
        self.producer: ActivationProducer | None = None
        self._val_batches: list[torch.Tensor] | None = None
        self._d_in: int | None = None

    @property
    def d_in(self) -> int:
        """Width of the residual stream, from the LM's config (no weights are loaded)."""
        if self._d_in is None:
            config = load_lm_config(self.model_name)
            n_layers = num_layers(config)
            if n_layers is not None:  # checked before any weights are loaded
                check_layer_index(self.layer, n_layers, self.model_name)
            self._d_in = hidden_size(config)
        return self._d_in

    @property
    def hookpoint(self) -> str:
        return f"layers.{self.layer}"

    def setup(self, stage: str | None = None) -> None:
        if self.lm is not None:
            return
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        dtype = pick_dtype(self.hparams.lm_dtype, device)
        log.info("loading %s on %s in %s", self.model_name, device, dtype)
        self.lm, self.tokenizer = load_lm(self.model_name, dtype=dtype, device=device)
        check_layer(self.lm, self.layer)
        self.producer = ActivationProducer(
            self.lm,
            self.tokenizer,
            self.layer,
            ctx_len=self.hparams.ctx_len,
            lm_batch_size=self.hparams.lm_batch_size,
            exclude_special_tokens=self.hparams.exclude_special_tokens,
            exclude_first_position=self.hparams.exclude_first_position,
            outlier_multiple=self.hparams.outlier_multiple,
        )

    def metadata(self) -> dict:
        """Where the activations come from, for the exported ``cfg.json``."""
        return {
            "model": self.model_name,
            "hookpoint": self.hookpoint,
            "layer": self.layer,
            "ctx_len": self.hparams.ctx_len,
            "lm_dtype": str(self.lm.dtype).removeprefix("torch.") if self.lm else None,
            "data": {k: v for k, v in vars(self.source).items() if not k.startswith("_")},
            "exclude_special_tokens": self.hparams.exclude_special_tokens,
            "exclude_first_position": self.hparams.exclude_first_position,
            "outlier_multiple": self.hparams.outlier_multiple,
        }

    def documents(self, split: Literal["train", "val"]) -> Iterator[str]:
        docs = iter_documents(self.source, self.tokenizer)
        n_val = self.hparams.val_documents
        if split == "val":
            return itertools.islice(docs, n_val)
        return itertools.islice(docs, n_val, None)

    def train_chunks(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Training activations in stream order, one (N_i, d_in) chunk per LM batch, before
        the activation shuffle: documents (after the held-out ones, through the document
        shuffle buffer when set) -> packed sequences -> LM -> kept activations."""
        assert self.producer is not None, "call setup() first"
        docs = self.documents("train")
        if self.hparams.document_buffer:
            docs = shuffle_documents(docs, self.hparams.document_buffer, generator)
        return self.producer(pack_documents(docs, self.tokenizer, self.hparams.ctx_len))

    def _train_iter(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        produced = 0
        for batch in shuffle_batches(
            self.train_chunks(generator),
            batch_size=self.hparams.batch_size,
            buffer_size=self.hparams.buffer_size,
            generator=generator,
        ):
            produced += 1
            yield batch
        if produced == 0:
            raise ValueError(
                f"the data source {self.source.path!r} gave no training batch: it holds fewer "
                f"than batch_size={self.hparams.batch_size} usable tokens after the "
                f"{self.hparams.val_documents} validation documents; use more data or a smaller "
                "batch_size"
            )

    def val_batches(self) -> list[torch.Tensor]:
        """Held-out activations, computed once and kept in memory."""
        if self._val_batches is None:
            assert self.producer is not None, "call setup() first"
            seqs = pack_documents(self.documents("val"), self.tokenizer, self.hparams.ctx_len)
            acts, total = [], 0
            for chunk in self.producer(seqs):
                acts.append(chunk)
                total += chunk.shape[0]
                if total >= self.hparams.val_tokens:
                    break
            if not acts:
                raise ValueError(
                    f"the {self.hparams.val_documents} validation documents gave no tokens: "
                    "raise data.val_documents or set it to 0"
                )
            flat = torch.cat(acts)[: self.hparams.val_tokens]
            self._val_batches = list(flat.split(self.hparams.batch_size))
        return self._val_batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self._train_iter), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader | list:
        if self.hparams.val_documents == 0:
            return []
        return DataLoader(self.val_batches(), batch_size=None, num_workers=0)
