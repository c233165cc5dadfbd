"""Steer a Hugging Face causal LM with SAE features: forward hooks on the residual stream.

The hook sits on the output of decoder layer ``layer`` (``hidden_states[layer + 1]``, the SAE's
``cfg.extra["layer"]``) and edits it token by token, during plain forwards and during
``generate`` with or without the KV cache::

    from saetrain.steering import Intervention, steer
    with steer(model, sae, [Intervention([1234], "clamp", 8.0)]) as s:
        s.prompt_lengths = attention_mask.sum(1)      # only for positions="prompt"/"generated"
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32)

Operations, for latent i with decoder row ``W_dec[i]`` (unit norm, raw activation space):

- ``clamp`` to c: ``x + (c - f_i(x)) * W_dec[i]``, where ``f_i(x)`` is latent i's value at that
  token (0 when it is not among the top k). Only latent i changes; the SAE's reconstruction
  error stays in the stream, so with ``c = f_i(x)`` the output equals the input exactly.
- ``ablate``: clamp to 0.
- ``add`` alpha: ``x + alpha * W_dec[i]``.

Positions are counted per sequence over real tokens (0 = first non-padding token) from the
2-D attention mask the model receives, so they stay right with left padding and under the
KV cache, where each decoding step shows the hook only the new token. Without a mask they come
from the cache length. Hooks are removed when the ``with`` block ends, whatever happens.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from ..data.lm import check_layer, decoder_layers
from ..errors import UserError

if TYPE_CHECKING:
    from ..sae import SAE
    from .gate import Gate

Op = Literal["clamp", "add", "ablate"]
Positions = Literal["all", "prompt", "generated"]


@dataclass
class Intervention:
    """An edit of one or more SAE latents in the residual stream."""

    features: list[int]
    """SAE latent ids edited together (one int is accepted too)."""
    op: Op = "clamp"
    """clamp: set the latent to `value`, keeping the SAE error; add: add value * W_dec[i];
    ablate: clamp to 0."""
    value: float | list[float] = 0.0
    """Clamp target c (in the SAE's latent units) or add coefficient alpha; one number for all
    features or one per feature."""
    positions: Positions = "all"
    """Tokens to edit: all, only the prompt's, or only generated ones (the latter two need
    `Steering.prompt_lengths`)."""
    start: int = 0
    """Leave positions below this alone (0 = the first real token of each sequence)."""

    def __post_init__(self) -> None:
        if isinstance(self.features, int):
            self.features = [self.features]
        self.features = [int(f) for f in self.features]
        if not self.features or min(self.features) < 0:
            raise UserError(f"features must be a non-empty list of ids >= 0, got {self.features}")
        if self.op not in ("clamp", "add", "ablate"):
            raise UserError(f"op must be 'clamp', 'add' or 'ablate', got {self.op!r}")
        if isinstance(self.value, list | tuple) and len(self.value) != len(self.features):
            raise UserError(
                f"value has {len(self.value)} entries for {len(self.features)} features: "
                "give one number, or one per feature"
            )
        if self.positions not in ("all", "prompt", "generated"):
            raise UserError(f"positions must be all, prompt or generated, got {self.positions!r}")
        if self.start < 0:
            raise UserError(f"start must be >= 0, got {self.start}")

    def values(self, device: torch.device) -> Tensor:
        """(F,) float32: the clamp target or add coefficient of each feature."""
        if self.op == "ablate":
            return torch.zeros(len(self.features), device=device)
        v = (
            self.value
            if isinstance(self.value, list | tuple)
            else [self.value] * len(self.features)
        )
        return torch.tensor([float(x) for x in v], device=device)


def feature_values(latent_acts: Tensor, latent_indices: Tensor, features: Tensor) -> Tensor:
    """Dense values (N, F) of ``features`` (F,) from Top-k output (N, k); 0 where not selected."""
    hit = latent_indices.unsqueeze(-1) == features  # (N, k, F)
    return (latent_acts.unsqueeze(-1) * hit).sum(1)  # (N, F)


def edit(sae: SAE, x: Tensor, interventions: Sequence[Intervention], masks: Sequence[Tensor]):
    """Apply ``interventions`` to activations ``x`` (N, d_in) where each mask (N,) is true.

    An intervention is an SAE :class:`Intervention` or a
    :class:`~saetrain.steering.direction.DirectionEdit` (anything with ``delta(x)``, the change
    it makes to float32 activations, and ``positions`` / ``start``). Every edit reads the
    latents of the unedited ``x`` and the edits add up. Rows edited by
    nothing are returned bit for bit; so are rows whose edits are all zero.
    """
    if not interventions:
        return x
    xf = x.to(torch.float32)
    delta = torch.zeros_like(xf)  # (N, d)
    codes = None
    for iv, m in zip(interventions, masks, strict=True):
        if not isinstance(iv, Intervention):  # a DirectionEdit (steering/direction.py)
            delta += m.unsqueeze(-1) * iv.delta(xf)  # (N, d)
            continue
        feats = torch.tensor(iv.features, device=x.device)
        if int(feats.max()) >= sae.cfg.num_latents:
            raise UserError(
                f"feature {int(feats.max())} does not exist: the SAE has "
                f"{sae.cfg.num_latents} latents (ids 0 to {sae.cfg.num_latents - 1})"
            )
        W = sae.W_dec[feats.to(sae.device)].to(x.device, torch.float32)  # (F, d)
        values = iv.values(x.device)  # (F,)
        if iv.op == "add":
            coef = values.expand(x.shape[0], -1)  # (N, F)
        else:
            if codes is None:
                acts, idx = sae.encode(x.to(sae.device, sae.dtype))  # (N, k) each
                codes = acts.to(x.device, torch.float32), idx.to(x.device)
            f = feature_values(codes[0], codes[1], feats)  # (N, F)
            # The SAE decodes latent i as f_i * W_dec[i] / input_scale (1 for exported SAEs).
            coef = (values - f) / float(sae.input_scale)
        delta += m.unsqueeze(-1) * (coef @ W)  # (N, d)
    edited = torch.stack(list(masks)).any(0)  # (N,)
    return torch.where(edited.unsqueeze(-1), (xf + delta).to(x.dtype), x)


def token_positions(
    batch: int, length: int, attention_mask: Tensor | None, past: int | None, device
) -> Tensor:
    """(B, T) position of each token of the current chunk among its sequence's real tokens.

    From a 2-D attention mask (B, past + T) the position is the count of real tokens before it,
    so left padding does not shift it; padding gets -1. Without a mask: ``past + arange(T)``.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        if attention_mask.shape[1] >= length and attention_mask.shape[0] == batch:
            mask = attention_mask.to(device).long()
            pos = (mask.cumsum(-1) - 1)[:, -length:]  # (B, T)
            return torch.where(mask[:, -length:] > 0, pos, torch.full_like(pos, -1))
    start = past or 0
    return torch.arange(start, start + length, device=device).expand(batch, length)


