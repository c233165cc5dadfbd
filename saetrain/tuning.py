"""Kernel choices timed on this machine's GPU: ``python -m saetrain tune-kernels``.

:func:`tune` times whole training steps (``SAE.forward`` with AuxK, backward,
:class:`~saetrain.optim.DecoderNormAdam`) at the caller's shape, one switch of
:mod:`saetrain.kernel_choices` at a time: starting from the choices in effect, it flips one,
times the two steps side by side, and keeps the flip only where it is faster by more than a
margin and gives the same step as the starting choices (:func:`check_variant`: a variant
that differs is rejected and reported). ``run_tune`` is the command: it takes the shape from
flags or a ``fit`` recipe, and stores the result for this GPU model, where ``fit`` finds it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch

from . import kernels
from .errors import UserError
from .kernel_choices import (
    SWITCHES,
    Choices,
    chosen,
    current,
    describe,
    device_key,
    read_file,
    user_file,
    write_entry,
)
from .kernels import _backend
from .kernels import encode as encode_module
from .optim import DecoderNormAdam
from .sae import SAE, SAEConfig

# The switches that choose how the encoder selects its latents: the rest only change how
# the same numbers are computed.
SELECTION = ("fused-encoder", "radix", "grouped-topk")


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
        budget_s: Seconds for the flips (None: no limit). Once spent, no further switch is
            checked or timed: those left keep their starting choice and the entry lists them
            under "not_timed". The final timing of the tuned choices runs regardless.
    """

    d_in: int = 3072
    num_latents: int = 24576
    k: int = 32
    k_aux: int | None = None
    batch: int = 4096
    precision: Literal["bf16", "fp32"] = "bf16"
    dead_fraction: float = 0.01
    rounds: int = 10
    margin: float = 0.03
    lr: float = 1e-3
    seed: int = 0
    budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise UserError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        for name in ("batch", "rounds"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dead_fraction <= 1:
            raise UserError(f"dead_fraction must be in [0, 1], got {self.dead_fraction}")
        if not 0 <= self.margin < 1:
            raise UserError(f"margin must be in [0, 1), got {self.margin}")


# (configs by name, one step under given choices, rounds) -> seconds per step, by name.
Clock = Callable[[dict[str, Choices], Callable[[Choices], None], int], dict[str, float]]


def best_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Seconds per call of each fn: one warm-up each (compiles, autotunes), then the fastest
    of `rounds` calls, interleaved so that drift on the machine hits all alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def time_configs(configs: dict[str, Choices], run: Callable[[Choices], None], rounds: int):
    """The default `Clock`: `best_times` of one step under each config."""
    return best_times({name: functools.partial(run, c) for name, c in configs.items()}, rounds)


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
# Relative error allowed between the selected values of two ways of selecting (each value
# against the largest): the fused encoder rounds its pre-activations once, cuBLAS's output
# its own way, a bf16 ulp (2^-8) apart at most.
SELECTION_TOL = {"fp32": 1e-3, "bf16": 2e-2}


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
    """A one-line UserError unless the Triton kernels run on `device`."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("tune-kernels got --device cuda but torch sees no CUDA GPU here")
        if not _backend.HAS_TRITON or _backend.get_backend() == "torch":
            raise UserError(
                "tune-kernels times the Triton kernels, which do not run here: install triton "
                f"and leave {_backend.ENV_VAR} unset (or 'auto')"
            )
        return
    if not (_backend.HAS_TRITON and _backend.triton_interpreted()):
        raise UserError(
            f"tune-kernels times the Triton kernels on a CUDA GPU, and there is none here "
            f"({device.type}); on CPU they run only under Triton's interpreter "
            "(TRITON_INTERPRET=1 and SAETRAIN_KERNELS=triton), which is for tests, not timings"
        )
    if _backend.get_backend() != "triton":
        raise UserError(
            f"tune-kernels on {device.type} needs {_backend.ENV_VAR}=triton (Triton's interpreter)"
        )


def tune(
    cfg: TuneConfig,
    device: str | torch.device = "cuda",
    clock: Clock = time_configs,
    log: Callable[[str], None] = print,
    now: Callable[[], float] = time.monotonic,
) -> dict:
    """Time the switches at `cfg`'s shape on `device` and return the entry to store (see the
    module docstring). The choices in effect before the call are in effect after it. `now`
    (seconds) measures `cfg.budget_s`."""
    device = torch.device(device)
    check_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    # The clock's synchronize waits on the current device: make it this one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _tune(cfg, device, clock, log, now)


def _tune(cfg: TuneConfig, device: torch.device, clock: Clock, log: Callable[[str], None], now):
    began = now()
    start = current(device.type)
    bench = _Bench(cfg, device)
    key = device_key(device)
    k_aux = min(bench.sae.cfg.k_aux, int(bench.dead.sum()))
    log(
        f"tuning on {key}: d_in {cfg.d_in}, {cfg.num_latents} latents, k {cfg.k}, k_aux "
        f"{k_aux} ({int(bench.dead.sum())} dead), batch {cfg.batch}, {cfg.precision}; "
        f"starting from {describe(start)}"
    )
    choices, comparisons, rejected, not_timed = dict(start), [], {}, []
    for switch in SWITCHES:
        if not _applies(switch, choices, cfg):
            continue
        if not_timed or (cfg.budget_s is not None and now() - began > cfg.budget_s):
            not_timed.append(switch)
            log(f"  {switch}: not timed, the budget of {cfg.budget_s:g} s is spent")
            continue
        flipped = {**choices, switch: not choices[switch]}
        tols = SELECTION_TOL[cfg.precision], GRAD_TOL[cfg.precision]
        why = check_variant(bench, flipped, choices, *tols)
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
        "not_timed": not_timed,
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
        raise UserError(f"cannot read the recipe {path}: {first}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a fit recipe (a YAML mapping with model, data, trainer)")
    model = {**_defaults(SAEModule), **(raw.get("model") or {})}
    data = {**_defaults(ActivationDataModule), **(raw.get("data") or {})}
    d_in = d_in or model.get("d_in")
    if d_in is None:
        if not data.get("model"):
            raise UserError(f"{path} sets neither model.d_in nor data.model: pass --d-in")
        d_in = hidden_size(load_lm_config(str(data["model"])))
    precision = str((raw.get("trainer") or {}).get("precision", "32-true"))
    if precision.startswith("bf16"):
        dtype = "bf16"
    elif precision in ("32", "32-true"):
        dtype = "fp32"
    else:
        raise UserError(
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
    p.add_argument("--budget", dest="budget_s", type=float, default=None, metavar="SECONDS",
                   help="time for the flips: switches left when it is spent keep their "
                   "starting choice (default: no limit)")  # fmt: skip
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
        dead_fraction=args.dead_fraction, budget_s=args.budget_s,
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
