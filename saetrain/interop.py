"""Export SAEs to, and import them from, SAELens and EleutherAI's sparsify (issue #6).

    python -m saetrain export --ckpt checkpoints/sae --format saelens --out exported/saelens
    sae = saetrain.load_sae("exported/saelens")   # any format below, detected from the files

Formats (every export takes raw activations: the input scale is folded into the weights):

- ``saetrain``: ``cfg.json`` + ``sae.safetensors`` (:meth:`SAE.save`).
- ``saelens`` (SAELens >= 6, ``SAE.load_from_disk``): ``cfg.json`` with ``architecture: "topk"``,
  ``d_in``, ``d_sae``, ``k`` and ``metadata`` (model_name, hook_name ``blocks.L.hook_resid_post``,
  ``saetrain``: our config), + ``sae_weights.safetensors`` with W_enc (d_in, d_sae),
  b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,).
- ``sparsify`` (``SparseCoder.load_from_disk`` / ``load_many``): ``<out>/<hookpoint>/cfg.json``
  with its SparseCoderConfig fields + ``d_in``, and ``sae.safetensors`` with encoder.weight
  (num_latents, d_in), encoder.bias, W_dec (num_latents, d_in), b_dec (our config in its
  header); beside the hookpoint folder a ``config.json`` with the model, as its trainer writes.

Loading reads weights from safetensors only, or from Lightning ``.ckpt`` files with
``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from .errors import UserError
from .files import check_out_dir, read_json, staged_dir
from .sae import (
    SAE,
    SAE_CONFIG,
    SAE_WEIGHTS,
    SAEConfig,
    check_shapes,
    config_from,
    open_safetensors,
    read_sae_config,
)

Format = Literal["saetrain", "saelens", "sparsify"]
FORMATS: tuple[Format, ...] = ("saetrain", "saelens", "sparsify")
SAELENS_WEIGHTS = "sae_weights.safetensors"
# The oldest SAELens whose loader reads this cfg.json layout; older layouts are converted by it.
SAELENS_FORMAT_VERSION = "6.0.0"


def layer_of(hook: str | None) -> int | None:
    """Layer L of ``layers.L`` / ``model.layers.L`` / ``h.L`` or ``blocks.L.hook_resid_post``."""
    m = re.fullmatch(r"(?:.*\.)?(?:layers|h)[._](\d+)|blocks\.(\d+)\.hook_resid_post", hook or "")
    return int(m.group(1) or m.group(2)) if m else None


def _hookpoint(sae: SAE, override: str | None = None) -> str | None:
    layer = sae.cfg.extra.get("layer")
    by_layer = f"layers.{layer}" if isinstance(layer, int) else None
    return override or sae.cfg.extra.get("hookpoint") or by_layer


# --- writing -------------------------------------------------------------------------------------


def _write_saelens(sae: SAE, path: Path, hookpoint: str | None) -> None:
    w = sae.folded_state_dict()
    layer = layer_of(hookpoint)
    extra = sae.cfg.extra
    data = extra.get("data") if isinstance(extra.get("data"), dict) else {}
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": extra.get("model"),
        "hook_name": f"blocks.{layer}.hook_resid_post" if layer is not None else hookpoint,
        "hook_head_index": None,
        "context_size": extra.get("ctx_len"),
        "dataset_path": data.get("path"),
        "exclude_special_tokens": extra.get("exclude_special_tokens"),
        "saetrain": {**sae.cfg.to_dict(), "extra": {**extra, "hookpoint": hookpoint}},
    }
    cfg = {
        "architecture": "topk",
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.num_latents,
        "k": sae.cfg.k,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,  # our decoder rows are already unit-norm
        "metadata": {k: v for k, v in metadata.items() if v is not None or k.startswith("sae_")},
    }
    tensors = {"W_enc": w["W_enc"].T.contiguous(), "b_enc": w["b_enc"]}
    save_file({**tensors, "W_dec": w["W_dec"], "b_dec": w["b_dec"]}, str(path / SAELENS_WEIGHTS))
    (path / SAE_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


def _write_sparsify(sae: SAE, root: Path, hookpoint: str | None) -> None:
    if not hookpoint:
        raise UserError(
            "the SAE's cfg.extra names no hookpoint, which sparsify needs as the folder name: "
            "pass --hookpoint (e.g. --hookpoint layers.15)"
        )
    w = sae.folded_state_dict()
    n, d = sae.cfg.num_latents, sae.cfg.d_in
    cfg = {  # sparsify's SparseCoderConfig fields, then d_in as its save_to_disk writes it
        "activation": "topk",
        "expansion_factor": max(1, n // d),
        "normalize_decoder": True,
        "num_latents": n,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d,
    }
    # Our own config rides in the safetensors header: sparsify's loader complains about (and
    # drops) unknown cfg.json keys, and ignores the header.
    ours = {**sae.cfg.to_dict(), "extra": {**sae.cfg.extra, "hookpoint": hookpoint}}
    path = root / hookpoint
    path.mkdir(parents=True)
    tensors = {"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"]}
    tensors.update(W_dec=w["W_dec"], b_dec=w["b_dec"])
    save_file(tensors, str(path / SAE_WEIGHTS), metadata={"saetrain": json.dumps(ours)})
    (path / SAE_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    run = {"model": sae.cfg.extra.get("model"), "ctx_len": sae.cfg.extra.get("ctx_len")}
    run = {**{k: v for k, v in run.items() if v is not None}, "hookpoints": [hookpoint]}
    (root / "config.json").write_text(json.dumps(run, indent=2) + "\n")


def export_sae(
    sae: SAE,
    out: str | Path,
    format: Format,
    *,
    overwrite: bool = False,
    hookpoint: str | None = None,
) -> Path:
    """Write ``sae`` into the folder ``out`` in ``format``, atomically.

    Everything is written into a temporary sibling folder that is renamed to ``out`` at the
    end, so a failure leaves ``out`` as it was. A non-empty ``out`` is replaced only with
    ``overwrite`` (:func:`saetrain.files.staged_dir`). ``hookpoint`` overrides
    ``sae.cfg.extra["hookpoint"]``.
    """
    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    if format != "saetrain" and sae.cfg.activation != "topk":  # not silently a Top-k SAE
        raise UserError(
            f"a {sae.cfg.activation} SAE cannot be exported as {format} yet (its JumpReLU "
            "threshold has no place in that format's Top-k layout): export it as saetrain"
        )
    out = Path(out)
    with staged_dir(out, overwrite, option="--out", flag="--overwrite") as tmp:
        hookpoint = _hookpoint(sae, hookpoint)
        if format == "saetrain":
            sae.save(tmp, metadata={"hookpoint": hookpoint} if hookpoint else None)
        elif format == "saelens":
            _write_saelens(sae, tmp, hookpoint)
        else:
            _write_sparsify(sae, tmp, hookpoint)
    return out


# --- reading -------------------------------------------------------------------------------------


def _assemble(
    source: Path, cfg: SAEConfig, tensors: dict[str, Tensor], input_scale: float, device: Any
) -> SAE:
    """An SAE from (num_latents, d_in)-layout tensors, checked against ``cfg``."""
    check_shapes(source, cfg, {k: tuple(v.shape) for k, v in tensors.items()})
    return SAE.from_tensors(cfg, tensors, input_scale=input_scale, device=device)


def _config(source: Path, saved: dict | None, extra: dict, **shape: Any) -> SAEConfig:
    """Our config: the one we stored in the peer's file if any, with the peer's shape fields
    (errors name ``source``, the file they came from)."""
    saved = saved if isinstance(saved, dict) else {}
    base = {**saved, **shape}
    base["extra"] = {**(saved.get("extra") or {}), **extra}
    base.setdefault("normalize_activations", False)
    return config_from(source, base)


def _read_saelens(path: Path, device: Any) -> SAE:
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
    if arch != "topk":
        raise UserError(
            f"{path} is a SAELens {arch!r} SAE; saetrain loads only Top-k SAEs "
            "(architecture 'topk')"
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
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(w)
    if missing:
        raise UserError(f"{path / SAELENS_WEIGHTS} lacks {sorted(missing)}: not a Top-k SAE")
    dtype = getattr(torch, str(cfg.get("dtype", "float32")).removeprefix("torch."))
    w = {k: v.to(torch.float64) for k, v in w.items()}  # fold in float64, then cast
    if not cfg.get("apply_b_dec_to_input", True):  # x @ W + b == (x - b_dec) @ W + (b + b_dec @ W)
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    if cfg.get("rescale_acts_by_decoder_norm", False):
        # Top-k of pre_acts * |W_dec row| and decoding of acts / |row|: fold the norms into
        # the weights, as SAELens' _fold_norm_topk does when its trainer saves for inference.
        norm = w["W_dec"].norm(dim=1).clamp_min(1e-8)  # (d_sae,)
        w["W_enc"], w["b_enc"] = w["W_enc"] * norm, w["b_enc"] * norm
        w["W_dec"] = w["W_dec"] / norm[:, None]
    w["W_enc"] = w["W_enc"].T  # SAELens (d_in, d_sae) -> ours (num_latents, d_in)
    input_scale = _saelens_input_scale(path, cfg.get("normalize_activations", "none"))
    layer = layer_of(meta.get("hook_name"))
    extra = {"model": meta.get("model_name"), "hook_name": meta.get("hook_name")}
    if layer is not None:
        extra.update(hookpoint=f"layers.{layer}", layer=layer)
    extra = {k: v for k, v in extra.items() if v is not None}
    shape = {"d_in": cfg.get("d_in"), "num_latents": cfg.get("d_sae"), "k": cfg.get("k", 100)}
    if input_scale != 1.0:
        shape["normalize_activations"] = True
    extra["source_format"] = "saelens"
    sae_cfg = _config(path / SAE_CONFIG, meta.get("saetrain"), extra, **shape)
    return _assemble(path, sae_cfg, {k: v.to(dtype) for k, v in w.items()}, input_scale, device)


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


def _read_sparsify(path: Path, device: Any) -> SAE:
    cfg = read_sae_config(path / SAE_CONFIG)
    for field, ok in (("activation", "topk"), ("transcode", False), ("skip_connection", False)):
        if cfg.get(field, ok) != ok:
            raise UserError(
                f"{path}: sparsify {field}={cfg[field]!r} is not supported; saetrain loads "
                "Top-k sparse autoencoders without skip connections"
            )
    with open_safetensors(path / SAE_WEIGHTS) as f:
        w = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        saved = _header_json(path / SAE_WEIGHTS, f, "saetrain")
    tensors = {"W_enc": w.get("encoder.weight"), "b_enc": w.get("encoder.bias")}
    tensors.update(W_dec=w.get("W_dec"), b_dec=w.get("b_dec"))
    d_in, factor = cfg.get("d_in"), cfg.get("expansion_factor", 32)
    n = cfg.get("num_latents") or (d_in * factor if isinstance(d_in, int) else None)
    run_cfg = path.parent / "config.json"  # written beside the hookpoint folders by its trainer
    run = read_json(run_cfg, "the sparsify run config", "restore it") if run_cfg.is_file() else {}
    run = run if isinstance(run, dict) else {}
    layer = layer_of(path.name)
    extra = {"model": run.get("model"), "hookpoint": path.name, "source_format": "sparsify"}
    if layer is not None:
        extra["layer"] = layer
    sae_cfg = _config(path / SAE_CONFIG, saved, extra, d_in=d_in, num_latents=n, k=cfg.get("k", 32))
    present = {k: v for k, v in tensors.items() if v is not None}
    return _assemble(path, sae_cfg, present, 1.0, device)


def _read_lightning(path: Path, device: Any) -> SAE:
    """The SAE in a checkpoint written by ``python -m saetrain fit`` (input scale unfolded)."""
    ckpt = safe_torch_load(path)
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    # SAEModule keeps SAE number i as saes.<hookpoint index>_<variant index>.sae.*
    prefixes = sorted(k.removesuffix("W_enc") for k in state if k.endswith(".sae.W_enc"))
    if not prefixes:
        raise UserError(
            f"{path} is not a saetrain Lightning checkpoint (no saes.*.sae.W_enc in its state_dict)"
        )
    if len(prefixes) > 1:
        raise UserError(
            f"{path} holds {len(prefixes)} SAEs: export one from the subfolders of its run "
            "folder (written at the end of training), not from the checkpoint"
        )
    prefix = prefixes[0]
    tensors = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    hp = {**ckpt.get("hyper_parameters", {}), "extra": {}}
    hp.update((hp.get("sae_variants") or [{}])[0])  # a single variant may override k etc.
    hp["num_latents"], hp["d_in"] = tensors["W_enc"].shape
    dm = ckpt.get("datamodule_hyper_parameters", {})
    layer = dm.get("layer")
    extra = {"model": dm.get("model"), "ctx_len": dm.get("ctx_len")}
    extra["steps"] = ckpt.get("global_step")
    if isinstance(layer, int):
        extra.update(hookpoint=f"layers.{layer}", layer=layer)
    if "tokens_seen" in state:
        extra["tokens_seen"] = int(state["tokens_seen"])
    hp["extra"] = {k: v for k, v in extra.items() if v is not None}
    scale = float(tensors.get("input_scale", torch.ones(())))
    return _assemble(path, SAEConfig.from_dict(hp), tensors, scale, device)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` that unpickles only tensors and plain containers, never code; a one-line
    error naming the file when it is not a whole PyTorch checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL [\w.]+", str(e))
        if not found:
            raise UserError(f"{path} is not a readable PyTorch checkpoint ({_why(e)})") from None
        raise UserError(
            f"{path} holds pickled Python objects, not only weights ({found.group(0)}); "
            "refusing to unpickle it because that can run arbitrary code: export it as "
            "safetensors from a setup you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, SafetensorError) as e:  # a cut or corrupt zip, ...
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint ({_why(e)}): it is truncated or "
            "corrupt; use another checkpoint of the run"
        ) from None


def _why(e: BaseException) -> str:
    """The gist of a loader's error, on one line (torch's weights-only notes left out)."""
    text = str(e)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    text = found.group(1) if found else text.split(". This is an internal")[0]
    return " ".join(text.split())[:160] or type(e).__name__


def _header_json(path: Path, f: Any, key: str) -> Any:
    """The JSON stored under ``key`` in a safetensors file's metadata, or None."""
    text = (f.metadata() or {}).get(key)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: its {key} metadata is not valid JSON ({e})") from None


