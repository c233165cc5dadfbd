"""Export SAEs to, and import them from, SAELens and EleutherAI's sparsify (issue #6).

    python -m saetrain export --ckpt checkpoints/sae --format saelens --out exported/saelens
    sae = saetrain.load_sae("exported/saelens")   # any format below, detected from the files

Formats (every export takes raw activations: the input scale is folded into the weights):

- ``saetrain``: ``cfg.json`` + ``sae.safetensors`` (:meth:`SAE.save`).
- ``saelens`` (SAELens >= 6, ``SAE.load_from_disk``): ``cfg.json`` with ``architecture: "topk"``
  (a BatchTopK SAE: ``"jumprelu"``), ``d_in``, ``d_sae``, ``k`` and ``metadata`` (model_name,
  hook_name ``blocks.L.hook_resid_post``, Matryoshka widths, ``saetrain``: our config), +
  ``sae_weights.safetensors`` with W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in),
  b_dec (d_in,) and a JumpReLU's threshold (d_sae,); see :mod:`saetrain.interop_saelens`.
- ``sparsify`` (``SparseCoder.load_from_disk`` / ``load_many``): ``<out>/<hookpoint>/cfg.json``
  with its SparseCoderConfig fields + ``d_in``, and ``sae.safetensors`` with encoder.weight
  (num_latents, d_in), encoder.bias, W_dec (num_latents, d_in), b_dec (our config in its
  header); beside the hookpoint folder a ``config.json`` with the model, as its trainer writes.
  Top-k SAEs only: sparsify has no JumpReLU for a BatchTopK SAE's threshold.

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

from .errors import UserError
from .files import check_out_dir, read_json, staged_dir
from .interop_saelens import SAELENS_WEIGHTS, layer_of
from .interop_saelens import assemble as _assemble
from .interop_saelens import peer_config as _config
from .interop_saelens import read_saelens as _read_saelens
from .interop_saelens import write_saelens as _write_saelens
from .sae import SAE, SAE_CONFIG, SAE_WEIGHTS, SAEConfig, open_safetensors, read_sae_config

Format = Literal["saetrain", "saelens", "sparsify"]
FORMATS: tuple[Format, ...] = ("saetrain", "saelens", "sparsify")


def _hookpoint(sae: SAE, override: str | None = None) -> str | None:
    layer = sae.cfg.extra.get("layer")
    by_layer = f"layers.{layer}" if isinstance(layer, int) else None
    return override or sae.cfg.extra.get("hookpoint") or by_layer


# --- writing -------------------------------------------------------------------------------------


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
    if sae.cfg.activation == "batchtopk" and format == "sparsify":  # not silently a Top-k SAE
        raise UserError(
            "sparsify has no JumpReLU to hold a batchtopk SAE's threshold: export it as "
            "saelens (a JumpReLU SAE) or saetrain"
        )
    if sae.cfg.activation == "batchtopk" and format == "saelens" and not sae_threshold_set(sae):
        raise UserError(
            "this batchtopk SAE's JumpReLU threshold is not estimated yet (the estimate starts "
            f"after threshold_start={sae.cfg.threshold_start} training batches): train it "
            "longer, or export it as saetrain"
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


def sae_threshold_set(sae: SAE) -> bool:
    """Whether a batchtopk SAE's JumpReLU threshold was estimated (one host read)."""
    return bool((sae.threshold >= 0).all())


# --- reading -------------------------------------------------------------------------------------


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
