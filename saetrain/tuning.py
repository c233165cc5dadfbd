"""Kernel choices timed on this machine's GPU: ``python -m saetrain tune-kernels``.

Six choices in :mod:`saetrain.kernels` (and the optimizer) are ways to run the same step,
and which is faster depends on the GPU (bandwidth, atomics, registers), Triton's version and
the SAE's shape (`SWITCHES`):

- ``fused-encoder``: the fused matmul + top-k encoder kernel, or cuBLAS's matmul then a
  selection (``kernels/encode.py`` FUSE_ON_CUDA);
- ``radix``: the radix-select top-k kernel for those selections (``kernels/topk.py``
  RADIX_DEVICES);
- ``grouped-topk``: torch.topk on the maxima of column groups first (GROUPED_DEVICES);
- ``latent-major``: weight-gradient rows summed latent-major, without atomics
  (``kernels/sparse_ops.py`` LATENT_MAJOR);
- ``fused-optimizer``: the decoder's projection, Adam update and renormalisation in one pass
  (``saetrain/optim.py`` FUSE_WHERE_TRITON);
- ``fused-losses``: the reconstruction, FVU and AuxK loss in one pass forward and one
  backward (``kernels/loss.py`` FUSE_LOSSES).

:func:`tune` times whole training steps (``SAE.forward`` with AuxK, backward,
:class:`~saetrain.optim.DecoderNormAdam`) at the caller's shape: starting from the choices in
effect, it flips one switch at a time, times the two steps side by side, and keeps the flip
only where it is faster by more than a margin and gives the same loss, gradients and update
as the starting step (a variant that differs is rejected and reported). The result is stored
per GPU model in a JSON file, and ``fit`` applies the stored choices for its GPU when training
starts (:func:`use_stored`). Lookup order: the user's file (``$SAETRAIN_TUNING_FILE``, else
``$XDG_CACHE_HOME/saetrain/kernel-tuning.json``, else ``~/.cache/...``), then the file shipped
in the package (``kernels/tuned.json``, written by the project's own GPU runs). A set
``SAETRAIN_KERNEL_OPTIONS`` decides instead of either.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import kernels, optim
from .kernels import _backend, sparse_ops
from .kernels import encode as encode_module
from .kernels import loss as loss_module
from .kernels import topk as topk_module
from .optim import DecoderNormAdam
from .sae import SAE, SAEConfig

# The switches that choose how the encoder selects its latents: the rest only change how
# the same numbers are computed.
SELECTION = ("fused-encoder", "radix", "grouped-topk")
SWITCHES = (
    "fused-encoder", "radix", "grouped-topk", "latent-major", "fused-optimizer", "fused-losses",
)  # fmt: skip
FILE_VAR = "SAETRAIN_TUNING_FILE"
SHIPPED_FILE = Path(kernels.__file__).parent / "tuned.json"
FORMAT_VERSION = 1

Choices = dict[str, bool]


# ---------------------------------------------------------------- the switches


def current(device_type: str) -> Choices:
    """The choices in effect for tensors on `device_type` ("cuda"; "cpu" under Triton's
    interpreter, where the fused encoder follows ``encode.FUSE_UNDER_INTERPRETER``)."""
    fused = encode_module.FUSE_ON_CUDA if device_type == "cuda" else None
    return {
        "fused-encoder": encode_module.FUSE_UNDER_INTERPRETER if fused is None else fused,
        "radix": device_type in topk_module.RADIX_DEVICES,
        "grouped-topk": device_type in topk_module.GROUPED_DEVICES,
        "latent-major": sparse_ops.LATENT_MAJOR,
        "fused-optimizer": optim.FUSE_WHERE_TRITON,
        "fused-losses": loss_module.FUSE_LOSSES,
    }


def _checked(choices: Mapping[str, bool], source: str) -> Choices:
    unknown = sorted(set(choices) - set(SWITCHES))
    if unknown:
        raise ValueError(
            f"{source} names {', '.join(map(repr, unknown))}; the switches are "
            f"{', '.join(SWITCHES)}."
        )
    if not all(isinstance(v, bool) for v in choices.values()):
        raise ValueError(f"{source}: each switch must be true or false, got {dict(choices)}.")
    return dict(choices)


def apply(choices: Mapping[str, bool], device_type: str) -> None:
    """Set the switches named in `choices` for tensors on `device_type` (others unchanged)."""
    choices = _checked(choices, "kernel choices")

    def member(devices: frozenset[str], on: bool) -> frozenset[str]:
        return devices | {device_type} if on else devices - {device_type}

    if "fused-encoder" in choices:
        name = "FUSE_ON_CUDA" if device_type == "cuda" else "FUSE_UNDER_INTERPRETER"
        setattr(encode_module, name, choices["fused-encoder"])
    if "radix" in choices:
        topk_module.RADIX_DEVICES = member(topk_module.RADIX_DEVICES, choices["radix"])
    if "grouped-topk" in choices:
        on = choices["grouped-topk"]
        topk_module.GROUPED_DEVICES = member(topk_module.GROUPED_DEVICES, on)
    if "latent-major" in choices:
        sparse_ops.LATENT_MAJOR = choices["latent-major"]
    if "fused-optimizer" in choices:
        optim.FUSE_WHERE_TRITON = choices["fused-optimizer"]
    if "fused-losses" in choices:
        loss_module.FUSE_LOSSES = choices["fused-losses"]


@contextlib.contextmanager
def chosen(choices: Mapping[str, bool], device_type: str) -> Iterator[None]:
    """`choices` in effect inside the block, the previous ones restored after it."""
    before = current(device_type)
    apply(choices, device_type)
    try:
        yield
    finally:
        apply(before, device_type)


def describe(choices: Mapping[str, bool]) -> str:
    """``radix on, latent-major off, ...`` in `SWITCHES` order."""
    return ", ".join(f"{s} {'on' if choices[s] else 'off'}" for s in SWITCHES if s in choices)


# ---------------------------------------------------------------- the files


def user_file() -> Path:
    """Where `tune` stores results and `use_stored` looks first."""
    if os.environ.get(FILE_VAR):
        return Path(os.environ[FILE_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "saetrain" / "kernel-tuning.json"


def device_key(device: torch.device) -> str:
    """The name results are stored under: the GPU model and its compute capability."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} (Triton interpreter)"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def read_file(path: Path) -> dict:
    """A tuning file's contents, ``{"version": 1, "devices": {key: entry}}``; a missing file
    reads as empty, an unreadable one is a one-line ValueError saying what to do."""
    path = Path(path)
    if not path.exists():
        return {"version": FORMAT_VERSION, "devices": {}}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
            raise ValueError("no 'devices' table")
        for key, entry in data["devices"].items():
            _checked(entry["choices"], f"the entry for {key!r}")
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"{path} is not a saetrain kernel-tuning file ({' '.join(str(e).split())}); "
            f"delete it or point {FILE_VAR} elsewhere, then rerun `python -m saetrain "
            "tune-kernels`"
        ) from None
    return data


