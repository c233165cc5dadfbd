"""Tiny test models: random causal LMs (Phi-3, Llama, GPT-2) and a tiny byte-level tokenizer
with a chat template, all built from configs in a temporary folder; nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

import torch

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

WORDS = (
    "the cat dog sat on a mat and ran to see bird tree sky blue red green house car "
    "river stone light dark water fire small big quick slow happy sad one two three"
).split()


TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def tiny_fit_args(model_dir, data, out_dir, *extra) -> list[str]:
    """``saetrain fit`` arguments for recipes/tiny.yaml on a test model and data file."""
    data_args = ["--data.model", str(model_dir), "--data.source.path", str(data)]
    return ["fit", "--config", str(TINY_RECIPE), *data_args, "--out_dir", str(out_dir), *extra]


def make_tokenizer():
    """A byte-level tokenizer (256 byte tokens + Phi-3-style specials) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    fast.chat_template = PHI3_TEMPLATE
    return fast


def make_model(arch: str, vocab_size: int, num_layers: int = 3, width: int = 32):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    if arch == "phi3":
        cfg = Phi3Config(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            **common,
        )
        return Phi3ForCausalLM(cfg)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
        return LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=width, n_layer=num_layers, n_head=4, n_positions=512, **common)
        return GPT2LMHeadModel(cfg)
    raise ValueError(arch)


def random_sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "."


def error_line(capsys) -> str:
    """The last line a CLI command printed to stderr, checking it printed no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    assert not any("Traceback" in line for line in err)
    return err[-1]
