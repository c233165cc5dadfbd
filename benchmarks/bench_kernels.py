"""Tokens/second of an SAE training step: the encoder matmul alone, dense autograd, our kernels.

    python benchmarks/bench_kernels.py                 # d_in=576, 16384 latents, k=32, B=4096
    python benchmarks/bench_kernels.py --ops           # also time the torch alternatives per op
    python benchmarks/bench_kernels.py --parts         # encoder and decoder alone, sparse vs dense
    python benchmarks/bench_kernels.py --d-in 3072 --num-latents 24576 --dtypes bf16 --parts
    SAETRAIN_KERNELS=torch python benchmarks/bench_kernels.py --dtypes fp32

Rows per dtype (fp32, and bf16 autocast with fp32 parameters):
- floor: F.linear(x, W_enc, b_enc) alone, the one dense matmul a Top-k step cannot avoid;
- fused Adam alone: the optimizer step on the SAE's parameters, which no step avoids either
  (the last line gives the best ratio to the floor a step could reach: matmul + Adam);
- dense: a plain autograd step (topk on F.linear, x_hat = dense latents @ W_dec);
- kernels: the same step with saetrain.kernels (encode_topk, decode) and SAEModule's
  optimizer, DecoderNormAdam (one pass for the decoder where Triton runs).
A step is: forward, FVU + AuxK loss (dead latents drawn at --dead-fraction; k_aux =
min(d_in // 2, dead count) as in sparsify), backward, decoder-gradient projection, fused
Adam, row renormalisation. Rounds interleave the rows and the best round is kept, as other
work on the machine only ever adds time.

On CPU, glibc hands big tensors fresh pages from mmap and each first touch faults (~0.5 ms
per MB here): MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 lets freed memory be
reused and speeds every row (both steps more than the floor).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from unittest import mock

import torch
import torch.nn.functional as F

from saetrain.kernels import (
    decode,
    decode_pair,
    decoder_norm,
    encode_topk,
    get_backend,
    normalize_decoder_,
    project_decoder_grad_,
    sae_losses,
    sae_losses_reference,
    sparse_ops,
)
from saetrain.kernels import encode as encode_module
from saetrain.kernels import loss as loss_module
from saetrain.kernels import topk as topk_module
from saetrain.kernels._backend import triton_interpreted
from saetrain.kernels.topk import select_topk
from saetrain.optim import DecoderNormAdam
from saetrain.tuning import best_times


def make_sae(d_in: int, num_latents: int, device: str) -> dict[str, torch.nn.Parameter]:
    W_dec = torch.randn(num_latents, d_in, device=device)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return {
        "W_enc": torch.nn.Parameter(W_dec.clone()),  # (num_latents, d_in), tied init
        "b_enc": torch.nn.Parameter(torch.zeros(num_latents, device=device)),
        "W_dec": torch.nn.Parameter(W_dec),  # (num_latents, d_in)
        "b_dec": torch.nn.Parameter(torch.zeros(d_in, device=device)),
    }


def losses(x, x_hat, e_hat, e):
    """FVU and AuxK loss (Gao et al. 2024), both normalised by the total variance of x."""
    total_variance = (x - x.mean(0)).pow(2).sum()
    fvu = (x_hat - x).pow(2).sum() / total_variance
    auxk = (e_hat - e.detach()).pow(2).sum() / total_variance if e_hat is not None else 0.0
    return fvu + auxk / 32


def dense_step(p, x, k, dead_mask, k_aux):
    """Plain autograd: every matmul dense over all num_latents."""
    pre_acts = F.linear(x - p["b_dec"], p["W_enc"], p["b_enc"])  # (B, num_latents)
    values, indices = pre_acts.topk(k, dim=-1)  # (B, k)
    latents = torch.zeros_like(pre_acts).scatter(1, indices, values.relu())
    x_hat = latents @ p["W_dec"].to(latents.dtype) + p["b_dec"]  # (B, d_in)
    e_hat = None
    if k_aux:
        aux_values, aux_indices = pre_acts.masked_fill(~dead_mask, float("-inf")).topk(k_aux)
        aux = torch.zeros_like(pre_acts).scatter(1, aux_indices, aux_values.relu())
        e_hat = aux @ p["W_dec"].to(aux.dtype)
    return losses(x, x_hat, e_hat, x_hat - x)


def triton_runs(device: str) -> bool:
    """Whether the Triton kernels serve `device` (CUDA, or CPU under the interpreter)."""
    return get_backend() != "torch" and (device == "cuda" or triton_interpreted())


# Context managers that set a kernel switch and restore it: fused_encoder(True) runs the
# CUDA encoder as one matmul + selection kernel; latent_major(True) sums the Triton path's
# weight-gradient rows latent-major; radix_select(True, device) selects by the radix kernel.
latent_major = functools.partial(mock.patch.object, sparse_ops, "LATENT_MAJOR")


@contextlib.contextmanager
def fused_encoder(on: bool):
    """The switch on CUDA and under the interpreter alike (where fusing is the default)."""
    with (
        mock.patch.object(encode_module, "FUSE_ON_CUDA", on),
        mock.patch.object(encode_module, "FUSE_UNDER_INTERPRETER", on),
    ):
        yield


def radix_select(on: bool, device: str):
    """A context in which the unfused encoder selects by the radix-select kernel (or not)."""
    devices = frozenset({torch.device(device).type}) if on else frozenset()
    return mock.patch.object(topk_module, "RADIX_DEVICES", devices)


@torch.no_grad()
def project_torch_(W_dec: torch.Tensor, grad: torch.Tensor) -> None:
    """The decoder-gradient projection as plain torch ops, in place (the dense baseline)."""
    grad -= (grad * W_dec).sum(1, keepdim=True) * W_dec


@torch.no_grad()
def normalize_torch_(W_dec: torch.Tensor) -> None:
    """The row renormalisation as plain torch ops, in place (the dense baseline)."""
    W_dec /= W_dec.norm(dim=1, keepdim=True) + torch.finfo(W_dec.dtype).eps


def kernel_step(p, x, k, dead_mask, k_aux):
    """The same step with saetrain.kernels, as SAE.forward takes it: sparse decode and sparse
    backward, and the losses in one pass each way where the Triton kernels run."""
    out = encode_topk(x, p["W_enc"], p["b_enc"], k, dead_mask, k_aux, b_dec=p["b_dec"])
    e_hat = None
    if not out.aux_indices.shape[1]:
        decoded = decode(out.latent_acts, out.latent_indices, p["W_dec"])
    else:
        decoded, e_hat = decode_pair(  # one gradient for W_dec
            out.latent_acts, out.latent_indices, out.aux_acts, out.aux_indices, p["W_dec"]
        )
    _, fvu, auxk = sae_losses(x, decoded, p["b_dec"], torch.ones((), device=x.device), e_hat)
    return fvu + auxk / 32


def fused_kernel_step(p, x, k, dead_mask, k_aux):
    """kernel_step with the fused matmul + top-k encoder kernel (CUDA)."""
    with fused_encoder(True):
        return kernel_step(p, x, k, dead_mask, k_aux)


def unfused_kernel_step(p, x, k, dead_mask, k_aux):
    """kernel_step with cuBLAS's matmul + top-k selection in place of the fused encoder (CUDA)."""
    with fused_encoder(False):
        return kernel_step(p, x, k, dead_mask, k_aux)


