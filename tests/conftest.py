"""Shared fixtures: tiny random causal LMs and a tiny tokenizer with a chat template, built
from configs in a temporary folder (see ``lmfixtures.py``); nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; fail fast instead of retrying
from lmfixtures import make_model, make_tokenizer, random_sentence


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=["phi3"])
def tiny_model_dir(tmp_path_factory, request, tokenizer) -> Path:
    """A saved tiny random Phi-3 with the tiny tokenizer, loadable by ``from_pretrained``."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    make_model(request.param, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    """A JSONL file of 300 short messages-style conversations."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with path.open("w") as f:
        for _ in range(300):
            msgs = []
            for _turn in range(rng.randint(1, 3)):
                msgs.append({"role": "user", "content": random_sentence(rng)})
                msgs.append({"role": "assistant", "content": random_sentence(rng)})
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="session")
def sae_dir(tiny_model_dir, chat_jsonl, tmp_path_factory) -> Path:
    """A random tiny SAE (32 -> 64, k=4) for layer 1 of the tiny model, saved in our format,
    its cfg.json naming the chat corpus as its training data (for the corpus strength units)."""
    import torch

    from saetrain import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, num_latents=64, k=4))
    extra = {"model": str(tiny_model_dir), "layer": 1, "ctx_len": 64}
    extra["data"] = {"path": str(chat_jsonl)}
    return sae.save(tmp_path_factory.mktemp("sae") / "tiny", extra)
