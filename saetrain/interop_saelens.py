"""SAELens' file format, both ways (issues #6 and #22); :mod:`saetrain.interop` dispatches here.

A folder SAELens >= 6 reads with ``SAE.load_from_disk``: ``cfg.json`` + ``sae_weights.safetensors``
with W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,). Checked against
SAELens 6.54.12 (pip) and the source of 6.18.0: ``sae_lens/saes/topk_sae.py`` (``TopKSAE``),
``sae_lens/saes/jumprelu_sae.py`` (``JumpReLUSAE.encode``), ``sae_lens/saes/batchtopk_sae.py``
(``BatchTopKTrainingSAE.process_state_dict_for_saving_inference``) and ``sae_lens/saes/sae.py``
(``SAEConfig``, ``TrainingSAEConfig._metadata_with_training_info``).

- A Top-k SAE is ``architecture: "topk"`` with ``k`` (and ``rescale_acts_by_decoder_norm``
  false: our decoder rows are unit-norm).
- A BatchTopK SAE is ``architecture: "jumprelu"`` with a ``threshold`` tensor (d_sae,): our one
  threshold repeated per latent, as SAELens' own BatchTopK trainer saves its inference model.
  SAELens' JumpReLU is relu(pre) * (pre > threshold); ours is pre * (pre > threshold) with a
  threshold >= 0, the same values (at threshold 0 both are relu). The input scale is folded into
  b_enc, b_dec and the threshold alike (pre-activations of raw inputs are ours / scale).
- Matryoshka prefixes and the training architecture go into ``metadata`` as SAELens' trainer
  records its own (``training_architecture``: ``topk``, ``batchtopk``, ``matryoshka_batchtopk``
  or our ``matryoshka_topk``; ``training_architecture_details``: ``k``, ``matryoshka_widths``),
  and our whole config into ``metadata.saetrain``, which the reader prefers.

Reading takes ``topk`` and ``jumprelu`` folders, ours or a peer's (a JumpReLU becomes a
``batchtopk`` SAE used at its threshold, one per latent unless all are equal), and folds
SAELens' options (apply_b_dec_to_input false, rescale_acts_by_decoder_norm, an
``activation_scaler.json`` scale) into our layout. The helpers shared with the sparsify and
Lightning readers (:func:`layer_of`, :func:`peer_config`, :func:`assemble`) live here too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .errors import UserError
from .files import read_json
from .sae import (
    SAE,
    SAE_CONFIG,
    SAEConfig,
    check_shapes,
    config_from,
    open_safetensors,
    read_sae_config,
)

SAELENS_WEIGHTS = "sae_weights.safetensors"
# The oldest SAELens whose loader reads this cfg.json layout; older layouts are converted by it.
SAELENS_FORMAT_VERSION = "6.0.0"


def layer_of(hook: str | None) -> int | None:
    """Layer L of ``layers.L`` / ``model.layers.L`` / ``h.L`` or ``blocks.L.hook_resid_post``."""
    m = re.fullmatch(r"(?:.*\.)?(?:layers|h)[._](\d+)|blocks\.(\d+)\.hook_resid_post", hook or "")
    return int(m.group(1) or m.group(2)) if m else None


def assemble(
    source: Path, cfg: SAEConfig, tensors: dict[str, Tensor], input_scale: float, device: Any
) -> SAE:
    """An SAE from (num_latents, d_in)-layout tensors, checked against ``cfg``."""
    check_shapes(source, cfg, {k: tuple(v.shape) for k, v in tensors.items()})
    return SAE.from_tensors(cfg, tensors, input_scale=input_scale, device=device)


def peer_config(source: Path, saved: dict | None, extra: dict, **shape: Any) -> SAEConfig:
    """Our config: the one we stored in the peer's file if any, with the peer's shape fields
    (errors name ``source``, the file they came from)."""
    saved = saved if isinstance(saved, dict) else {}
    base = {**saved, **shape}
    base["extra"] = {**(saved.get("extra") or {}), **extra}
    base.setdefault("normalize_activations", False)
    return config_from(source, base)


# --- writing -------------------------------------------------------------------------------------


def write_saelens(sae: SAE, path: Path, hookpoint: str | None) -> None:
    """``sae`` as a SAELens folder ``path``: Top-k as ``topk``, BatchTopK as ``jumprelu``."""
    c = sae.cfg
    w = sae.folded_state_dict()
    jumprelu = c.activation == "batchtopk"  # with its threshold estimated (export_sae checks)
    layer = layer_of(hookpoint)
    extra = c.extra
    data = extra.get("data") if isinstance(extra.get("data"), dict) else {}
    details: dict[str, Any] = {"k": c.k}
    if c.matryoshka_prefixes:
        details["matryoshka_widths"] = list(c.matryoshka_prefixes)
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": extra.get("model"),
        "hook_name": f"blocks.{layer}.hook_resid_post" if layer is not None else hookpoint,
        "hook_head_index": None,
        "context_size": extra.get("ctx_len"),
        "dataset_path": data.get("path"),
        "exclude_special_tokens": extra.get("exclude_special_tokens"),
        "training_architecture": ("matryoshka_" if c.matryoshka_prefixes else "") + c.activation,
        "training_architecture_details": details,
        "saetrain": {**c.to_dict(), "extra": {**extra, "hookpoint": hookpoint}},
    }
    cfg: dict[str, Any] = {"architecture": "jumprelu" if jumprelu else "topk"}
    cfg.update(d_in=c.d_in, d_sae=c.num_latents)
    if not jumprelu:
        cfg["k"] = c.k
    cfg.update(
        dtype=str(sae.dtype).removeprefix("torch."),
        device="cpu",
        apply_b_dec_to_input=True,
        normalize_activations="none",
        reshape_activations="none",
    )
    if not jumprelu:  # (SAELens' JumpReLU has no such option)
        cfg["rescale_acts_by_decoder_norm"] = False  # our decoder rows are already unit-norm
    cfg["metadata"] = {k: v for k, v in metadata.items() if v is not None or k.startswith("sae_")}
    tensors = {"W_enc": w["W_enc"].T.contiguous(), "b_enc": w["b_enc"]}
    tensors.update(W_dec=w["W_dec"], b_dec=w["b_dec"])
    if jumprelu:  # one per latent, in the weights' dtype, as SAELens' threshold parameter is
        threshold = w["threshold"].to(sae.dtype).expand(c.num_latents)
        tensors["threshold"] = threshold.contiguous()
    save_file(tensors, str(path / SAELENS_WEIGHTS))
    (path / SAE_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


# --- reading -------------------------------------------------------------------------------------


def read_saelens(path: Path, device: Any) -> SAE:
    """The SAE in the SAELens folder ``path`` (``topk`` or ``jumprelu``), taking raw inputs."""
    cfg = read_sae_config(path / SAE_CONFIG)
    meta = dict(cfg.get("metadata") or {})
    version = str(cfg.get("sae_lens_version") or meta.get("sae_lens_version") or "0")
    if int(re.match(r"\d*", version).group(0) or 0) < 6:
        # SAELens < 6 layout (converted the same way by its loader): hook_point, metadata at
        # the top level, activation_fn_str "topk" with activation_fn_kwargs {"k": ...}.
        meta = {**cfg, **meta, "hook_name": cfg.get("hook_name") or cfg.get("hook_point")}
        act = cfg.get("activation_fn_str") or cfg.get("activation_fn")
        if act == "topk" and "k" in (cfg.get("activation_fn_kwargs") or {}):
            cfg["architecture"], cfg["k"] = "topk", cfg["activation_fn_kwargs"]["k"]
    arch = cfg.get("architecture", "standard")
    if arch not in ("topk", "jumprelu"):
        raise UserError(
            f"{path} is a SAELens {arch!r} SAE; saetrain loads only Top-k and JumpReLU SAEs "
            "(architecture 'topk' or 'jumprelu')"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise UserError(
            f"{path}: SAELens reshape_activations={cfg['reshape_activations']!r} "
            "(attention hook_z SAEs) is not supported"
        )
    with open_safetensors(path / SAELENS_WEIGHTS) as f:
        w = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    if "scaling_factor" in w and not torch.all(w.pop("scaling_factor") == 1):
        raise UserError(f"{path}: a SAELens finetuning scaling_factor is not supported")
    jumprelu = arch == "jumprelu"
    missing = {"W_enc", "b_enc", "W_dec", "b_dec", *(["threshold"] if jumprelu else [])} - set(w)
    if missing:
        weights = path / SAELENS_WEIGHTS
        raise UserError(f"{weights} lacks {sorted(missing)}: not a SAELens {arch} SAE")
    dtype = getattr(torch, str(cfg.get("dtype", "float32")).removeprefix("torch."))
    w = {k: v.to(torch.float64) for k, v in w.items()}  # fold in float64, then cast
    if not cfg.get("apply_b_dec_to_input", True):  # x @ W + b == (x - b_dec) @ W + (b + b_dec @ W)
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    if not jumprelu and cfg.get("rescale_acts_by_decoder_norm", False):
        # Top-k of pre_acts * |W_dec row| and decoding of acts / |row|: fold the norms into
        # the weights, as SAELens' _fold_norm_topk does when its trainer saves for inference.
        norm = w["W_dec"].norm(dim=1).clamp_min(1e-8)  # (d_sae,)
        w["W_enc"], w["b_enc"] = w["W_enc"] * norm, w["b_enc"] * norm
        w["W_dec"] = w["W_dec"] / norm[:, None]
    if jumprelu:
        # relu(pre) * (pre > t) == pre * (pre > max(t, 0)): a negative threshold acts as 0.
        t = w["threshold"].reshape(-1).clamp_min(0)  # (d_sae,)
        w["threshold"] = t[0] if t.numel() and bool((t == t[0]).all()) else t
    w["W_enc"] = w["W_enc"].T  # SAELens (d_in, d_sae) -> ours (num_latents, d_in)
    input_scale = _saelens_input_scale(path, cfg.get("normalize_activations", "none"))
    layer = layer_of(meta.get("hook_name"))
    extra = {"model": meta.get("model_name"), "hook_name": meta.get("hook_name")}
    if layer is not None:
        extra.update(hookpoint=f"layers.{layer}", layer=layer)
    extra = {k: v for k, v in extra.items() if v is not None}
    extra["source_format"] = "saelens"
    shape = _shape_fields(cfg, meta, jumprelu)
    if input_scale != 1.0:
        shape["normalize_activations"] = True
    sae_cfg = peer_config(path / SAE_CONFIG, meta.get("saetrain"), extra, **shape)
    return assemble(path, sae_cfg, {k: v.to(dtype) for k, v in w.items()}, input_scale, device)


def _shape_fields(cfg: dict, meta: dict, jumprelu: bool) -> dict[str, Any]:
    """Our config fields a SAELens cfg.json fixes: sizes, activation, k, Matryoshka prefixes
    (``metadata.training_architecture_details``, where SAELens' trainer records them)."""
    details = meta.get("training_architecture_details")
    details = details if isinstance(details, dict) else {}
    d_sae = cfg.get("d_sae")
    shape = {"d_in": cfg.get("d_in"), "num_latents": d_sae}
    shape["activation"] = "batchtopk" if jumprelu else "topk"
    if not jumprelu:
        shape["k"] = cfg.get("k", 100)
    else:  # k only matters for training on; SAELens' BatchTopK k is a float (100.0)
        k = details.get("k", 32)
        k = int(k) if isinstance(k, int | float) and float(k).is_integer() and k >= 1 else 32
        shape["k"] = min(k, d_sae) if isinstance(d_sae, int) else k
    widths = details.get("matryoshka_widths")
    whole = isinstance(widths, list) and all(type(v) is int and v >= 1 for v in widths)
    if whole and widths == sorted(set(widths)) and isinstance(d_sae, int):
        # SAELens' trainer appends d_sae when the last width is not it (_validate_matryoshka_config)
        shape["matryoshka_prefixes"] = widths if widths[-1] == d_sae else [*widths, d_sae]
    return shape


def _saelens_input_scale(path: Path, mode: str | bool | None) -> float:
    """SAELens' expected_average_only_in scale s, saved beside its training checkpoints."""
    if mode in (None, False):  # SAELens < 6 wrote a bool
        mode = "none"
    elif mode is True:
        mode = "expected_average_only_in"
    if mode == "none":
        return 1.0
    scaler = path / "activation_scaler.json"
    if mode == "expected_average_only_in" and scaler.is_file():
        saved = read_json(scaler, "the SAELens scale", "restore it, or load the final export")
        return float(saved.get("scaling_factor") or 1.0) if isinstance(saved, dict) else 1.0
    raise UserError(
        f"{path}: SAELens normalize_activations={mode!r} without a scale saetrain can fold in "
        "(activation_scaler.json): load its final inference export, where the scale is folded"
    )
