"""The live training stream as a resumable state machine: documents -> batches of activations.

:class:`TrainStream` does what ``shuffle_batches(producer(pack_documents(docs)))`` does (see
``activations.py``), but as explicit state instead of a chain of generators, so that
:meth:`TrainStream.state_dict` can capture every stage mid-flight and a new process can carry on
bit for bit (issue #3, exact resume): the number of this rank's documents read, the document
shuffle buffer, the tokens packed but not yet in a full sequence, the sequences not yet run
through the LM, the massive-activation filter's window, the rows of the current LM chunk not
yet in the activation buffer, the activation buffer itself, the batches shuffled but not yet
served, and both random generators.

Lightning fetches a batch or two ahead of the one it trains on, so the state is taken "as of
``consumed`` batches": the batches handed out beyond that are kept and served again first.

    stream = TrainStream(docs_from, tokenizer, producer, ctx_len=256, batch_size=4096,
                         buffer_size=131072, document_buffer=2000, seed=0)
    for batch in stream: ...                        # (batch_size, d_in)
    state = stream.state_dict(consumed=n)           # after training on n batches
    stream2 = TrainStream(...same args...); stream2.load_state_dict(state)   # batch n + 1 on

Memory: the activation buffer holds ``buffer_size * d_in`` floats, and a checkpoint carries
up to that many (plus one LM chunk), so a checkpoint is about ``4 * buffer_size * d_in`` bytes
larger than the SAE and its optimizer state (300 MB at 131,072 x 576).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..errors import UserError
from .activations import ActivationProducer, TokenStats, document_tokens

_TOKENIZE_DOCS = 64  # documents tokenized per tokenizer call, as pack_documents does


class HandedOut:
    """The batches a resumable iterator has handed out: a count, the last ``keep`` of them,
    and those to serve again after a resume.

    Lightning fetches a batch or two ahead of the one it trains on, so a state is taken "as of
    ``consumed``" batches: the ones handed out beyond that are saved and served first again.
    Shared by :class:`TrainStream` and :class:`~saetrain.data.cache.CacheReader`.
    """

    def __init__(self, keep: int = 4):  # Lightning prefetches one; keep a margin
        self.count = 0
        self.recent: deque[Tensor] = deque(maxlen=keep)
        self.replay: deque[Tensor] = deque()

    def next(self, produce: Callable[[], Tensor | None]) -> Tensor | None:
        """A batch to replay if any, else ``produce()``'s; None when that is None."""
        batch = self.replay.popleft() if self.replay else produce()
        if batch is not None:
            self.count += 1
            self.recent.append(batch)
        return batch

    def as_of(self, consumed: int | None, what: str) -> tuple[int, list[Tensor]]:
        """(consumed, the batches to serve again after a resume at it): those handed out
        after batch ``consumed`` (default: none), then any still waiting from an earlier one."""
        consumed = self.count if consumed is None else consumed
        back = self.count - consumed
        if not 0 <= back <= len(self.recent):
            raise ValueError(
                f"cannot take {what} state as of batch {consumed}: {self.count} were handed "
                f"out and only the last {len(self.recent)} are kept"
            )
        return consumed, list(self.recent)[len(self.recent) - back :] + list(self.replay)

    def restore(self, consumed: int, replay: list[Tensor]) -> None:
        """Count on from ``consumed`` batches and serve ``replay`` first."""
        self.count = consumed
        self.recent.clear()
        self.replay = deque(replay)


