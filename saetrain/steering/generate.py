"""Batched greedy chat generation, steered or not, single- or multi-turn; and the next-token
loss on fixed replies that measures what steering costs the model's language.

    gens = generate(model, tok, ["How do I bake bread?"], sae=sae,
                    interventions=[Intervention([1234], "clamp", 8.0)], max_new_tokens=48)
    gens[0].response

Prompts go through the tokenizer's chat template with the generation prompt, are left-padded
into batches and decoded greedily; every prompt and generated token is steered (per each
intervention's ``positions``). A prompt given as a list of user turns is a conversation: the
model answers each turn in order, its own replies kept in the history, and the last reply is
the one returned (and judged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .hooks import Intervention, Steering

# End-of-turn tokens of common chat templates; generation also stops on these when the
# tokenizer knows them (SmolLM2/ChatML, Phi-3, Llama 3, Gemma).
END_OF_TURN = ("<|im_end|>", "<|end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class Generation:
    """One prompt's (or conversation's) result."""

    prompt: str
    """The last user turn."""
    response: str
    """The model's reply to it."""
    messages: list[dict] = field(default_factory=list)
    """The whole conversation, replies included."""
    gate_open: bool | None = None
    """Whether the gate opened for the last turn (None without a gate)."""
    gate_score: float | None = None
    """The gate's score of the last turn's prompt."""


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` through the chat template (plain "User:/Assistant:" text for a
    tokenizer without one), with BOS when the tokenizer adds one and the template does not."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    else:
        names = {"user": "User", "assistant": "Assistant", "system": "System"}
        text = "".join(f"{names.get(m['role'], m['role'])}: {m['content']}\n\n" for m in messages)
        text += "Assistant:" if add_generation_prompt else ""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    if adds_bos and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``, both (B, T_max)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """Token ids that end a reply: the model's EOS, the tokenizer's, and known end-of-turn ones."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    ids.update(tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in special)
    return sorted(ids)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _steering(model, sae, interventions, gate, layer, tokenizer) -> Steering | None:
    if sae is None:
        if interventions or gate is not None:
            raise ValueError("interventions and gates need an SAE: pass sae=")
        return None
    ignore = tokenizer.all_special_ids
    return Steering(model, sae, interventions, layer=layer, gate=gate, ignore_ids=ignore)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str | Sequence[str]],
    *,
    sae=None,
    interventions: Sequence[Intervention] = (),
    gate=None,
    layer: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    use_cache: bool = True,
    system: str | None = None,
) -> list[Generation]:
    """Greedy replies to ``prompts`` (a string, or a list of user turns for a conversation)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}"
        )
    convs = [[p] if isinstance(p, str) else list(p) for p in prompts]
    if any(not c for c in convs):
        raise ValueError("every conversation needs at least one user turn")
    steering = _steering(model, sae, interventions, gate, layer, tokenizer)
    history: list[list[dict]] = [
        [{"role": "system", "content": system}] if system else [] for _ in convs
    ]
    results = [Generation(prompt=c[-1], response="") for c in convs]
    device, pad = _device(model), pad_token_id(tokenizer)
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=stop_ids(model, tokenizer),
        use_cache=use_cache,
    )
    if steering is not None:
        steering.attach()
    try:
        for turn in range(max(len(c) for c in convs)):
            active = [i for i, c in enumerate(convs) if len(c) > turn]
            for start in range(0, len(active), batch_size):
                rows = active[start : start + batch_size]
                for i in rows:
                    history[i].append({"role": "user", "content": convs[i][turn]})
                seqs = [render(tokenizer, history[i]) for i in rows]
                ids, mask = left_pad(seqs, pad)
                if steering is not None:
                    steering.prompt_lengths = mask.sum(1)
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=config,
                )  # (B, T + new)
                texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
                for j, i in enumerate(rows):
                    history[i].append({"role": "assistant", "content": texts[j].strip()})
                    results[i].response = texts[j].strip()
                    if steering is not None and steering.gate_open is not None:
                        results[i].gate_open = bool(steering.gate_open[j])
                        results[i].gate_score = float(steering.gate_scores[j])
    finally:
        if steering is not None:
            steering.remove()
    for r, h in zip(results, history, strict=True):
        r.messages = h
    return results


@torch.no_grad()
def reply_loss(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    sae=None,
    interventions: Sequence[Intervention] = (),
    gate=None,
    layer: int | None = None,
    batch_size: int = 8,
) -> float:
    """Mean next-token cross-entropy (nats) of fixed replies given their prompts, (prompt, reply)
    pairs in the chat template, steered as in :func:`generate` (the reply counts as generated).

    The difference from the unsteered loss on the same pairs says how much an intervention
    damages ordinary language, at a fraction of the cost of generating.
    """
    steering = _steering(model, sae, interventions, gate, layer, tokenizer)
    device, pad = _device(model), pad_token_id(tokenizer)
    total, count = 0.0, 0
    if steering is not None:
        steering.attach()
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            prompts = [render(tokenizer, [{"role": "user", "content": p}]) for p, _ in chunk]
            fulls = [
                p + tokenizer(r, add_special_tokens=False)["input_ids"]
                for p, (_, r) in zip(prompts, chunk, strict=True)
            ]
            ids, mask = left_pad(fulls, pad)
            targets = ids.clone()
            for i, (p, f) in enumerate(zip(prompts, fulls, strict=True)):
                targets[i, : ids.shape[1] - len(f) + len(p)] = -100  # padding and prompt
            if steering is not None:
                steering.prompt_lengths = torch.tensor([len(p) for p in prompts])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                targets[:, 1:].flatten().to(device),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss)
            count += int((targets[:, 1:] != -100).sum())
    finally:
        if steering is not None:
            steering.remove()
    return total / max(count, 1)