def detect_format(path: Path) -> Format:
    """Which format the SAE folder ``path`` is in (see the module docstring)."""
    if (path / SAELENS_WEIGHTS).is_file() and (path / SAE_CONFIG).is_file():
        return "saelens"
    if (path / SAE_CONFIG).is_file() and (path / SAE_WEIGHTS).is_file():
        if read_sae_config(path / SAE_CONFIG).get("format") == "saetrain":
            return "saetrain"
        with open_safetensors(path / SAE_WEIGHTS) as f:
            names = set(f.keys())
        if "encoder.weight" in names:
            return "sparsify"
        if "W_enc" in names:
            return "saetrain"
        raise UserError(f"{path / SAE_WEIGHTS} holds {sorted(names)}: not a known SAE layout")
    raise UserError(
        f"{path} holds no SAE: expected cfg.json and sae.safetensors (saetrain, sparsify), "
        f"cfg.json and {SAELENS_WEIGHTS} (SAELens), one sub-folder per hookpoint, or a .ckpt"
    )


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _hub_download(name: str) -> Path:
    """``owner/repo`` or ``owner/repo/sub/folder`` from the Hugging Face Hub, as a local folder."""
    import huggingface_hub

    parts = name.split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        root = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=[f"{sub}/*"] if sub else None
        )
    except Exception as e:  # offline, unknown repo, HTTP errors: all one line for the user
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(
            f"{name!r} is not a local path, and downloading it from the Hugging Face Hub failed "
            f"({why}); check the name and the network, or pass a local folder"
        ) from None
    return Path(root) / sub if sub else Path(root)