def usable_tokens(
    acts: Tensor,
    keep: Tensor,
    *,
    input_ids: Tensor | None = None,
    ignore_ids: Tensor | None = None,
    positions: Tensor | None = None,
    skip_first: bool = True,
    outlier_multiple: float | None = 10.0,
) -> Tensor:
    """(B, T) bool: tokens of ``keep`` whose activations are fit for statistics and gates.

    Drops special tokens (``ignore_ids``), position 0, and massive-activation tokens whose norm
    exceeds ``outlier_multiple`` times the median norm of the row's other kept tokens: their
    latent values can be 100x the typical ones and would dominate any ranking (issue #5).
    """
    keep = keep.clone()
    if input_ids is not None and ignore_ids is not None and ignore_ids.numel():
        keep &= ~torch.isin(input_ids, ignore_ids.to(input_ids.device))
    if skip_first and positions is not None:
        keep &= positions != 0
    if outlier_multiple is not None and keep.any():
        norms = acts.float().norm(dim=-1)  # (B, T)
        masked = torch.where(keep, norms, torch.full_like(norms, float("nan")))
        median = masked.nanmedian(dim=-1, keepdim=True).values  # (B, 1)
        keep &= ~(norms > outlier_multiple * median)
    return keep


class Steering:
    """Forward hooks that steer ``model`` with ``sae``; a context manager (see :func:`steer`).

    Attributes set by the caller:
        prompt_lengths: (B,) real tokens in each sequence's prompt, for ``positions="prompt"`` or
            ``"generated"`` and for what a gate reads; None means "the whole first chunk".
        ignore_ids: token ids a gate never reads (special and chat-template tokens).
    Attributes the hooks fill in:
        gate_scores, gate_open: (B,) gate score and decision for the current batch.
        gate_reads, gate_opens: sequences the gate has scored so far, and opened.
        edited_tokens: number of token positions edited so far.
    """

    def __init__(
        self,
        model: nn.Module,
        sae: SAE,
        interventions: Sequence[Intervention] = (),
        *,
        layer: int | None = None,
        gate: Gate | None = None,
        ignore_ids: Sequence[int] | None = None,
    ):
        self.model, self.sae, self.gate = model, sae, gate
        self.interventions = list(interventions)
        self.layer = sae_layer(sae) if layer is None else int(layer)
        self.prompt_lengths: Tensor | None = None
        self.ignore_ids = None if ignore_ids is None else torch.tensor(sorted(set(ignore_ids)))
        self.gate_scores: Tensor | None = None
        self.gate_open: Tensor | None = None
        self.gate_reads = self.gate_opens = 0
        self.edited_tokens = 0
        self._call: dict = {}
        self._handles: list = []
        self._signature = inspect.signature(model.forward)
        self._var_kw = next(
            (p.name for p in self._signature.parameters.values() if p.kind == p.VAR_KEYWORD), None
        )

    def attach(self) -> Steering:
        """Register the hooks (for callers that cannot use ``with``); undo with :meth:`remove`."""
        if self._handles:
            return self
        check_layer(self.model, self.layer)
        block = decoder_layers(self.model)[self.layer]
        self._handles = [
            self.model.register_forward_pre_hook(self._read_call, with_kwargs=True),
            self.model.register_forward_hook(self._end_call, always_call=True),
            block.register_forward_hook(self._steer),
        ]
        return self

    def remove(self) -> None:
        """Remove every hook this object registered; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._call = {}

    def __enter__(self) -> Steering:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _read_call(self, _module, args, kwargs) -> None:
        # The model's own forward sees the full 2-D mask and the cache; the decoder block
        # does not (it gets a 4-D mask, or none under SDPA), so read them here.
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        if self._var_kw is not None:
            bound.update(bound.pop(self._var_kw, None) or {})
        past = None
        for value in bound.values():
            if hasattr(value, "get_seq_length"):
                past = int(value.get_seq_length())
        if past is None and isinstance(bound.get("cache_position"), Tensor):
            past = int(bound["cache_position"].reshape(-1)[0])
        self._call = {
            "mask": bound.get("attention_mask"),
            "past": past,
            "input_ids": bound.get("input_ids"),
        }

    def _end_call(self, *_args) -> None:
        self._call = {}

    def _steer(self, _module, _args, output):
        h = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        B, T, d = h.shape
        if d != self.sae.cfg.d_in:
            raise UserError(
                f"the SAE takes d_in={self.sae.cfg.d_in} but layer {self.layer} of "
                f"{type(self.model).__name__} outputs width {d}: use the model it was trained on"
            )
        mask, past = self._call.get("mask"), self._call.get("past")
        pos = token_positions(B, T, mask, past, h.device)  # (B, T)
        if mask is not None and mask.dim() == 2 and mask.shape[1] >= T:
            past = mask.shape[1] - T
        real = pos >= 0
        lengths = self._lengths(B, h.device)  # (B,) or None
        if self.gate is not None:
            self._run_gate(h, pos, real, lengths, starts_sequence=not past)
        if not self.interventions:
            return output
        masks = []
        for iv in self.interventions:
            m = real & (pos >= iv.start)
            if iv.positions != "all":
                if lengths is None:
                    raise ValueError(
                        f"positions={iv.positions!r} needs the prompt lengths: set "
                        "`steering.prompt_lengths` or use saetrain.steering.generate"
                    )
                in_prompt = pos < lengths.unsqueeze(1)
                m &= in_prompt if iv.positions == "prompt" else ~in_prompt
            if self.gate_open is not None:
                m &= self.gate_open.to(h.device).unsqueeze(1)
            masks.append(m.reshape(-1))
        if not torch.stack(masks).any():
            return output
        self.edited_tokens += int(torch.stack(masks).any(0).sum())
        new = edit(self.sae, h.reshape(B * T, d), self.interventions, masks).view(B, T, d)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _lengths(self, batch: int, device) -> Tensor | None:
        if self.prompt_lengths is None:
            return None
        lengths = torch.as_tensor(self.prompt_lengths, device=device).reshape(-1)
        if lengths.numel() != batch:
            raise ValueError(
                f"prompt_lengths has {lengths.numel()} entries but the batch has {batch} "
                "sequences (beam search and num_return_sequences > 1 are not supported)"
            )
        return lengths

    def _run_gate(self, h, pos, real, lengths, *, starts_sequence: bool) -> None:
        """Score the prompt once, when a sequence starts; later chunks reuse the decision."""
        if not starts_sequence:
            if self.gate_open is None or self.gate_open.numel() != h.shape[0]:
                raise ValueError(
                    "the gate has not read this batch's prompt: start generation inside the "
                    "`steer(...)` block so the gate sees the prompt before any cached step"
                )
            return
        prompt = real if lengths is None else real & (pos < lengths.unsqueeze(1))
        # The prompt's tokens that are not special ones (usable_tokens then also drops the
        # first position and outliers); the last of them is what a last-token probe reads: a
        # chat template's header ends in plain text, and right padding (lm-eval's scoring
        # batches) is special.
        content = usable_tokens(
            h,
            prompt,
            input_ids=self._call.get("input_ids"),
            ignore_ids=self.ignore_ids,
            skip_first=False,
            outlier_multiple=None,
        )
        last_pos = torch.where(content, pos, -1).amax(1, keepdim=True)  # (B, 1)
        last = content & (pos == last_pos)
        read = usable_tokens(h, content, positions=pos, outlier_multiple=self.gate.outlier_multiple)
        self.gate_scores = self.gate.scores(h, read, last).float()  # (B,)
        self.gate_open = self.gate_scores > self.gate.threshold
        self.gate_reads += int(self.gate_open.numel())
        self.gate_opens += int(self.gate_open.sum())


def sae_layer(sae: SAE) -> int:
    """The decoder layer an SAE was trained on, from ``cfg.extra["layer"]``."""
    layer = sae.cfg.extra.get("layer")
    if layer is None:
        raise UserError(
            "the SAE's cfg.json has no extra.layer: pass layer= (the decoder layer whose output "
            "it was trained on)"
        )
    return int(layer)


def steer(
    model: nn.Module,
    sae: SAE,
    interventions: Intervention | Sequence[Intervention] = (),
    *,
    layer: int | None = None,
    gate: Gate | None = None,
    ignore_ids: Sequence[int] | None = None,
) -> Steering:
    """Steer ``model`` with ``sae`` inside a ``with`` block (or call ``.attach()``/``.remove()``).

    ``layer`` defaults to the SAE's ``cfg.extra["layer"]``. With a ``gate``, each sequence's
    prompt is scored once when the sequence starts and only sequences the gate opens are edited,
    for the prompt and every later token; pass ``ignore_ids=tokenizer.all_special_ids`` so the gate
    does not read special tokens. Works around any forward, ``generate`` (greedy or
    sampled, with or without the KV cache) and evaluation harness that calls the model.
    """
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    return Steering(model, sae, interventions, layer=layer, gate=gate, ignore_ids=ignore_ids)