def write_entry(path: Path, key: str, entry: dict) -> None:
    """Store `entry` under `key` in the file at `path`, keeping the other devices' entries;
    written to a temporary file and renamed, so a kill leaves the old file whole."""
    path = Path(path)
    data = read_file(path)  # an unreadable file is refused before anything is written
    data["version"] = FORMAT_VERSION
    data["devices"][key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def stored(key: str) -> tuple[dict, Path] | None:
    """The stored entry for `key` and the file it came from: the user's, then the shipped."""
    for path in (user_file(), SHIPPED_FILE):
        entry = read_file(path)["devices"].get(key)
        if entry is not None:
            return entry, path
    return None


def use_stored(device: torch.device, log: Callable[[str], None] = print) -> Choices | None:
    """Apply the choices stored for `device`'s GPU model, if any; returns them (None: none
    stored, not a device the Triton kernels run on, or SAETRAIN_KERNEL_OPTIONS decides)."""
    device = torch.device(device)
    if device.type != "cuda" or not _backend.use_triton(device):
        return None
    key = device_key(device)
    found = stored(key)
    if found is None:
        log(f"saetrain kernels on {key}: built-in choices ({describe(current('cuda'))}); "
            "`python -m saetrain tune-kernels` times the alternatives on this GPU")  # fmt: skip
        return None
    entry, path = found
    if _backend.KERNEL_OPTIONS or os.environ.get(_backend.OPTIONS_VAR, "").strip():
        log(f"saetrain kernels on {key}: {_backend.OPTIONS_VAR} is set, so it decides and the "
            f"choices tuned in {path} are not applied")  # fmt: skip
        return None
    apply(entry["choices"], "cuda")
    shape = entry.get("shape", {})
    log(
        f"saetrain kernels on {key}: {describe(entry['choices'])} (tuned {entry.get('date', '?')}"
        f" at d_in {shape.get('d_in')}, {shape.get('num_latents')} latents, k {shape.get('k')}, "
        f"batch {shape.get('batch')}, {entry.get('precision')}; {path})"
    )
    return dict(entry["choices"])


# ---------------------------------------------------------------- timing


@dataclass
class TuneConfig:
    """The step `tune` times.

    Attributes:
        d_in, num_latents, k, k_aux: The SAE's shape (k_aux None: d_in // 2, as SAEConfig).
        batch: Tokens per step.
        precision: "bf16" (autocast, fp32 weights, as ``--trainer.precision bf16-mixed``) or
            "fp32".
        dead_fraction: Latents marked dead, so the step runs AuxK as training does.
        rounds: Timed steps of each variant per comparison (the fastest counts).
        margin: A flip is kept only where its step is at least this fraction faster.
        lr: Adam's learning rate during the timing and the checks.
        seed: For the SAE, the batch and the dead latents.
    """

    d_in: int = 3072
    num_latents: int = 24576
    k: int = 32
    k_aux: int | None = None
    batch: int = 4096
    precision: str = "bf16"
    dead_fraction: float = 0.01
    rounds: int = 10
    margin: float = 0.03
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        for name in ("batch", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dead_fraction <= 1:
            raise ValueError(f"dead_fraction must be in [0, 1], got {self.dead_fraction}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")


# (configs by name, one step under given choices, rounds) -> seconds per step, by name.
Clock = Callable[[dict[str, Choices], Callable[[Choices], None], int], dict[str, float]]


def best_times(configs: dict[str, Choices], run: Callable[[Choices], None], rounds: int):
    """Seconds per step of each config: one warm-up each (compiles, autotunes), then the
    fastest of `rounds` runs, interleaved so that drift on the machine hits all alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for choices in configs.values():
        run(choices)
    best = dict.fromkeys(configs, math.inf)
    for _ in range(rounds):
        for name, choices in configs.items():
            sync()
            start = time.perf_counter()
            run(choices)
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


class _Bench:
    """One SAE, its optimizer and a batch, stepped under any choices."""

    def __init__(self, cfg: TuneConfig, device: torch.device):
        torch.manual_seed(cfg.seed)
        self.device = device
        sae_cfg = SAEConfig(cfg.d_in, cfg.num_latents, cfg.k, k_aux=cfg.k_aux)
        self.sae = SAE(sae_cfg, device=device)
        self.x = torch.randn(cfg.batch, cfg.d_in, device=device)
        self.sae.init_from_data(self.x)
        self.dead = torch.rand(cfg.num_latents, device=device) < cfg.dead_fraction
        fused = device.type in ("cpu", "cuda")  # as SAEModule.configure_optimizers
        self.opt = DecoderNormAdam(
            self.sae.parameters(), decoders=[self.sae.W_dec], lr=cfg.lr, fused=fused or None
        )
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32

    def autocast(self):
        on = self.dtype != torch.float32
        return torch.autocast(self.device.type, self.dtype, enabled=on)

    def loss(self, choices: Choices) -> torch.Tensor:
        with chosen(choices, self.device.type), self.autocast():
            out = self.sae(self.x, dead_mask=self.dead)
            return out.fvu + self.sae.cfg.auxk_coef * out.auxk_loss

    def backward(self, loss: torch.Tensor, choices: Choices) -> None:
        with chosen(choices, self.device.type):
            loss.backward()

    def optimizer_step(self, choices: Choices) -> None:
        with chosen(choices, self.device.type):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, choices: Choices) -> None:
        self.backward(self.loss(choices), choices)
        self.optimizer_step(choices)

    @torch.no_grad()
    def select(self, choices: Choices) -> kernels.EncodeOutput:
        with chosen(choices, self.device.type), self.autocast():
            return self.sae._topk(self.sae._scaled(self.x), self.dead)

    def snapshot(self) -> tuple[dict, dict]:
        return copy.deepcopy(self.sae.state_dict()), copy.deepcopy(self.opt.state_dict())

    def restore(self, snap: tuple[dict, dict]) -> None:
        self.sae.load_state_dict(snap[0])
        self.opt.load_state_dict(copy.deepcopy(snap[1]))
        self.opt.zero_grad(set_to_none=True)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.double().norm().clamp_min(1e-30)
    return float((a.double() - b.double()).norm() / scale)


def _selection_error(bench: _Bench, out, reference, tol: float) -> str | None:
    """Why `out` (an encoder's selections) is not a top-k of the batch that `reference` is
    too, or None. Tie-aware: at the k-th value (frequent in bf16) either latent is right, so
    the values are compared sorted, and each value must be its own latent's pre-activation
    (and each AuxK latent dead)."""
    sae = bench.sae
    xs = (sae._scaled(bench.x) - sae.b_dec).float()  # (B, d_in)
    pre_acts = torch.addmm(sae.b_enc.float(), xs, sae.W_enc.float().T)  # (B, num_latents)
    for name in ("latent", "aux"):
        acts, idx = getattr(out, f"{name}_acts").float(), getattr(out, f"{name}_indices")
        ref = getattr(reference, f"{name}_acts").float()
        if acts.shape != ref.shape:
            return f"its {name} selection has shape {tuple(acts.shape)}, not {tuple(ref.shape)}"
        if not acts.numel():
            continue
        scale = tol * float(ref.abs().max().clamp_min(1e-30))
        if not torch.allclose(acts.sort(1).values, ref.sort(1).values, rtol=tol, atol=scale):
            return f"its {name} selection picks other values than the starting choices'"
        if not torch.allclose(acts, pre_acts.gather(1, idx).relu(), rtol=tol, atol=scale):
            return f"its {name} values are not the pre-activations of the latents it names"
        if name == "aux" and not bool(bench.dead[idx].all()):
            return "its AuxK selection names latents that are not dead"
    return None


# Relative error (in norm) allowed between the losses and gradients of two ways of taking
# the same step: fp32 sums in another order; in bf16 also an intermediate gradient (of the
# decodes' outputs) that rounds to bf16 the other way, up to 2^-9 an entry (Triton's CPU
# interpreter truncates where GPUs round to nearest, which costs about 0.4% in norm).
GRAD_TOL = {"fp32": 1e-3, "bf16": 1e-2}


def check_variant(
    bench: _Bench, choices: Choices, reference: Choices, tol: float, grad_tol: float = 1e-3
) -> str | None:
    """Why a step under `choices` is not the step under `reference` from the same state, or
    None where it is: the encoder's selections (tie-aware, `_selection_error`, within `tol`);
    the loss and gradients with the reference's selections and otherwise each one's choices
    (within `grad_tol`, relative in norm); and the optimizer's update from the same
    gradients (within 1e-3: fp32 rounding apart)."""
    snap = bench.snapshot()
    params = dict(bench.sae.named_parameters())
    try:
        why = _selection_error(bench, bench.select(choices), bench.select(reference), tol)
        if why is not None:
            return why
        grads, losses = [], []
        same_selection = {**choices, **{s: reference[s] for s in SELECTION}}
        for c in (reference, same_selection):  # ties at the k-th value cannot differ
            bench.restore(snap)
            losses.append(bench.loss(c))
            bench.backward(losses[-1], c)
            grads.append({n: p.grad.detach().clone() for n, p in params.items()})
        error = _relative_error(losses[1].detach(), losses[0].detach())
        if not math.isfinite(error) or error > grad_tol:
            return f"its loss differs by {error:.2g} (relative)"
        for name in params:
            error = _relative_error(grads[1][name], grads[0][name])
            if not math.isfinite(error) or error > grad_tol:
                return f"its gradient of {name} differs by {error:.2g} (relative, in norm)"
        updated = []
        for c in (reference, choices):  # the same gradients through each optimizer path
            bench.restore(snap)
            for name, p in params.items():
                p.grad = grads[0][name].clone()
            bench.optimizer_step(c)
            updated.append({n: p.detach().clone() for n, p in params.items()})
        for name in params:
            before = snap[0][name]
            error = _relative_error(updated[1][name] - before, updated[0][name] - before)
            if not math.isfinite(error) or error > 1e-3:
                return f"its optimizer update of {name} differs by {error:.2g} (relative)"
        return None
    finally:
        bench.restore(snap)


def _applies(switch: str, choices: Choices, cfg: TuneConfig) -> bool:
    """Whether flipping `switch` can change the step at all from `choices`."""
    fused = choices["fused-encoder"] and cfg.k <= encode_module.MAX_FUSED_K
    if switch in ("radix", "grouped-topk") and fused:
        return False  # the fused encoder selects inside its kernel
    if switch == "grouped-topk" and choices["radix"]:
        return False  # the radix select serves every selection it can
    if switch == "fused-encoder":
        return cfg.k <= encode_module.MAX_FUSED_K
    return True


def check_device(device: torch.device) -> None:
    """A one-line ValueError unless the Triton kernels run on `device`."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("tune-kernels got --device cuda but torch sees no CUDA GPU here")
        if not _backend.HAS_TRITON or _backend.get_backend() == "torch":
            raise ValueError(
                "tune-kernels times the Triton kernels, which do not run here: install triton "
                f"and leave {_backend.ENV_VAR} unset (or 'auto')"
            )
        return
    if not (_backend.HAS_TRITON and _backend.triton_interpreted()):
        raise ValueError(
            f"tune-kernels times the Triton kernels on a CUDA GPU, and there is none here "
            f"({device.type}); on CPU they run only under Triton's interpreter "
            "(TRITON_INTERPRET=1 and SAETRAIN_KERNELS=triton), which is for tests, not timings"
        )
    if _backend.get_backend() != "triton":
        raise ValueError(
            f"tune-kernels on {device.type} needs {_backend.ENV_VAR}=triton (Triton's interpreter)"
        )


def tune(
    cfg: TuneConfig,
    device: str | torch.device = "cuda",
    clock: Clock = best_times,
    log: Callable[[str], None] = print,
) -> dict:
    """Time the switches at `cfg`'s shape on `device` and return the entry to store (see the
    module docstring). The choices in effect before the call are in effect after it."""
    device = torch.device(device)
    check_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    # The clock's synchronize waits on the current device: make it this one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _tune(cfg, device, clock, log)


def _tune(cfg: TuneConfig, device: torch.device, clock: Clock, log: Callable[[str], None]):
    start = current(device.type)
    bench = _Bench(cfg, device)
    tol = 2e-2 if cfg.precision == "bf16" else 1e-3
    key = device_key(device)
    k_aux = min(bench.sae.cfg.k_aux, int(bench.dead.sum()))
    log(
        f"tuning on {key}: d_in {cfg.d_in}, {cfg.num_latents} latents, k {cfg.k}, k_aux "
        f"{k_aux} ({int(bench.dead.sum())} dead), batch {cfg.batch}, {cfg.precision}; "
        f"starting from {describe(start)}"
    )
    choices, comparisons, rejected = dict(start), [], {}
    for switch in SWITCHES:
        if not _applies(switch, choices, cfg):
            continue
        flipped = {**choices, switch: not choices[switch]}
        why = check_variant(bench, flipped, choices, tol, GRAD_TOL[cfg.precision])
        if why is not None:
            rejected[switch] = why
            log(f"  {switch} {'on' if flipped[switch] else 'off'}: REJECTED, {why} on this GPU")
            continue
        times = clock({"as is": choices, "flipped": flipped}, bench.step, cfg.rounds)
        keep = times["flipped"] < times["as is"] * (1 - cfg.margin)
        comparisons.append(
            {
                "switch": switch,
                "on_ms": 1e3 * times["flipped" if flipped[switch] else "as is"],
                "off_ms": 1e3 * times["as is" if flipped[switch] else "flipped"],
                "kept": "on" if (flipped if keep else choices)[switch] else "off",
            }
        )
        log(
            f"  {switch}: on {comparisons[-1]['on_ms']:.3f} ms, off "
            f"{comparisons[-1]['off_ms']:.3f} ms a step -> {comparisons[-1]['kept']}"
        )
        if keep:
            choices = flipped
    times = clock({"start": start, "tuned": choices}, bench.step, cfg.rounds)
    speedup = times["start"] / times["tuned"]
    log(
        f"tuned: {describe(choices)}\n  a step: {1e3 * times['tuned']:.3f} ms "
        f"({cfg.batch / times['tuned']:,.0f} tokens/s), {speedup:.2f}x the speed of the "
        f"starting choices ({1e3 * times['start']:.3f} ms)"
    )
    return {
        "choices": choices,
        "start": start,
        "step_ms": {"start": 1e3 * times["start"], "tuned": 1e3 * times["tuned"]},
        "speedup": speedup,
        "comparisons": comparisons,
        "rejected": rejected,
        "shape": {
            "d_in": cfg.d_in,
            "num_latents": cfg.num_latents,
            "k": cfg.k,
            "k_aux": k_aux,
            "batch": cfg.batch,
            "dead_fraction": cfg.dead_fraction,
        },  # fmt: skip
        "precision": cfg.precision,
        "device": key,
        "versions": {"torch": torch.__version__, "triton": _triton_version()},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


# ---------------------------------------------------------------- the command


def _defaults(cls) -> dict:
    """The keyword defaults of `cls.__init__` (a recipe leaves unset what these give)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def recipe_shape(path: Path, d_in: int | None = None) -> dict:
    """`TuneConfig` fields from a ``fit`` recipe: the SAE's shape (model.*), the tokens per step
    (data.batch_size) and the precision (trainer.precision), with `fit`'s defaults where the
    recipe sets none; d_in given, else model.d_in, else from the LM's config (data.model)."""
    import yaml

    from .data.datamodule import ActivationDataModule
    from .data.lm import hidden_size, load_lm_config
    from .module import SAEModule

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        first = " ".join(str(e).split())[:200]
        raise ValueError(f"cannot read the recipe {path}: {first}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a fit recipe (a YAML mapping with model, data, trainer)")
    model = {**_defaults(SAEModule), **(raw.get("model") or {})}
    data = {**_defaults(ActivationDataModule), **(raw.get("data") or {})}
    d_in = d_in or model.get("d_in")
    if d_in is None:
        if not data.get("model"):
            raise ValueError(f"{path} sets neither model.d_in nor data.model: pass --d-in")
        d_in = hidden_size(load_lm_config(str(data["model"])))
    precision = str((raw.get("trainer") or {}).get("precision", "32-true"))
    if precision.startswith("bf16"):
        dtype = "bf16"
    elif precision in ("32", "32-true"):
        dtype = "fp32"
    else:
        raise ValueError(
            f"{path}: trainer.precision {precision!r}; tune-kernels times bf16 or fp32 steps "
            "(bf16-mixed, 32-true)"
        )
    return {
        "d_in": d_in,
        "num_latents": model.get("num_latents") or model["expansion_factor"] * d_in,
        "k": model["k"],
        "k_aux": model.get("k_aux"),
        "batch": data["batch_size"],
        "precision": dtype,
    }


def run_tune(argv: list[str]) -> None:
    """``python -m saetrain tune-kernels``: time the kernel choices on this GPU, store them."""
    defaults = TuneConfig()
    p = argparse.ArgumentParser(
        prog="python -m saetrain tune-kernels",
        description="Time the Triton kernels' alternatives on this GPU in whole SAE training "
        "steps and store the fastest for `fit` to use on this GPU model. The shape: a recipe's "
        "(--config), else the flags' (default: Phi-3 Mini's SAE, d_in 3072, 24576 latents, "
        "k 32, 4096 tokens a step, bf16); flags override the recipe.",
        exit_on_error=False,
    )
    recipe = "a fit recipe: its SAE shape, data.batch_size, trainer.precision"
    p.add_argument("--config", type=Path, default=None, help=recipe)
    for name, help_ in (
        ("d_in", "the activations' width (Phi-3 Mini: 3072)"),
        ("num_latents", "latents (8x d_in in the paper)"),
        ("k", "latents kept per token"),
        ("k_aux", "AuxK latents (default d_in // 2)"),
        ("batch", "tokens per step (data.batch_size)"),
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=help_)
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None)
    for name, kind, help_ in (
        ("rounds", int, "timed steps of each variant per comparison"),
        ("seed", int, "for the SAE, batch and dead latents"),
        ("dead_fraction", float, "latents marked dead, so that AuxK runs"),
        ("margin", float, "keep a flip only where the step is this fraction faster"),
    ):
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=kind, default=getattr(defaults, name), help=help_)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N")
    p.add_argument("--out", type=Path, default=None,
                   help=f"the file to store into (default: {user_file()})")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="time and print, store nothing")
    args = p.parse_args(argv)
    shape = recipe_shape(args.config, args.d_in) if args.config else {}
    for name in ("d_in", "num_latents", "k", "k_aux", "batch", "precision"):
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    cfg = TuneConfig(
        **shape, rounds=args.rounds, margin=args.margin, seed=args.seed,
        dead_fraction=args.dead_fraction,
    )  # fmt: skip
    SAEConfig(cfg.d_in, cfg.num_latents, cfg.k, k_aux=cfg.k_aux)  # its checks, before timing
    out = args.out or user_file()
    if not args.dry_run:
        read_file(out)  # refuse an unreadable file before spending minutes on timings
    entry = tune(cfg, args.device)
    if entry["rejected"]:
        print(f"rejected on this GPU (please report): {json.dumps(entry['rejected'])}")
    if args.dry_run:
        return
    write_entry(out, entry["device"], entry)
    print(f"stored for {entry['device']} in {out}; `fit` on this GPU model now uses them")