class TrainStream:
    """Resumable iterator over (batch_size, d_in) training batches of one rank.

    Args:
        docs_from: ``docs_from(skip)`` returns an iterator over this rank's training documents
            with the first ``skip`` passed over (re-opened on resume).
        tokenizer: The LM's tokenizer (BOS before and EOS after each document, as
            :func:`~saetrain.data.activations.pack_documents`).
        producer: Runs the LM and keeps the activations an SAE should see.
        ctx_len: Tokens per packed sequence.
        batch_size: Activations per batch.
        buffer_size: Rows of the activation shuffle buffer (>= 2 * batch_size).
        document_buffer: Documents in the document shuffle buffer; 0 keeps the source order.
        seed: Seeds the activation shuffle (``seed``) and the document shuffle (``seed + 1``).
        on_fill: Called with (rows filled, buffer_size) when the buffer starts filling and after
            each LM chunk, until it first serves batches, to report the fill
            (:class:`saetrain.progress.FillReport`); not part of the state.
    """

    def __init__(
        self,
        docs_from: Callable[[int], Iterator[str]],
        tokenizer,
        producer: ActivationProducer,
        *,
        ctx_len: int,
        batch_size: int,
        buffer_size: int,
        document_buffer: int = 0,
        seed: int = 0,
        on_fill: Callable[[int, int], None] | None = None,
    ):
        if buffer_size < 2 * batch_size:
            raise ValueError(
                f"buffer_size={buffer_size} must be at least 2 * batch_size={2 * batch_size}"
            )
        self.docs_from = docs_from
        self.tokenizer = tokenizer
        self.producer = producer
        self.ctx_len, self.batch_size, self.buffer_size = ctx_len, batch_size, buffer_size
        self.document_buffer = document_buffer
        self.generator = torch.Generator().manual_seed(seed)
        self.doc_generator = torch.Generator().manual_seed(seed + 1)
        # Documents
        self._docs: Iterator[str] | None = None
        self.docs_read = 0  # this rank's documents taken from the source
        self.source_done = False
        self.doc_buffer: list[str] = []
        self.doc_drain: list[int] | None = None  # order the buffer empties in at the end
        # Tokens and sequences
        self.pending_tokens: list[int] = []
        self.sequences: deque[Tensor] = deque()  # (ctx_len,) each, not yet run
        self.sequences_done = False
        # Activations
        self.chunk_rest: Tensor | None = None  # (r, d) rows of the last LM chunk not buffered
        self.buffer: Tensor | None = None  # (buffer_size, d)
        self.filled = 0
        self.ready: deque[Tensor] = deque()  # shuffled batches not yet handed out
        self.ended = False
        self.handed_out = HandedOut()
        self.on_fill = on_fill

    # ------------------------------------------------------------------ documents

    def _source_next(self) -> str | None:
        if self.source_done:
            return None
        if self._docs is None:
            self._docs = self.docs_from(self.docs_read)
        doc = next(self._docs, None)
        if doc is None:
            self.source_done = True
        else:
            self.docs_read += 1
        return doc

    def _next_doc(self) -> str | None:
        """The next document, through the document shuffle buffer when there is one."""
        if not self.document_buffer:
            return self._source_next()
        while self.doc_drain is None and len(self.doc_buffer) < self.document_buffer:
            doc = self._source_next()
            if doc is None:
                break
            self.doc_buffer.append(doc)
        if self.doc_drain is None:
            doc = self._source_next()
            if doc is not None:  # swap it for a random buffered one (shuffle_documents)
                i = int(torch.randint(len(self.doc_buffer), (1,), generator=self.doc_generator))
                self.doc_buffer[i], doc = doc, self.doc_buffer[i]
                return doc
            order = torch.randperm(len(self.doc_buffer), generator=self.doc_generator)
            self.doc_drain = order.tolist()[::-1]  # popped from the end
        if not self.doc_drain:
            return None
        return self.doc_buffer[self.doc_drain.pop()]

    # ------------------------------------------------------------------ sequences

    def _pack_more(self) -> None:
        """Tokenize up to 64 documents into ``pending_tokens`` and cut full sequences."""
        texts = []
        while len(texts) < _TOKENIZE_DOCS:
            doc = self._next_doc()
            if doc is None:
                break
            texts.append(doc)
        if not texts:
            self.sequences_done = True  # the tail shorter than ctx_len is dropped
            return
        self.pending_tokens.extend(document_tokens(texts, self.tokenizer))
        n_full = len(self.pending_tokens) // self.ctx_len
        if n_full:
            block = torch.tensor(self.pending_tokens[: n_full * self.ctx_len], dtype=torch.long)
            self.pending_tokens = self.pending_tokens[n_full * self.ctx_len :]
            self.sequences.extend(block.view(n_full, self.ctx_len))

    def next_chunk(self) -> Tensor | None:
        """Activations (N, d) of the next LM batch of sequences, or None at the end."""
        lm_batch = self.producer.lm_batch_size
        while len(self.sequences) < lm_batch and not self.sequences_done:
            self._pack_more()
        if not self.sequences:
            return None
        batch = [self.sequences.popleft() for _ in range(min(lm_batch, len(self.sequences)))]
        return self.producer.activations(torch.stack(batch))

    # ------------------------------------------------------------------ batches

    def _serve(self, count: int) -> None:
        """Shuffle the buffer and queue its first count // batch_size batches."""
        buf, n = self.buffer, self.filled
        perm = torch.randperm(n, generator=self.generator).to(buf.device)
        buf[:n] = buf[:n][perm]
        served = (count // self.batch_size) * self.batch_size
        for start in range(0, served, self.batch_size):
            self.ready.append(buf[start : start + self.batch_size].clone())
        rest = n - served
        buf[:rest] = buf[served:n].clone()
        self.filled = rest
        self.on_fill = None  # only the first fill is reported

    def _refill(self) -> None:
        """Fill the buffer from LM chunks until some batches are ready or the data ends."""
        if self.on_fill is not None and not self.ready:
            self.on_fill(self.filled, self.buffer_size)  # the fill starts
        while not self.ready and not self.ended:
            if self.chunk_rest is None or self.chunk_rest.shape[0] == 0:
                self.chunk_rest = self.next_chunk()
                if self.chunk_rest is None:
                    self.ended = True
                    if self.buffer is not None and self.filled >= self.batch_size:
                        self._serve(self.filled)
                    return
            chunk = self.chunk_rest
            if self.buffer is None:
                self.buffer = chunk.new_empty(self.buffer_size, *chunk.shape[1:])
            take = min(self.buffer_size - self.filled, chunk.shape[0])
            self.buffer[self.filled : self.filled + take] = chunk[:take]
            self.filled += take
            self.chunk_rest = chunk[take:]
            if self.on_fill is not None:
                self.on_fill(self.filled, self.buffer_size)
            if self.filled == self.buffer_size:
                self._serve(self.buffer_size // 2)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> Tensor:
        batch = self.handed_out.next(self._next_ready)
        if batch is None:
            raise StopIteration
        return batch

    def _next_ready(self) -> Tensor | None:
        self._refill()
        return self.ready.popleft() if self.ready else None

    # ------------------------------------------------------------------ state

    def state_dict(self, consumed: int | None = None) -> dict:
        """Everything needed to go on from batch ``consumed`` + 1 (default: all handed out).

        Tensors are moved to the CPU; activations keep their dtype, so resuming is exact.
        """
        # Batches handed out but not trained on are served again first on resume.
        consumed, replay = self.handed_out.as_of(consumed, "the stream's")

        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu()

        outliers = self.producer.outliers
        return {
            "version": 1,
            "consumed": consumed,
            "docs_read": self.docs_read,
            "source_done": self.source_done,
            "doc_buffer": list(self.doc_buffer),
            "doc_drain": None if self.doc_drain is None else list(self.doc_drain),
            "doc_generator": self.doc_generator.get_state(),
            "pending_tokens": list(self.pending_tokens),
            "sequences": torch.stack(list(self.sequences)) if self.sequences else None,
            "sequences_done": self.sequences_done,
            "outliers": outliers.state_dict(),
            "token_stats": vars(self.producer.stats).copy(),
            "chunk_rest": cpu(self.chunk_rest),
            "buffer": cpu(self.buffer[: self.filled]) if self.buffer is not None else None,
            "buffer_rows": self.buffer_size,
            "ready": [cpu(b) for b in self.ready],
            "ended": self.ended,
            "generator": self.generator.get_state(),
            "replay": [cpu(b) for b in replay],
        }

    def load_state_dict(self, state: dict) -> None:
        """Carry on from a :meth:`state_dict` of a stream built with the same arguments."""
        if state.get("version") != 1:
            raise UserError(f"unknown training-stream state version {state.get('version')!r}")
        if state["buffer_rows"] != self.buffer_size:
            raise UserError(
                f"the checkpoint's activation buffer has {state['buffer_rows']} rows but "
                f"data.buffer_size is {self.buffer_size}: resume with the same buffer_size"
            )
        device = self.producer.device
        self._docs = None
        self.docs_read, self.source_done = state["docs_read"], state["source_done"]
        self.doc_buffer = list(state["doc_buffer"])
        self.doc_drain = None if state["doc_drain"] is None else list(state["doc_drain"])
        self.doc_generator.set_state(state["doc_generator"])
        self.pending_tokens = list(state["pending_tokens"])
        seqs = state["sequences"]
        self.sequences = deque(seqs.unbind(0) if seqs is not None else ())
        self.sequences_done = state["sequences_done"]
        self.producer.outliers.load_state_dict(state["outliers"])
        self.producer.stats = TokenStats(**state["token_stats"])
        rest = state["chunk_rest"]
        self.chunk_rest = None if rest is None else rest.to(device)
        buf = state["buffer"]
        self.buffer, self.filled = None, 0
        if buf is not None:
            self.buffer = buf.new_empty(self.buffer_size, *buf.shape[1:]).to(device)
            self.buffer[: buf.shape[0]] = buf.to(device)
            self.filled = buf.shape[0]
        self.ready = deque(b.to(device) for b in state["ready"])
        self.ended = state["ended"]
        self.generator.set_state(state["generator"])
        self.handed_out.restore(state["consumed"], [b.to(device) for b in state["replay"]])
