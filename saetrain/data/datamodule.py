"""The streaming activation DataModule: text source -> LM -> shuffled activation batches.

Configured from YAML under ``data:`` (see ``recipes/``). The LM is loaded in :meth:`setup`,
never in ``__init__``; ``d_in`` is read from the LM's config alone, so the SAE can be sized
before any weights are loaded.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..errors import UserError
from ..progress import FillReport, format_duration, stage
from .activations import ActivationProducer, pack_documents
from .cache import CacheReader, check_cache_matches, load_manifest
from .lm import (
    check_layer,
    check_layer_index,
    decoder_layers,
    hidden_size,
    load_lm,
    load_lm_config,
    num_layers,
    pick_dtype,
)
from .sources import TextSource, iter_documents
from .stream import TrainStream

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
        layer: Decoder layer whose output (the residual stream after it) is read, from 0; a
            list reads several from one forward pass (batches are then (B, n_layers, d_in),
            one SAE per layer, and a token that is a massive-activation outlier at any of them
            is dropped at all of them).
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
        val_documents: Documents held out for validation (never trained on): the first ones,
            or with ``val_every`` spread over the source; 0 disables validation.
        val_every: Hold out every ``val_every``-th document (0, n, 2n, ...) until there are
            ``val_documents``, so the held-out set samples more of the source than its start
            (sources are often ordered by topic or date); 1 holds out the first ones.
        val_tokens: At most this many held-out activations are used for validation.
        document_buffer: Shuffle training documents in a buffer of this many before
            tokenizing (0 keeps the source's order).
        seed: Seed of the shuffle buffers (rank r uses seed + r).
        cache: Read activations from this folder, written by ``python -m saetrain cache``,
            instead of running the LM (it must come from the same model and layer); the
            held-out activations come from the cache too.
    """

    def __init__(
        self,
        model: str,
        source: TextSource,
        layer: int | list[int],
        ctx_len: int = 256,
        lm_batch_size: int = 8,
        batch_size: int = 4096,
        buffer_size: int = 131072,
        lm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        exclude_special_tokens: bool = True,
        exclude_first_position: bool = True,
        outlier_multiple: float | None = 10.0,
        val_documents: int = 0,
        val_every: int = 1,
        val_tokens: int = 65536,
        document_buffer: int = 0,
        seed: int = 0,
        cache: str | None = None,
    ):
        super().__init__()
        for name, value in (
            ("ctx_len", ctx_len),
            ("lm_batch_size", lm_batch_size),
            ("batch_size", batch_size),
        ):
            if value < 1:
                raise UserError(f"data.{name} must be >= 1, got {value}")
        layers = [layer] if isinstance(layer, int) else list(layer)
        if not layers or min(layers) < 0 or len(set(layers)) != len(layers):
            raise UserError(
                f"data.layer must be a layer >= 0 or a list of distinct ones, got {layer}"
            )
        if cache and len(layers) > 1:
            raise UserError("data.cache holds one layer: train several layers from the live LM")
        if buffer_size < 2 * batch_size:
            raise UserError(
                f"data.buffer_size={buffer_size} must be at least 2 * data.batch_size "
                f"({2 * batch_size}): raise buffer_size or lower batch_size"
            )
        if val_every < 1:
            raise UserError(f"data.val_every must be >= 1, got {val_every}")
        if document_buffer < 0:
            raise UserError(f"data.document_buffer must be >= 0, got {document_buffer}")
        if outlier_multiple is not None and outlier_multiple <= 1:
            raise UserError(f"data.outlier_multiple must be > 1 or null, got {outlier_multiple}")
        self.save_hyperparameters(ignore=["source"])
        self.model_name = model
        self.source = source
        self.layer = layer
        self.layers = layers
        self.lm = None
        self.tokenizer = None
        self.producer: ActivationProducer | None = None
        self._val_batches: list[torch.Tensor] | None = None
        self._d_in: int | None = None
        self.rank, self.world_size = 0, 1
        self._stream: TrainStream | CacheReader | None = None
        self.manifest: dict | None = None  # the cache's, when reading one
        self._resume: dict | None = None  # a checkpoint's data state, used by the next stream

    @property
    def d_in(self) -> int:
        """Width of the residual stream, from the LM's config (no weights are loaded)."""
        if self._d_in is None:
            config = load_lm_config(self.model_name)
            n_layers = num_layers(config)
            if n_layers is not None:  # checked before any weights are loaded
                for layer in self.layers:
                    check_layer_index(layer, n_layers, self.model_name)
            self._d_in = hidden_size(config)
        return self._d_in

    @property
    def hookpoint(self) -> str:
        """Name of the hooked layer (the first, when there are several)."""
        return self.hookpoints[0]

    @property
    def hookpoints(self) -> list[str]:
        """Names of the hooked layers, in the order of a batch's second axis."""
        return [f"layers.{layer}" for layer in self.layers]

    def setup(self, stage: str | None = None) -> None:
        if self.lm is not None or self.manifest is not None:
            return
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if self.trainer is not None:  # each rank streams every world_size-th document
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.hparams.cache:  # no LM at all: the activations are on disk
            self.manifest = load_manifest(self.hparams.cache)
            check_cache_matches(
                self.manifest, model=self.model_name, layer=self.layer, d_in=self.d_in
            )
            return
        dtype = pick_dtype(self.hparams.lm_dtype, device)
        dtype_name = str(dtype).removeprefix("torch.")
        self._stage(f"loading the LM {self.model_name} on {device} in {dtype_name}...")
        t0 = time.perf_counter()
        self.lm, self.tokenizer = load_lm(self.model_name, dtype=dtype, device=device)
        for layer in self.layers:
            check_layer(self.lm, layer)
        self._stage(
            f"LM loaded in {format_duration(time.perf_counter() - t0)} "
            f"({len(decoder_layers(self.lm))} layers, d_in {self.d_in})"
        )
        self.producer = self._new_producer()

    def _stage(self, message: str) -> None:
        """A stage line on stderr (see ``saetrain/progress.py``), from rank 0 only."""
        if self.rank == 0:
            stage(message)

    def _new_producer(self) -> ActivationProducer:
        hp = self.hparams
        return ActivationProducer(
            self.lm,
            self.tokenizer,
            self.layer,
            ctx_len=hp.ctx_len,
            lm_batch_size=hp.lm_batch_size,
            exclude_special_tokens=hp.exclude_special_tokens,
            exclude_first_position=hp.exclude_first_position,
            outlier_multiple=hp.outlier_multiple,
        )

    def metadata(self) -> dict:
        """Where the activations come from, for the exported ``cfg.json``."""
        if self.manifest is not None:
            keep = ("model", "hookpoint", "layer", "ctx_len", "lm_dtype", "data", "documents_read")
            written = self.manifest.get("data_module") or {}  # the exclusions it applied
            rules = ("exclude_special_tokens", "exclude_first_position", "outlier_multiple")
            return {
                **{k: self.manifest.get(k) for k in keep},
                **{k: written[k] for k in rules if k in written},
                "cache": self.hparams.cache,
            }
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
        """Held-out documents (``val_documents`` of them: documents 0, val_every,
        2 * val_every, ...; the same on every rank), or all the others, for training."""
        docs = iter_documents(self.source, self.tokenizer)
        n_val, every = self.hparams.val_documents, self.hparams.val_every
        span = n_val * every  # the held-out documents all lie before this index

        def held_out(i: int) -> bool:
            return i < span and i % every == 0

        if split == "val":
            return itertools.islice((d for i, d in enumerate(docs) if held_out(i)), n_val)
        return (d for i, d in enumerate(docs) if not held_out(i))

    def rank_documents(self, skip: int = 0, start: int = 0) -> Iterator[str]:
        """This rank's training documents: number i (from ``start``) when i % world_size ==
        rank, so ranks never share one and together miss none; the first ``skip`` passed."""
        docs = itertools.islice(self.documents("train"), start, None)
        mine = itertools.islice(docs, self.rank, None, self.world_size)
        return itertools.islice(mine, skip, None)

    def make_stream(self) -> TrainStream:
        """A fresh training stream of this rank (see :class:`~saetrain.data.stream.TrainStream`)."""
        assert self.producer is not None, "call setup() first"
        hp = self.hparams
        start = self._docs_start = self._resume_start()
        return TrainStream(
            lambda skip: self.rank_documents(skip, start),
            self.tokenizer,
            self.producer,
            ctx_len=hp.ctx_len,
            batch_size=hp.batch_size,
            buffer_size=hp.buffer_size,
            document_buffer=hp.document_buffer,
            seed=hp.seed + self.rank,
            # Lines while the buffer fills before the first step (a minute on the quickstart).
            on_fill=FillReport() if self.rank == 0 else None,
        )

    def train_chunks(self) -> Iterator[torch.Tensor]:
        """Training activations in stream order, one (N_i, d_in) chunk per LM batch, before
        the activation shuffle: this rank's documents (after the held-out ones, through the
        document shuffle buffer when set) -> packed sequences -> LM -> kept activations."""
        stream = self._stream = self.make_stream()  # documents_read() counts its documents
        while (chunk := stream.next_chunk()) is not None:
            yield chunk

    def documents_read(self) -> int | None:
        """Source documents (counted from the first, held-out ones included) that lie before
        every document training has not read: a held-out evaluation skips this many (issue
        #22). With several ranks every rank must call it (one all-reduce). None when unknown."""
        if self.manifest is not None:  # the cache counted the documents it read
            return self.manifest.get("documents_read")
        if not isinstance(self._stream, TrainStream):
            return None
        # Rank r reads training documents start + r + i * world_size for i < its docs_read;
        # the held-out documents are taken out of the first val_documents * val_every.
        most = torch.tensor(self._stream.docs_read)
        if self.world_size > 1 and torch.distributed.is_initialized():
            most = most.to(self.trainer.strategy.root_device if self.trainer else "cpu")
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return (
            getattr(self, "_docs_start", 0)
            + int(most) * self.world_size
            + self.hparams.val_documents
        )

    def make_reader(self) -> CacheReader:
        """This rank's reader of the activation cache (its shards, shuffled)."""
        hp = self.hparams
        return CacheReader(
            hp.cache,
            batch_size=hp.batch_size,
            buffer_size=hp.buffer_size,
            seed=hp.seed + self.rank,
            shard_index=self.rank,
            num_shards=self.world_size,
        )

    def _train_iter(self) -> Iterator[torch.Tensor]:
        if self.manifest is not None:  # one reader across epochs: each is shuffled anew
            stream = self._stream if self._stream is not None else self.make_reader()
        else:
            stream = self.make_stream()
        if self._resume is not None and self._resume["world_size"] == self.world_size:
            stream.load_state_dict(self._resume["streams"][self.rank])
        elif self._resume is not None:  # a fresh position; count on from the batches trained
            stream.handed_out.restore(self._resume["streams"][0]["consumed"], [])
        self._resume = None
        self._stream = stream
        produced = 0
        for batch in stream:
            produced += 1
            yield batch
        if produced == 0:
            raise UserError(
                f"the data source {self.source.path!r} gave no training batch: it holds fewer "
                f"than batch_size={self.hparams.batch_size} usable tokens after the "
                f"{self.hparams.val_documents} validation documents; use more data or a smaller "
                "batch_size"
            )

    # ---------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict:
        """The training stream's position on every rank (Lightning saves it in checkpoints)."""
        if self._stream is None:
            return {}
        consumed = None
        if self.trainer is not None:  # batches trained on; the loader fetches ahead
            consumed = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed
        state = self._stream.state_dict(consumed)
        states = [state]
        if self.world_size > 1 and torch.distributed.is_initialized():
            states = [None] * self.world_size
            torch.distributed.all_gather_object(states, state)
        return {
            "model": self.model_name,
            "layer": self.layer,
            "kind": "cache" if self.manifest is not None else "live",
            "world_size": self.world_size,
            "streams": states,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume the stream where a checkpoint left it (exactly, for the same world size)."""
        if not state:
            return
        for what, saved, now in (
            ("model", state["model"], self.model_name),
            ("layer", state["layer"], self.layer),
        ):
            if saved != now:
                raise UserError(
                    f"the checkpoint was trained on {what} {saved!r} but data.{what} is {now!r}: "
                    f"resume with the same {what}, or start a new run"
                )
        kind = "cache" if self.hparams.cache else "live"
        if state.get("kind", "live") != kind:
            raise UserError(
                f"the checkpoint read {state.get('kind', 'live')} activations but this run reads "
                f"{kind} ones (data.cache={self.hparams.cache!r}): resume the way it was trained"
            )
        self._resume = state
        if state["world_size"] != self.world_size and kind == "cache":
            log.warning(
                "resuming a %d-process run with %d processes: the cache is read from a new "
                "epoch's start, so the data position is not kept",
                state["world_size"],
                self.world_size,
            )
        elif state["world_size"] != self.world_size:
            lost = sum(
                s["buffer"].shape[0] if s["buffer"] is not None else 0 for s in state["streams"]
            )
            log.warning(
                "resuming a %d-process run with %d processes: the weights, optimizer and "
                "counters are exact, but the data position is not: each old rank's shuffle "
                "buffers (%d activations in all) are dropped and documents are re-sharded from "
                "the earliest position any rank had reached, so some are seen twice",
                state["world_size"],
                self.world_size,
                lost,
            )

    def _resume_start(self) -> int:
        """First training document to stream when resuming with another world size."""
        state = self._resume
        same_world = state is not None and state["world_size"] == self.world_size
        if state is None or same_world or state.get("kind") == "cache":
            return 0
        return min(s["docs_read"] for s in state["streams"]) * state["world_size"]

    def val_batches(self) -> list[torch.Tensor]:
        """Held-out activations, computed once and kept in memory."""
        if self._val_batches is None and self.manifest is not None:
            val = self.make_reader().val() if self.manifest.get("val_file") else None
            if val is None:
                raise UserError(
                    f"the cache {self.hparams.cache} holds no validation activations: set "
                    "data.val_documents to 0, or write the cache with val_documents > 0"
                )
            self._val_batches = list(val[: self.hparams.val_tokens].split(self.hparams.batch_size))
        if self._val_batches is None:
            assert self.producer is not None, "call setup() first"
            seqs = pack_documents(self.documents("val"), self.tokenizer, self.hparams.ctx_len)
            acts, total = [], 0
            n_val, t0 = self.hparams.val_tokens, time.perf_counter()
            self._stage(f"computing up to {n_val:,} held-out activations...")
            report = FillReport("computing held-out activations", done=None, out=self._stage)
            report(0, n_val)
            # Its own producer: the training stream's outlier filter (part of the resumable
            # state) must not see held-out tokens.
            for chunk in self._new_producer()(seqs):
                acts.append(chunk)
                total += chunk.shape[0]
                report(min(total, n_val), n_val)
                if total >= self.hparams.val_tokens:
                    break
            if not acts:
                raise UserError(
                    f"the {self.hparams.val_documents} validation documents gave no tokens: "
                    "raise data.val_documents or set it to 0"
                )
            flat = torch.cat(acts)[: self.hparams.val_tokens]
            self._val_batches = list(flat.split(self.hparams.batch_size))
            took = format_duration(time.perf_counter() - t0)
            self._stage(f"{flat.shape[0]:,} held-out activations in {took}")
        return self._val_batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self._train_iter), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader | list:
        if self.hparams.val_documents == 0:
            return []
        # Ranks split the held-out batches; the metrics are reduced across them.
        mine = self.val_batches()[self.rank :: self.world_size]
        return DataLoader(mine, batch_size=None, num_workers=0)
