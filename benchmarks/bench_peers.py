"""Tokens/second of one SAE training step: saetrain against SAELens and sparsify (issue 4).

    /tmp/peers-venv/bin/python benchmarks/bench_peers.py                  # fp32, the defaults
    /tmp/peers-venv/bin/python benchmarks/bench_peers.py --dtypes fp32,bf16 --rounds 5
    /tmp/peers-venv/bin/python benchmarks/bench_peers.py --d-in 64 --num-latents 512 \
        --batch 256 --rounds 1                                            # smoke test, seconds

Needs the peers venv of ``bash scripts/check_interop.sh`` (sae-lens and eai-sparsify beside
this environment's torch and saetrain). Defaults: d_in=576 (SmolLM2-135M), num_latents=16384,
k=32, batch 4096 tokens, fp32 parameters; ``--dtypes fp32,bf16`` adds bf16 autocast rows.

A step is what each library's trainer does per batch, timed end to end on the same (B, d_in)
batch of standard-normal activations:
- floor: ``F.linear(x, W_enc, b_enc)`` under no_grad, the one dense matmul no Top-k step avoids;
- saetrain: ``SAE.forward(x, dead_mask)``, loss = fvu + auxk_coef * auxk_loss, backward,
  ``DecoderNormAdam`` (gradient projection, Adam with betas (0.9, 0.999), eps 6.25e-10, lr
  ``default_lr``, row renormalisation), ``zero_grad``, LR scheduler step, dead-latent counters
  updated, as ``SAEModule.training_step`` + ``optimizer_step`` do (Lightning's own per-step
  bookkeeping and metric logging are not timed);
- SAELens: ``TopKTrainingSAE`` (its config defaults: rescale_acts_by_decoder_norm=True, dense
  Top-k activations, aux_loss_coefficient=1) stepped by its own ``SAETrainer.step(x)``:
  ``training_forward_pass`` (MSE + Top-k AuxK), backward, ``clip_grad_norm_(1.0)``, Adam,
  ``zero_grad``, LR scheduler, its dead-neuron counters. It keeps no unit-norm decoder: it
  divides by the row norms inside encode/decode instead, so there is no decoder-norm step;
- sparsify: ``SparseCoder`` stepped as ``sparsify/trainer.py`` does: ``set_decoder_norm_to_unit
  _norm`` before the forward, ``forward(x, dead_mask=, total_variance=)``, loss = fvu +
  auxk_alpha * auxk_loss, backward, ``remove_gradient_parallel_to_decoder_directions``, the
  optimizer step and ``zero_grad``, its scheduler, its dead counters. Two rows: Adam (its
  ``optimizer="adam"`` branch: torch Adam, or bitsandbytes' Adam8bit when that imports, with
  ``get_linear_schedule_with_warmup``) and signum (its default optimizer: SignSGD in
  schedulefree's ScheduleFreeWrapper, momentum 0.95, no scheduler).

Matched settings: the same shapes, k, fp32 parameters and batch. AuxK is on in every row:
auxk_coef = auxk_alpha = 1/32 for saetrain and sparsify (sparsify's default auxk_alpha is 0,
which turns AuxK off; here it is on), SAELens' aux_loss_coefficient keeps its default 1 (the
coefficient does not change the work). k_aux = d_in // 2 everywhere (SAELens and sparsify
hard-code it; saetrain's ``k_aux`` is set to it), capped by all three at the number of dead
latents. Dead latents: ``--dead-fraction`` (1%) of the latents, the same ids in every row, are
marked dead through each library's own counter before every step (saetrain's and sparsify's
tokens-since-fired, SAELens' forward passes since fired), so the AuxK path always runs with
that many dead latents; the other latents start live and the counters advance as usual.

Rounds interleave the rows (one warm-up call each first) and each row keeps its best time:
other work on the machine only ever adds time. Printed per row: ms per step, tokens/s, speed
relative to the best peer row (>1: faster than the fastest SAELens/sparsify row, whatever its
optimizer) and to the floor (1 = as fast as the matmul alone).

bf16 (``--dtypes bf16``): saetrain and SAELens run their step under bf16 autocast with fp32
parameters (SAELens: its own ``SAETrainerConfig(autocast=True)``). sparsify has no autocast
option: its ``forward`` is decorated with ``torch.autocast("cuda", bfloat16)``, on whenever the
GPU supports bf16, so on CUDA its fp32 row is already mixed precision and on CPU it has no bf16
mode; its bf16 rows wrap the forward in ``torch.autocast`` here, and the output says so.
``--matmul-precision high`` allows TF32 on CUDA for every row (sparsify's ``fit`` sets it);
the default keeps fp32 matmuls exact. On CPU, glibc's mmap threshold makes every big
allocation fault fresh pages: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 speed
every row (see benchmarks/bench_kernels.py). Run it on a quiet machine: with other processes
busy on the same cores, torch's multi-threaded CPU ops slow down by up to 10x (spinning
threads), more for some ops than others, which distorts the ratios; ``--threads 1`` is then
the fairer setting.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
if not torch.cuda.is_available():  # sparsify picks its Triton decoder whenever triton imports
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
import sae_lens  # noqa: E402
import sparsify  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

from saetrain import SAE, DecoderNormAdam, SAEConfig  # noqa: E402
from saetrain.kernels import get_backend  # noqa: E402
from saetrain.module import default_lr, lr_factor  # noqa: E402

Step = Callable[[], torch.Tensor | None]  # returns the step's AuxK loss, if any
AUXK_COEF = 1 / 32  # saetrain's default auxk_coef (Gao et al.), used for sparsify's auxk_alpha


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast for a bf16 row; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def saetrain_step(
    x: torch.Tensor, dead_ids: torch.Tensor, amp: torch.dtype, args: argparse.Namespace
) -> Step:
    """SAEModule's step for one SAE, without Lightning (see the module docstring)."""
    B, d_in = x.shape
    n = args.num_latents
    cfg = SAEConfig(d_in=d_in, num_latents=n, k=args.k, k_aux=d_in // 2, auxk_coef=AUXK_COEF)
    sae = SAE(cfg, device=x.device)
    sae.init_from_data(x)
    opt = DecoderNormAdam(
        sae.parameters(), decoders=[sae.W_dec], lr=default_lr(n), betas=(0.9, 0.999),
        eps=6.25e-10, fused=True,
    )  # as SAEModule.configure_optimizers  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(10**9, 100))
    since_fired = torch.zeros(n, dtype=torch.long, device=x.device)  # tokens since last fired

    def step() -> torch.Tensor:
        since_fired[dead_ids] = cfg.dead_tokens_threshold  # keep the chosen latents dead
        dead = since_fired >= cfg.dead_tokens_threshold  # (N,)
        with autocast(x.device, amp):
            out = sae(x, dead_mask=dead)
            loss = out.fvu + cfg.auxk_coef * out.auxk_loss
        with torch.no_grad():
            fired = torch.zeros_like(dead)
            fired[out.latent_indices.flatten()[out.latent_acts.flatten() > 0]] = True
            since_fired.add_(B)
            since_fired[fired] = 0
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return out.auxk_loss.detach()

    return step


def saelens_step(
    x: torch.Tensor, dead_ids: torch.Tensor, amp: torch.dtype, args: argparse.Namespace
) -> Step:
    """SAELens' own ``SAETrainer.step`` on a ``TopKTrainingSAE`` with its config defaults."""
    B, d_in = x.shape
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=args.num_latents, k=args.k, device=str(x.device))
    sae = TopKTrainingSAE(cfg)
    lr = SAETrainerConfig.lr  # 3e-4, its default (lr_end = lr / 10, as its runner config sets)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=B * 10**9,
        train_batch_size_samples=B,
        lr_end=lr / 10,
        device=str(x.device),
        autocast=amp == torch.bfloat16,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    sae.to(x.device)
    window = trainer_cfg.dead_feature_window  # dead: more forward passes than this unfired

    def step() -> torch.Tensor:
        trainer.n_forward_passes_since_fired[dead_ids] = window + 1
        out = trainer.step(x)
        trainer.n_training_steps += 1  # what its fit loop does after each step
        return out.losses["auxiliary_reconstruction_loss"].detach()

    return step