def make_train_step(
    forward, p, opt, x, k, dead_mask, k_aux, autocast_dtype, sparse_norm, major=None, radix=None
):
    """One training step as a function; `major`: LATENT_MAJOR for its backward, `radix`: the
    radix select for the unfused encoder's selections (None: each as set)."""
    radix_on = x.device.type in topk_module.RADIX_DEVICES if radix is None else radix

    def step():
        with (
            torch.autocast(
                x.device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32
            ),
            radix_select(radix_on, x.device.type),
        ):
            loss = forward(p, x, k, dead_mask, k_aux)
        with latent_major(sparse_ops.LATENT_MAJOR if major is None else major):
            loss.backward()
        W_dec = p["W_dec"]
        if not sparse_norm:
            project_torch_(W_dec, W_dec.grad)
        opt.step()  # sparse_norm: DecoderNormAdam, which projects and renormalises
        opt.zero_grad(set_to_none=True)
        if not sparse_norm:
            normalize_torch_(W_dec)

    return step


def bench_steps(args, dtype_name: str) -> None:
    torch.manual_seed(0)
    autocast_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    B, d_in, N = args.batch, args.d_in, args.num_latents
    x = torch.randn(B, d_in, device=args.device)
    dead_mask = torch.rand(N, device=args.device) < args.dead_fraction  # (num_latents,)
    k_aux = min(args.k_aux or d_in // 2, int(dead_mask.sum()))
    fns = {}
    p_floor = make_sae(d_in, N, args.device)

    def floor():
        with torch.autocast(
            x.device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32
        ):
            with torch.no_grad():
                F.linear(x, p_floor["W_enc"], p_floor["b_enc"])

    fns["floor: encoder matmul"] = floor
    # What the optimizer alone costs: it reads and writes every parameter and both moments
    # each step, at any batch size, so it bounds the step from below beside the matmul.
    p_adam = make_sae(d_in, N, args.device)
    for t in p_adam.values():
        t.grad = torch.randn_like(t)
    adam = torch.optim.Adam(p_adam.values(), lr=1e-4, fused=True)
    fns["fused Adam alone"] = adam.step
    # And what the decoder's forward alone costs: k rows of W_dec per token, read from memory
    # (W_dec is far larger than a cache), a cost per token that no step avoids either.
    with torch.no_grad():
        picked = F.linear(x, p_floor["W_enc"]).topk(args.k, dim=1)
    acts, idx = picked.values.relu().contiguous(), picked.indices.contiguous()

    @torch.no_grad()
    def forward_decode():
        with torch.autocast(
            x.device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32
        ):
            decode(acts, idx, p_floor["W_enc"])

    fns["forward decode alone"] = forward_decode
    # (name, forward, sparse kernels, LATENT_MAJOR, radix select); None: as set.
    steps = [
        ("dense autograd step", dense_step, False, None, None),
        ("kernel step", kernel_step, True, None, None),
    ]
    if triton_runs(args.device):  # each untimed switch alone, then all of them at once
        steps[1] = ("kernel step (fused)", fused_kernel_step, True, None, None)
        steps.append(("kernel step (matmul+topk)", unfused_kernel_step, True, False, False))
        steps.append(("kernel step (matmul+radix)", unfused_kernel_step, True, False, True))
        steps.append(("kernel step (latent-major)", unfused_kernel_step, True, True, False))
        steps.append(("kernel step (latent+radix)", unfused_kernel_step, True, True, True))
    for name, forward, sparse, major, radix in steps:
        p = make_sae(d_in, N, args.device)
        if sparse:
            opt = DecoderNormAdam(p.values(), decoders=[p["W_dec"]], lr=1e-4, fused=True)
        else:
            opt = torch.optim.Adam(p.values(), lr=1e-4, fused=True)
        fns[name] = make_train_step(
            forward, p, opt, x, args.k, dead_mask, k_aux, autocast_dtype, sparse, major, radix
        )
    times = best_times(fns, args.rounds)
    if args.profile:
        profile(fns, args.profile)
    floor_time = times["floor: encoder matmul"]
    print(
        f"\n{dtype_name} (B={B}, d_in={d_in}, num_latents={N}, k={args.k}, k_aux={k_aux}, "
        f"dead={int(dead_mask.sum())})"
    )
    for name, t in times.items():
        speed = f"{B / t:10.0f} tok/s  {floor_time / t:6.2f} x floor speed"
        alone = "Adam" in name or "decode" in name
        print(f"  {name:26s} {t * 1e3:8.2f} ms  {'' if alone else speed}")
    both = floor_time + times["fused Adam alone"]
    print(
        f"  matmul + Adam: {both * 1e3:.2f} ms, so no step beats {floor_time / both:.2f} x the "
        "floor's speed at this batch (the optimizer's share falls as the batch grows)"
    )
    three = both + times["forward decode alone"]
    per_token = times["forward decode alone"] / floor_time
    print(
        f"  matmul + Adam + forward decode: {three * 1e3:.2f} ms, so no step beats "
        f"{floor_time / three:.2f} x; the decode alone costs {per_token:.2f} of the floor at "
        "any batch, and each backward pass that reads k rows per token from memory about as much"
    )


def op_alternatives(B: int, D: int, N: int, k: int, dtype: torch.dtype) -> dict:
    """Torch ways to run each sparse op at these shapes; "(ours)" marks the CPU choice."""
    import warnings

    from saetrain.kernels.topk import select_topk

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    torch.manual_seed(0)
    W = (torch.randn(N, D) / D**0.5).to(dtype)  # (num_latents, d)
    x = torch.randn(B, D, dtype=dtype)
    idx = torch.randint(0, N, (B, k))
    acts = torch.rand(B, k, dtype=dtype)
    flat = idx.reshape(-1)
    pre = F.linear(x.float(), W.float())  # (B, num_latents)
    offsets, bags = torch.arange(0, B * k, k), torch.arange(B * k) // k

    def csr_mm():
        rows, order = flat.sort()
        crow = torch.zeros(N + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(rows, minlength=N).cumsum(0)
        csr = torch.sparse_csr_tensor(crow, order // k, acts.reshape(-1)[order].float(), (N, B))
        out = torch.empty(N, D)
        return torch.addmm(out, csr, x.float(), beta=0, out=out)

    def index_add():
        rows = acts.float().reshape(-1, 1) * x.float().repeat_interleave(k, 0)
        return torch.zeros(N, D).index_add_(0, flat, rows)

    def dense_latents():
        return torch.zeros(B, N, dtype=dtype).scatter_(1, idx, acts)

    def psw_backward():
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            x, W, flat, offsets, bags, 0, -1
        )

    return {
        "topk: torch.topk": lambda: pre.topk(k, dim=1),
        "topk: grouped (ours)": lambda: select_topk(pre, k),
        "decode: embedding_bag (ours)": lambda: F.embedding_bag(
            idx, W, per_sample_weights=acts, mode="sum"
        ),
        "decode: gather + bmm": lambda: torch.bmm(acts.unsqueeze(1), W[idx]),
        "decode: dense latents @ W": lambda: dense_latents() @ W,
        "grad acts: emb-bag psw backward (ours)": psw_backward,
        "grad acts: gather + bmm": lambda: torch.bmm(W[idx], x.unsqueeze(-1)),
        "grad W: CSR @ dense (ours)": csr_mm,
        "grad W: index_add_": index_add,
        "grad W: dense latents.T @ x": lambda: dense_latents().T @ x,
    }


def bench_ops(args) -> None:
    """Time the torch alternatives for each sparse op at the step's shapes, on CPU."""
    B, D, N, k = args.batch, args.d_in, args.num_latents, args.k
    for dtype in (torch.float32, torch.bfloat16):
        ops = op_alternatives(B, D, N, k, dtype)
        print(f"\nops, {dtype} (B={B}, d={D}, num_latents={N}, k={k})")
        for name, t in best_times(ops, max(1, args.rounds - 1)).items():
            print(f"  {name:40s} {t * 1e3:8.1f} ms")


def profile(fns: dict, top: int) -> None:
    """The `top` ops by self device (or CPU) time over three calls of each step fn."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    for name, fn in fns.items():
        if "step" not in name:
            continue
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        print(f"\nprofile of {name!r} (3 steps), top {top} by self time:")
        print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


def bench_parts(args, dtype_name: str) -> None:
    """The encoder and the decoder alone, forward + backward: ours vs dense torch.

    Encoder rows: the fused matmul + top-k kernel (CUDA) and cuBLAS + torch.topk, each with
    its sparse backward, against dense autograd (F.linear, topk, dense scatter). Decoder
    rows: the sparse decode against a dense (B, num_latents) latents @ W_dec, forward and
    backward (grads for the latent values and W_dec). Decoder-norm rows: the projection of
    an fp32 W_dec's gradient and the renormalisation of its rows, ours against torch ops,
    with the bandwidth their bytes (one read of W_dec and of its gradient, one write of each)
    imply. Decoder optimizer rows: DecoderNormAdam's step on an fp32 W_dec alone, in one pass
    (decoder_adam_step_) and as the three ops (projection, torch's fused Adam,
    renormalisation), with the bandwidth of the bytes each moves.
    """
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    B, d_in, N, k = args.batch, args.d_in, args.num_latents, args.k
    dev = args.device
    x = torch.randn(B, d_in, device=dev, dtype=dtype, requires_grad=True)
    p = {name: t.detach().to(dtype).requires_grad_() for name, t in make_sae(d_in, N, dev).items()}
    W_enc, b_enc, W_dec = p["W_enc"], p["b_enc"], p["W_dec"]
    with torch.no_grad():
        pre = F.linear(x, W_enc, b_enc)
        acts, idx = pre.topk(k, dim=-1)
    acts = acts.relu().detach().requires_grad_()
    grad_out = torch.randn(B, d_in, device=dev, dtype=dtype)
    grad_acts = torch.randn(B, k, device=dev, dtype=dtype)

    def enc_dense():
        pre_acts = F.linear(x, W_enc, b_enc)
        values, _ = pre_acts.topk(k, dim=-1)
        values.relu().backward(grad_acts)

    def enc_ours(fused, major=False):
        def run():
            with fused_encoder(fused):
                out = encode_topk(x, W_enc, b_enc, k)
            with latent_major(major):
                out.latent_acts.backward(grad_acts)

        return run

    def dec_dense():
        latents = torch.zeros(B, N, device=dev, dtype=dtype).scatter(1, idx, acts)
        (latents @ W_dec).backward(grad_out)

    def dec_ours(major=False):
        def run():
            with latent_major(major):
                decode(acts, idx, W_dec).backward(grad_out)

        return run

    def floor():
        with torch.no_grad():
            F.linear(x, W_enc, b_enc)

    W_norm = make_sae(d_in, N, dev)["W_dec"].detach()  # fp32, as the optimizer holds it
    G_norm = torch.randn_like(W_norm)

    def norm_ours():
        project_decoder_grad_(W_norm, G_norm)
        normalize_decoder_(W_norm)

    def norm_torch():
        project_torch_(W_norm, G_norm)
        normalize_torch_(W_norm)

    decoder_steps = {}
    for fuse in (True, False):
        W_opt = make_sae(d_in, N, dev)["W_dec"]  # fp32, as the optimizer holds it
        W_opt.grad = torch.randn_like(W_opt)
        opt = DecoderNormAdam([W_opt], decoders=[W_opt], lr=1e-4, fused=True, fuse=fuse)
        decoder_steps[fuse] = opt.step

    # The losses as SAE.forward takes them: fp32 inputs, the decodes in the step's dtype.
    xs_loss = torch.randn(B, d_in, device=dev)
    decoded = (xs_loss + 0.1 * torch.randn_like(xs_loss)).to(dtype).requires_grad_()
    err_hat = (0.1 * torch.randn_like(xs_loss)).to(dtype).requires_grad_()
    b_loss = torch.zeros(d_in, device=dev, requires_grad=True)
    one = torch.ones((), device=dev)

    def losses_run(fn):
        def run():
            _, fvu, auxk = fn(xs_loss, decoded, b_loss, one, err_hat)
            (fvu + auxk / 32).backward()

        return run

    def topk_torch():
        pre.topk(k, dim=-1)

    def topk_grouped():  # the grouped selection, whatever the device's default
        previous = topk_module.GROUPED_DEVICES
        topk_module.GROUPED_DEVICES = previous | {pre.device.type}
        try:
            select_topk(pre, k)
        finally:
            topk_module.GROUPED_DEVICES = previous

    # AuxK's selection beside the main one, as the encoder makes them: 10% of the latents
    # dead, k_aux = d_in // 2 (at most the dead count), among the same pre-activations.
    dead_mask = torch.rand(N, device=dev) < 0.1
    k_aux = min(d_in // 2, int(dead_mask.sum()))

    def topk_aux_torch():
        pre.topk(k, dim=-1)
        pre.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=-1, sorted=False)

    def topk_radix(aux, resident=None):
        dead = dead_mask if aux else None
        return lambda: topk_module.radix_topk(pre, k, dead, k_aux, resident=resident)

    fns = {"floor: encoder matmul": floor, "encoder fwd+bwd: dense": enc_dense}
    fns["top-k of the pre-acts: torch"] = topk_torch
    fns["top-k of the pre-acts: grouped"] = topk_grouped
    triton_here = triton_runs(dev)
    if triton_here:
        fns["top-k of the pre-acts: radix"] = topk_radix(False)
        if 1 << (N - 1).bit_length() <= topk_module.RESIDENT_MAX_N:  # the other method
            fns["top-k of the pre-acts: histograms"] = topk_radix(False, resident=False)
        fns["top-k + AuxK: torch"] = topk_aux_torch
        fns["top-k + AuxK: radix"] = topk_radix(True)
        fns["encoder fwd+bwd: fused"] = enc_ours(True)
    fns["encoder fwd+bwd: matmul+topk"] = enc_ours(False)
    if triton_here:
        fns["encoder fwd+bwd: latent-major"] = enc_ours(False, True)
    fns["decoder-norm step: ours"] = norm_ours
    fns["decoder-norm step: torch ops"] = norm_torch
    fns["decoder optimizer step: one pass"] = decoder_steps[True]
    fns["decoder optimizer step: 3 ops"] = decoder_steps[False]
    if triton_here:  # elsewhere both are the torch ops
        fns["losses fwd+bwd: torch ops"] = losses_run(sae_losses_reference)
        fns["losses fwd+bwd: one pass"] = losses_run(sae_losses)
    fns["decoder fwd+bwd: dense"] = dec_dense
    fns["decoder fwd+bwd: sparse"] = dec_ours()
    if triton_here:
        fns["decoder fwd+bwd: latent-major"] = dec_ours(True)
    times = best_times(fns, args.rounds)
    print(f"\nparts, {dtype_name} (B={B}, d_in={d_in}, num_latents={N}, k={k})")
    for name, t in times.items():
        print(f"  {name:30s} {t * 1e3:8.2f} ms  {B / t:12.0f} tok/s")
    ratio = times["top-k of the pre-acts: torch"] / times["top-k of the pre-acts: grouped"]
    if not topk_module.groupable(N, k):
        used = f"too few columns to group at k={k}: both ran torch.topk"
    elif pre.device.type in topk_module.GROUPED_DEVICES:
        used = "the default here"
    else:
        used = f"off on {pre.device.type}: topk.GROUPED_DEVICES"
    print(f"  top-k: grouped is {ratio:.2f}x the speed of torch.topk ({used})")
    if triton_here:
        where = "on" if pre.device.type in topk_module.RADIX_DEVICES else "off"
        ratio = times["top-k of the pre-acts: torch"] / times["top-k of the pre-acts: radix"]
        aux_ratio = times["top-k + AuxK: torch"] / times["top-k + AuxK: radix"]
        print(
            f"  top-k: radix is {ratio:.2f}x the speed of torch.topk, {aux_ratio:.2f}x with "
            f"AuxK (k_aux={k_aux}) (topk.RADIX_DEVICES: {where} on {pre.device.type})"
        )
        if "top-k of the pre-acts: histograms" in times:
            ratio = times["top-k of the pre-acts: histograms"]
            ratio /= times["top-k of the pre-acts: radix"]
            print(
                f"  top-k: rows in registers are {ratio:.2f}x the speed of histograms over "
                f"rows in memory (topk.RESIDENT_MAX_N = {topk_module.RESIDENT_MAX_N})"
            )
    ratio = times["decoder fwd+bwd: dense"] / times["decoder fwd+bwd: sparse"]
    print(f"  decoder: sparse is {ratio:.1f}x faster than dense")
    if triton_here:
        one_pass = times["losses fwd+bwd: one pass"]
        ratio = times["losses fwd+bwd: torch ops"] / one_pass
        # Forward: xs read twice (var_mean, the pass), decoded and err_hat read, x_hat written
        # (fp32); backward: xs, decoded, err_hat read, their two gradients written.
        moved = B * d_in * (16 + 6 * decoded.element_size())
        state = "on" if loss_module.FUSE_LOSSES else "off"
        print(
            f"  losses: one pass is {ratio:.2f}x the speed of the torch ops "
            f"({moved / one_pass / 1e9:.0f} GB/s; saetrain/kernels/loss.py FUSE_LOSSES: {state})"
        )
    moved = 4 * W_norm.numel() * W_norm.element_size()  # W and G: read once, written once
    for name in ("ours", "torch ops"):
        t = times[f"decoder-norm step: {name}"]
        print(f"  decoder-norm step, {name}: {moved / t / 1e9:.0f} GB/s for one read and write")
    # Bytes per fp32 parameter: one pass reads W, G, m, v and writes W, m, v (28); the three
    # ops move 12 (projection: W, G read, G written), 28 (Adam), 8 (renormalisation).
    one, three = times["decoder optimizer step: one pass"], times["decoder optimizer step: 3 ops"]
    print(
        f"  decoder optimizer step: one pass is {three / one:.2f}x the speed of the 3 ops "
        f"({28 * W_norm.numel() / one / 1e9:.0f} against {48 * W_norm.numel() / three / 1e9:.0f}"
        f" GB/s; optim.FUSE_WHERE_TRITON: one pass where Triton runs"
        f"{', here' if triton_here else ', not here'})"
    )
    if triton_here:  # the step rows decide sparse_ops.LATENT_MAJOR: it serves both parts
        default = "on" if sparse_ops.LATENT_MAJOR else "off"
        for part, token_major in (("decoder", "sparse"), ("encoder", "matmul+topk")):
            ratio = times[f"{part} fwd+bwd: {token_major}"]
            ratio /= times[f"{part} fwd+bwd: latent-major"]
            print(
                f"  {part}: latent-major is {ratio:.2f}x the speed of token-major "
                f"(sparse_ops.LATENT_MAJOR, {default} by default)"
            )
        ratio = times["decoder fwd+bwd: dense"] / times["decoder fwd+bwd: latent-major"]
        print(f"  decoder: latent-major is {ratio:.1f}x faster than dense")
    if "encoder fwd+bwd: fused" in times:
        ratio = times["encoder fwd+bwd: matmul+topk"] / times["encoder fwd+bwd: fused"]
        print(f"  encoder: fused is {ratio:.2f}x the speed of matmul+topk")
        if args.sweep:
            sweep_fused(x, W_enc, b_enc, k, args.rounds)


def sweep_fused(x, W_enc, b_enc, k, rounds) -> None:
    """Forward time of the fused encoder over tile sizes (BLOCK_B, BLOCK_N, BLOCK_D, warps)."""
    with torch.no_grad():
        want = F.linear(x, W_enc, b_enc).float().topk(k, dim=1).values.relu()
    fns = {}
    for blocks in [
        (32, 64, 32, 4), (32, 64, 32, 8), (64, 64, 32, 8), (64, 64, 64, 8),
        (64, 128, 32, 8), (128, 64, 32, 8), (64, 128, 64, 8), (128, 128, 32, 8),
    ]:  # fmt: skip

        def run(blocks=blocks):
            encode_module.FUSED_BLOCKS = blocks
            with torch.no_grad():
                return encode_topk(x, W_enc, b_enc, k)

        fns[str(blocks)] = run
    times = {}
    for name, fn in fns.items():
        try:
            got = fn().latent_acts.float()
            tol = 1e-2 if x.dtype != torch.float32 else 1e-4
            if not torch.allclose(got, want, rtol=tol, atol=tol):
                print(f"  fused {name}: WRONG top-k values, max err {(got - want).abs().max()}")
                continue
            times.update(best_times({name: fn}, rounds))
        except Exception as err:  # a config that does not compile (shared memory, registers)
            print(f"  fused {name}: failed ({type(err).__name__}: {str(err)[:80]})")
    encode_module.FUSED_BLOCKS = None
    for name, t in sorted(times.items(), key=lambda item: item[1]):
        print(f"  fused forward {name:22s} {t * 1e3:8.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--num-latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--k-aux", type=int, default=0, help="0: d_in // 2, as in sparsify")
    parser.add_argument("--dead-fraction", type=float, default=0.01)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: default")
    parser.add_argument("--ops", action="store_true", help="also time torch alternatives per op")
    parser.add_argument("--parts", action="store_true", help="also time encoder/decoder alone")
    parser.add_argument("--sweep", action="store_true", help="with --parts: fused tile sizes")
    parser.add_argument("--no-steps", action="store_true", help="skip the whole-step rows")
    parser.add_argument("--profile", type=int, default=0, help="profile steps: top N ops")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"saetrain.kernels backend={get_backend()} device={args.device} threads={threads}")
    for dtype_name in args.dtypes.split(","):
        if not args.no_steps:
            bench_steps(args, dtype_name)
        if args.parts:
            bench_parts(args, dtype_name)
    if args.ops:
        bench_ops(args)
    print_tiles()


def print_tiles() -> None:
    """The tiles the autotuner chose for the gathers, the scatters, the decoder's optimizer
    step and the radix select, per key (sizes, dtypes)."""
    for module, name in (
        (sparse_ops, "_gather_combine_tuned"),
        (sparse_ops, "_gather_dot_tuned"),
        (sparse_ops, "_scatter_outer_tuned"),
        (sparse_ops, "_segment_outer_tuned"),
        (decoder_norm, "_decoder_adam_tuned"),
        (topk_module, "_radix_topk_tuned"),
    ):
        tuner = getattr(module, name, None)
        for key, config in getattr(tuner, "cache", {}).items():
            print(f"  autotuned {name.strip('_')[:-6]} {key}: {config}")


if __name__ == "__main__":
    main()