def load(path: str | Path, *, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE in any supported form; :func:`saetrain.load_sae` calls this.

    ``path`` is a folder in one of the three formats, a sparsify-style parent folder with one
    hookpoint sub-folder, a Lightning ``.ckpt`` from ``fit``, or a Hub id
    ``owner/repo[/sub/folder]``.
    """
    p = Path(path)
    if not p.exists():
        if not re.fullmatch(r"\w[\w.-]*/[\w.-]+(/[\w./-]+)?", str(path)):
            raise UserError(f"{p} does not exist: pass an SAE folder or checkpoint file")
        p = _hub_download(str(path))
    if p.is_file():
        if p.suffix in (".ckpt", ".pt", ".pth"):
            return _read_lightning(p, device)
        p = p.parent  # e.g. the path of sae.safetensors itself
    if not (p / SAE_CONFIG).is_file():
        subs = [d for d in p.iterdir() if d.is_dir() and (d / SAE_CONFIG).is_file()]
        if len(subs) == 1:
            p = subs[0]
        elif subs:
            names = sorted((d.name for d in subs), key=_natural)
            raise UserError(
                f"{p} holds {len(subs)} SAEs ({', '.join(names)}): pass one of them, "
                f"e.g. {p / names[0]}"
            )
    fmt = detect_format(p)
    if fmt == "saetrain":
        return SAE.load(p, device=device)
    return _read_saelens(p, device) if fmt == "saelens" else _read_sparsify(p, device)


# --- command line --------------------------------------------------------------------------------


def export_main(argv: list[str]) -> None:
    """``python -m saetrain export --ckpt PATH --format FORMAT --out DIR [--overwrite]``."""
    what = "Write an SAE (run folder, .ckpt, or any supported format) as saetrain/SAELens/sparsify."
    parser = argparse.ArgumentParser(prog="python -m saetrain export", description=what)
    parser.add_argument("--ckpt", required=True, help="SAE folder, .ckpt file or Hub id to read.")
    parser.add_argument("--format", required=True, choices=FORMATS, help="Format to write.")
    parser.add_argument("--out", required=True, help="Folder to write (created).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out.")
    parser.add_argument("--hookpoint", help="e.g. layers.15, when the SAE does not record one.")
    args = parser.parse_args(argv)
    # Before reading the SAE; and --out must not hold it (replacing --out would delete it).
    check_out_dir(args.out, args.overwrite, inputs=[args.ckpt], option="--out", flag="--overwrite")
    sae = load(args.ckpt)
    out = export_sae(sae, args.out, args.format, overwrite=args.overwrite, hookpoint=args.hookpoint)
    print(f"saetrain: exported the SAE as {args.format} to {out}", file=sys.stderr)