def sparsify_step(
    x: torch.Tensor,
    dead_ids: torch.Tensor,
    amp: torch.dtype,
    args: argparse.Namespace,
    optimizer: str,
) -> Step:
    """sparsify's per-batch training step (its trainer.py), for one SparseCoder."""
    from sparsify.sign_sgd import SignSGD

    B, d_in = x.shape
    n = args.num_latents
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(
        d_in, sparsify.SparseCoderConfig(num_latents=n, k=args.k), x.device, dtype=torch.float32
    )
    coder.b_dec.data = x.mean(0)  # its first-step init
    schedulers: list = []
    if optimizer == "adam":  # trainer.py: bitsandbytes' Adam8bit if it imports, else torch's
        try:
            from bitsandbytes.optim import Adam8bit as Adam
        except ImportError:
            from torch.optim import Adam
        from transformers import get_linear_schedule_with_warmup

        opt = Adam([dict(params=coder.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)])
        schedulers.append(get_linear_schedule_with_warmup(opt, 1000, 10**9))
    else:  # "signum", its default optimizer
        from schedulefree import ScheduleFreeWrapper

        opt = ScheduleFreeWrapper(
            SignSGD([dict(params=coder.parameters(), lr=5e-3 / (n / 2**14) ** 0.5)]), momentum=0.95
        )
        opt.train()
    threshold = 10_000_000  # its default dead_feature_threshold, in tokens
    since_fired = torch.zeros(n, dtype=torch.long, device=x.device)
    did_fire = torch.zeros(n, dtype=torch.bool, device=x.device)

    def step() -> torch.Tensor:
        since_fired[dead_ids] = threshold + 1
        coder.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        with autocast(x.device, amp):
            out = coder(x, dead_mask=dead_mask, total_variance=total_variance)
            loss = out.fvu + AUXK_COEF * out.auxk_loss + out.multi_topk_fvu / 8
        did_fire[out.latent_indices.flatten()] = True
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        for sched in schedulers:
            sched.step()
        with torch.no_grad():
            since_fired.add_(B)
            since_fired[did_fire] = 0
            did_fire.zero_()
        return out.auxk_loss.detach()

    return step


def floor_step(x: torch.Tensor, amp: torch.dtype, args: argparse.Namespace) -> Step:
    W_dec = torch.randn(args.num_latents, x.shape[1], device=x.device)
    W_enc = W_dec / W_dec.norm(dim=1, keepdim=True)  # (num_latents, d_in)
    b_enc = torch.zeros(args.num_latents, device=x.device)

    def step() -> None:
        with torch.no_grad(), autocast(x.device, amp):
            F.linear(x, W_enc, b_enc)
        return None

    return step


def best_times(fns: dict[str, Step], rounds: int) -> dict[str, float]:
    """bench_kernels.best_times (seconds per call, best of ``rounds`` interleaved), after a
    call of each fn that checks every training step ran its AuxK loss (non-zero)."""
    from bench_kernels import best_times as interleaved_best_times

    for name, fn in fns.items():
        auxk = fn()
        if auxk is not None and not float(auxk) > 0:
            raise RuntimeError(f"{name}: the AuxK loss is {float(auxk)}, so it did not run")
    return interleaved_best_times(fns, rounds)


def bench(dtype_name: str, device: torch.device, args: argparse.Namespace) -> None:
    amp = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    B, d_in, n = args.batch, args.d_in, args.num_latents
    torch.manual_seed(0)
    x = torch.randn(B, d_in, device=device)
    gen = torch.Generator().manual_seed(1)
    n_dead = round(args.dead_fraction * n)
    dead_ids = torch.randperm(n, generator=gen)[:n_dead].to(device)
    notes = []
    sparsify_mark = ""
    if amp == torch.bfloat16:
        sparsify_mark = " *"
        notes.append(
            "* sparsify has no bf16 option (its forward autocasts only on CUDA): the "
            "autocast around its forward is this benchmark's"
        )
    elif device.type == "cuda":
        sparsify_mark = " *"
        notes.append("* sparsify's forward always autocasts to bf16 on a bf16-capable GPU")

    floor_name, ours = "floor: F.linear(x, W_enc, b_enc)", "saetrain: SAE + Adam"
    peers = [
        "SAELens: TopKTrainingSAE + Adam",
        f"sparsify: SparseCoder + Adam{sparsify_mark}",
        f"sparsify: SparseCoder + signum (default){sparsify_mark}",
    ]
    fns: dict[str, Step] = {floor_name: floor_step(x, amp, args)}
    fns[ours] = saetrain_step(x, dead_ids, amp, args)
    fns[peers[0]] = saelens_step(x, dead_ids, amp, args)
    fns[peers[1]] = sparsify_step(x, dead_ids, amp, args, "adam")
    fns[peers[2]] = sparsify_step(x, dead_ids, amp, args, "signum")
    times = best_times(fns, args.rounds)

    floor = times[floor_name]
    best_peer = min(times[p] for p in peers)
    k_aux = min(d_in // 2, n_dead)
    print(
        f"\n{dtype_name} on {device.type} (B={B}, d_in={d_in}, num_latents={n}, k={args.k}, "
        f"k_aux={k_aux}, dead={n_dead} ({100 * n_dead / n:.1f}%), best of {args.rounds})"
    )
    width = max(len(name) for name in times)
    header = f"{'row':{width}s} {'ms/step':>9s} {'tokens/s':>11s} {'vs best peer':>13s}"
    print(f"  {header} {'vs floor':>9s}")
    for name, t in times.items():
        vs_peer = f"{best_peer / t:12.2f}x" if name != floor_name else f"{'':13s}"
        print(f"  {name:{width}s} {t * 1e3:9.2f} {B / t:11.0f} {vs_peer} {floor / t:8.2f}x")
    for note in notes:
        print(f"  {note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--num-latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up")
    p.add_argument("--dead-fraction", type=float, default=0.01, help="latents kept dead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--matmul-precision", choices=["highest", "high"], default="highest")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = sorted(set(dtypes) - {"fp32", "bf16"})
    if bad or not dtypes:
        p.error(f"--dtypes takes fp32 and/or bf16, got {args.dtypes!r}")
    if not 0 < args.dead_fraction < 1:
        p.error(f"--dead-fraction must be in (0, 1), got {args.dead_fraction}")
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    from importlib.metadata import version

    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), saetrain kernels "
        f"{get_backend()}, sae-lens {sae_lens.__version__}, eai-sparsify "
        f"{version('eai-sparsify')}; matmul precision {args.matmul_precision}"
    )
    for dtype_name in dtypes:
        bench(dtype_name, device, args)
    print(
        "\nnotes: SAELens' step also clips the gradient norm to 1 and computes dense "
        "(B, num_latents) Top-k latents; its k_aux is d_in // 2 (not settable), as sparsify's."
    )


if __name__ == "__main__":
    main()
