"""The sparse kernels match their torch references, in outputs and gradients, on both backends.

    python -m pytest tests/test_kernels.py -q

The "triton" backend runs on CUDA when there is one, else under Triton's CPU interpreter,
which needs TRITON_INTERPRET=1 before triton is first imported: this module sets it when it
is imported first; when something imported triton earlier (lightning does), the triton
cases rerun in a fresh process instead. Shapes are tiny: the interpreter is slow.
"""

import copy
import os
import subprocess
import sys
import time
from types import SimpleNamespace
from unittest import mock

_TRITON_IMPORTED_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from host_syncs import HostSyncs  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import saetrain.kernels.decoder_norm as decoder_norm_module  # noqa: E402
import saetrain.kernels.encode as encode_module  # noqa: E402
import saetrain.kernels.loss as loss_module  # noqa: E402
import saetrain.kernels.sparse_ops as sparse_ops  # noqa: E402
import saetrain.kernels.topk as topk_module  # noqa: E402
import saetrain.sae as sae_module  # noqa: E402
from saetrain.kernels import (  # noqa: E402
    decode,
    decode_pair,
    decode_reference,
    decoder_adam_step_,
    decoder_adam_step_reference,
    decoder_norm_step,
    encode_topk,
    encode_topk_reference,
    get_backend,
    normalize_decoder_,
    normalize_decoder_reference,
    project_decoder_grad_,
    project_decoder_grad_reference,
    sae_losses,
    sae_losses_reference,
    set_backend,
)
from saetrain.kernels._backend import HAS_TRITON, triton_interpreted, use_triton  # noqa: E402
from saetrain.kernels.topk import radix_topk, radix_topk_reference, select_topk  # noqa: E402
from saetrain.optim import DecoderNormAdam  # noqa: E402
from saetrain.sae import SAE, SAEConfig  # noqa: E402

TRITON_RUNS_HERE = HAS_TRITON and (torch.cuda.is_available() or triton_interpreted())
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}
# (d_in, num_latents): powers of two, and not.
SHAPES = {"32x64": (32, 64), "24x100": (24, 100)}


@pytest.fixture(params=["torch", "triton", "triton-latent-major"])
def device(request, monkeypatch):
    """Run the test on one backend; yields the device its tensors go on.

    "triton-latent-major": the Triton backend with the weight-gradient rows summed
    latent-major (sparse_ops.LATENT_MAJOR)."""
    triton = request.param != "torch"
    if triton and not TRITON_RUNS_HERE:
        pytest.skip("triton was imported before TRITON_INTERPRET=1: see the subprocess test")
    monkeypatch.setattr(sparse_ops, "LATENT_MAJOR", request.param == "triton-latent-major")
    previous = set_backend("triton" if triton else "torch")
    yield torch.device("cuda" if triton and torch.cuda.is_available() else "cpu")
    set_backend(previous)


def close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOL[dtype])


def make_encoder(d_in, num_latents, dtype, device, seed=0):
    """x, W_enc (unit-ish rows), b_enc as leaf tensors that require grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, d_in, generator=gen)
    W_enc = torch.randn(num_latents, d_in, generator=gen) / d_in**0.5
    b_enc = 0.1 * torch.randn(num_latents, generator=gen)
    return [t.to(device, dtype).requires_grad_() for t in (x, W_enc, b_enc)]


def grads_of(outputs, inputs, upstream):
    return torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)


def check_decode(acts, indices, W_dec, dtype):
    """decode vs decode_reference: output, and grads for acts and W_dec."""
    out, expected = decode(acts, indices, W_dec), decode_reference(acts, indices, W_dec)
    assert out.dtype == dtype
    close(out, expected, dtype)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    upstream = upstream.to(out.device, dtype)
    got, want = grads_of(out, [acts, W_dec], upstream), grads_of(expected, [acts, W_dec], upstream)
    for g, w in zip(got, want, strict=True):
        close(g, w, dtype)
    return out


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("k", ["1", "5", "num_latents"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_decode_matches_the_reference_in_output_and_gradients(device, dtype, shape, k):
    d_in, num_latents = shape
    k = num_latents if k == "num_latents" else int(k)
    gen = torch.Generator().manual_seed(1)
    # Drawn with replacement: latents repeat across tokens and sometimes within one.
    indices = torch.randint(0, num_latents, (6, k), generator=gen).to(device)
    acts = torch.rand(6, k, generator=gen).to(device, dtype).requires_grad_()
    W_dec = torch.randn(num_latents, d_in, generator=gen).to(device, dtype).requires_grad_()
    assert check_decode(acts, indices, W_dec, dtype).shape == (6, d_in)


def test_decode_adds_up_a_latent_repeated_within_a_token(device):
    W_dec = torch.randn(10, 12, device=device, requires_grad=True)
    indices = torch.tensor([[3, 3, 3], [3, 1, 3]], device=device)
    acts = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 0.5]], device=device, requires_grad=True)
    out = decode(acts, indices, W_dec)
    close(out[0], 6.0 * W_dec[3].detach(), torch.float32)
    (grad_W,) = torch.autograd.grad(out.sum(), [W_dec])
    close(grad_W[3], torch.full((12,), 7.0, device=device), torch.float32)
    close(grad_W[1], torch.full((12,), 1.0, device=device), torch.float32)
    assert grad_W[[0, 2, 4]].abs().sum() == 0


def test_decode_accepts_int32_indices(device):
    gen = torch.Generator().manual_seed(8)
    indices = torch.randint(0, 40, (5, 3), generator=gen, dtype=torch.int32).to(device)
    acts = torch.rand(5, 3, generator=gen).to(device).requires_grad_()
    W_dec = torch.randn(40, 12, generator=gen).to(device).requires_grad_()
    check_decode(acts, indices, W_dec, torch.float32)


def test_decode_of_an_empty_batch_is_empty_with_zero_gradients(device):
    W_dec = torch.randn(16, 8, device=device, requires_grad=True)
    acts = torch.zeros(0, 4, device=device, requires_grad=True)
    out = decode(acts, torch.zeros(0, 4, dtype=torch.int64, device=device), W_dec)
    assert out.shape == (0, 8)
    (grad_W,) = torch.autograd.grad(out.sum(), [W_dec])
    assert grad_W.shape == (16, 8) and grad_W.abs().sum() == 0


def test_decode_dense_path_over_few_distinct_latents_matches_the_reference(monkeypatch):
    # The CPU torch path goes dense over the used rows when few distinct latents appear
    # (AuxK): force it at this small size and compare.
    monkeypatch.setattr(sparse_ops, "DENSE_MIN_ENTRIES", 0)
    previous = set_backend("torch")
    try:
        W_dec = torch.randn(50, 12, requires_grad=True)
        indices = torch.randint(0, 4, (9, 6))  # 4 distinct latents, k=6: dense pays
        acts = torch.rand(9, 6, requires_grad=True)
        assert sparse_ops.compact_rows(indices, 50) is not None
        check_decode(acts, indices, W_dec, torch.float32)
    finally:
        set_backend(previous)


@pytest.mark.parametrize("used", ["both", "main", "aux"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_decode_pair_equals_two_decodes_with_one_gradient_for_W_dec(device, dtype, used):
    # The main and AuxK decodes share W_dec; the aux latents overlap the main ones here, so
    # some rows get gradient from both. Either output may go unused (no gradient from it).
    gen = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 40, (6, 5), generator=gen).to(device)
    aux_indices = torch.randint(0, 12, (6, 9), generator=gen).to(device)
    leaves = [torch.rand(6, 5, generator=gen), torch.rand(6, 9, generator=gen)]
    leaves.append(torch.randn(40, 24, generator=gen))
    acts, aux_acts, W_dec = (t.to(device, dtype).requires_grad_() for t in leaves)
    x_hat, e_hat = decode_pair(acts, indices, aux_acts, aux_indices, W_dec)
    want_x = decode_reference(acts, indices, W_dec)
    want_e = decode_reference(aux_acts, aux_indices, W_dec)
    close(x_hat, want_x, dtype)
    close(e_hat, want_e, dtype)
    up = [torch.randn(6, 24, generator=gen).to(device, dtype) for _ in range(2)]
    got = [x_hat, e_hat]
    want = [want_x, want_e]
    if used != "both":
        keep = 0 if used == "main" else 1
        got, want, up = [got[keep]], [want[keep]], [up[keep]]
    inputs = [acts, aux_acts, W_dec]
    for g, w in zip(grads_of(got, inputs, up), grads_of(want, inputs, up), strict=True):
        if w is None:
            assert g is None or g.abs().sum() == 0
        else:
            close(g, w, dtype)


# ---------------------------------------------------------------- encode


def by_index(acts, indices, aux_acts, aux_indices):
    """The outputs with each row reordered by latent index.

    Main rows come largest first, but latents whose values tie after rounding (bf16
    matmuls on CPUs with AMX) may come in either order.
    """
    order, aux_order = indices.argsort(dim=1), aux_indices.argsort(dim=1)
    return (
        acts.gather(1, order),
        indices.gather(1, order),
        aux_acts.gather(1, aux_order),
        aux_indices.gather(1, aux_order),
    )


def check_encode(x, W_enc, b_enc, k, dead_mask, k_aux, dtype):
    """encode_topk vs encode_topk_reference: all outputs, and grads through both act sets."""
    out = encode_topk(x, W_enc, b_enc, k, dead_mask, k_aux)
    expected = encode_topk_reference(x, W_enc, b_enc, k, dead_mask, k_aux)
    assert out.latent_acts.dtype == dtype and out.latent_indices.dtype == torch.int64
    assert (out.latent_acts[:, :-1] >= out.latent_acts[:, 1:]).all()  # largest first
    # Aux rows have no set order: compare them sorted by latent index.
    for got, want in zip(by_index(*out), by_index(*expected), strict=True):
        assert got.shape == want.shape
        close(got, want, dtype)
    # Upstream gradients per (token, latent), so they do not depend on the aux row order.
    per_latent = torch.randn(x.shape[0], W_enc.shape[0], generator=torch.Generator().manual_seed(2))
    per_latent = per_latent.to(x.device, dtype)

    def upstream(o):
        return [per_latent.gather(1, o.latent_indices), per_latent.gather(1, o.aux_indices)]

    inputs = [x, W_enc, b_enc]
    got = grads_of([out.latent_acts, out.aux_acts], inputs, upstream(out))
    want = grads_of([expected.latent_acts, expected.aux_acts], inputs, upstream(expected))
    for g, w in zip(got, want, strict=True):
        close(g, w, dtype)
    return out


@pytest.mark.parametrize("k", ["1", "5", "num_latents"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_encode_topk_matches_the_reference_with_auxk(device, dtype, shape, k):
    d_in, num_latents = shape
    k = num_latents if k == "num_latents" else int(k)
    x, W_enc, b_enc = make_encoder(d_in, num_latents, dtype, device)
    dead_mask = torch.rand(num_latents, generator=torch.Generator().manual_seed(3)) < 0.3
    out = check_encode(x, W_enc, b_enc, k, dead_mask.to(device), 6, dtype)
    assert out.aux_indices.shape == (7, 6)
    assert dead_mask[out.aux_indices.cpu()].all()


def test_encode_topk_without_dead_latents_returns_empty_aux(device):
    x, W_enc, b_enc = make_encoder(24, 100, torch.float32, device)
    for dead_mask in (None, torch.zeros(100, dtype=torch.bool, device=device)):
        out = check_encode(x, W_enc, b_enc, 5, dead_mask, 8, torch.float32)
        assert out.aux_acts.shape == (7, 0) and out.aux_indices.shape == (7, 0)


def test_encode_topk_with_every_latent_dead_takes_aux_among_all(device):
    x, W_enc, b_enc = make_encoder(24, 100, torch.float32, device)
    dead_mask = torch.ones(100, dtype=torch.bool, device=device)
    out = check_encode(x, W_enc, b_enc, 5, dead_mask, 8, torch.float32)
    # Among all latents, the top 8 holds the top 5.
    assert torch.isin(out.latent_indices, out.aux_indices).all()


def test_encode_topk_caps_k_aux_at_the_number_of_dead_latents(device):
    x, W_enc, b_enc = make_encoder(24, 100, torch.float32, device)
    dead_mask = torch.zeros(100, dtype=torch.bool, device=device)
    dead_mask[[3, 50, 97]] = True
    out = check_encode(x, W_enc, b_enc, 5, dead_mask, 8, torch.float32)
    assert sorted(out.aux_indices[0].tolist()) == [3, 50, 97]


def test_encode_topk_of_an_empty_batch_is_empty(device):
    _, W_enc, b_enc = make_encoder(24, 100, torch.float32, device)
    x = torch.zeros(0, 24, device=device, requires_grad=True)
    out = encode_topk(x, W_enc, b_enc, 5, torch.ones(100, dtype=torch.bool, device=device), 4)
    assert [tuple(t.shape) for t in out] == [(0, 5), (0, 5), (0, 4), (0, 4)]
    grad_W = torch.autograd.grad(out.latent_acts.sum(), [W_enc], allow_unused=True)[0]
    assert grad_W is None or grad_W.abs().sum() == 0


@pytest.mark.parametrize("k, k_aux", [(150, 140), (4, 140)], ids=["k-beyond", "k_aux-beyond"])
def test_encode_topk_beyond_the_fused_kernel_limit_matches_the_reference(device, k, k_aux):
    # k (or k_aux) padded past MAX_FUSED_K leaves the fused Triton kernel for matmul + topk.
    x, W_enc, b_enc = make_encoder(16, 300, torch.float32, device)
    dead_mask = torch.rand(300, generator=torch.Generator().manual_seed(4)) < 0.6
    check_encode(x, W_enc, b_enc, k, dead_mask.to(device), k_aux, torch.float32)


def use_radix_select(monkeypatch, device):
    """Send the encoder down CUDA's unfused path (matmul, then selection), with the
    selections by the radix-select kernel: on CUDA, or under the interpreter on CPU."""
    if get_backend() != "triton" or sparse_ops.LATENT_MAJOR:
        pytest.skip("the radix select is a Triton kernel, and the backward's order is moot")
    monkeypatch.setattr(encode_module, "FUSE_UNDER_INTERPRETER", False)
    monkeypatch.setattr(encode_module, "FUSE_ON_CUDA", False)
    monkeypatch.setattr(topk_module, "RADIX_DEVICES", frozenset({device.type}))


@pytest.mark.parametrize("k", ["1", "5", "num_latents"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_encode_topk_by_radix_select_matches_the_reference(device, dtype, k, monkeypatch):
    use_radix_select(monkeypatch, device)
    k = 100 if k == "num_latents" else int(k)
    x, W_enc, b_enc = make_encoder(24, 100, dtype, device)
    dead_mask = torch.rand(100, generator=torch.Generator().manual_seed(3)) < 0.3
    with mock.patch.object(encode_module, "radix_topk", wraps=radix_topk) as radix:
        out = check_encode(x, W_enc, b_enc, k, dead_mask.to(device), 6, dtype)
    assert radix.call_count == 1  # both selections from one kernel
    assert dead_mask[out.aux_indices.cpu()].all()


class Shapes(TorchDispatchMode):
    """Records the shape of every strided tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.seen.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("x_grad", [False, True], ids=["x-fixed", "x-grad"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_encode_topk_subtracts_b_dec_and_gets_its_gradient_from_one_product(device, dtype, x_grad):
    # b_dec's gradient is -(per-latent gradient sums) @ W_enc; where x needs no gradient (an
    # SAE's inputs) the backward builds no (B, d_in) tensor at all.
    x, W_enc, b_enc = make_encoder(24, 100, dtype, device)
    x = x.detach().requires_grad_(x_grad)
    gen = torch.Generator().manual_seed(4)
    b_dec = (0.3 * torch.randn(24, generator=gen)).to(device, dtype).requires_grad_()
    dead_mask = (torch.arange(100) % 4 == 0).to(device)
    out = encode_topk(x, W_enc, b_enc, 5, dead_mask, 6, b_dec=b_dec)
    # The reference gets x - b_dec as the matmul reads it: taken in fp32, rounded once to the
    # matmul's dtype (bf16 on the Triton path; fp32 on the torch path on most CPUs).
    mm = encode_module._matmul_dtype(dtype, device, use_triton(device))
    x_in = (x.float() - b_dec.float()).to(mm)
    want = encode_topk_reference(x_in, W_enc, b_enc, 5, dead_mask, 6)
    for got_t, want_t in zip(by_index(*out), by_index(*want), strict=True):
        close(got_t.to(want_t.dtype), want_t, dtype)
    per_latent = torch.randn(7, 100, generator=gen).to(device, dtype)

    def loss(o):
        main = o.latent_acts.float() * per_latent.gather(1, o.latent_indices)
        return main.sum() + (o.aux_acts.float() * per_latent.gather(1, o.aux_indices)).sum()

    inputs = [W_enc, b_enc, b_dec] + ([x] if x_grad else [])
    with Shapes() as shapes:
        got = torch.autograd.grad(loss(out), inputs)
    for g, w in zip(got, torch.autograd.grad(loss(want), inputs), strict=True):
        close(g, w, dtype)
    # On the torch path with a half matmul (CPUs with AMX: CPU_FAST_HALF_MATMUL) the weight
    # gradient sums in fp32 from an fp32 copy of the bf16 x: a (B, d_in) cast, not a gradient.
    half_cpu = mm != torch.float32 and not use_triton(device)
    if (not triton_interpreted() or get_backend() == "torch") and not half_cpu:
        assert ((7, 24) in shapes.seen) == x_grad  # (the interpreter copies its args)


def test_encode_topk_backward_never_builds_a_batch_by_num_latents_tensor():
    previous = set_backend("torch")
    try:
        x, W_enc, b_enc = make_encoder(10, 40, torch.float32, "cpu")  # B=7
        dead_mask = torch.arange(40) < 20
        for encode, dense in ((encode_topk_reference, True), (encode_topk, False)):
            out = encode(x, W_enc, b_enc, 3, dead_mask, 4)
            loss = out.latent_acts.sum() + out.aux_acts.sum()
            with Shapes() as shapes:
                loss.backward()
            assert ((7, 40) in shapes.seen) == dense, encode.__name__
    finally:
        set_backend(previous)


def test_encode_dense_aux_path_over_few_dead_latents_matches_the_reference(monkeypatch):
    monkeypatch.setattr(sparse_ops, "DENSE_MIN_ENTRIES", 0)
    previous = set_backend("torch")
    try:
        x, W_enc, b_enc = make_encoder(24, 100, torch.float32, "cpu")
        dead_mask = torch.zeros(100, dtype=torch.bool)
        dead_mask[:6] = True  # 6 dead, k_aux=5: the aux part takes the dense path
        check_encode(x, W_enc, b_enc, 2, dead_mask, 5, torch.float32)
    finally:
        set_backend(previous)


@pytest.mark.parametrize("packed", [True, False], ids=["mkl-packed", "addmm"])
def test_cpu_encoder_chunks_rows_and_matches_the_reference(packed, monkeypatch):
    # The torch path multiplies and selects chunk by chunk: with MKL's packed weight (W_enc
    # packed once, a new output per chunk) or addmm into one buffer. 45 rows in chunks of 16:
    # three chunks, the last one short; aux among 12 dead latents (fewer than half: their
    # columns only) and among 60 (the masked whole row).
    if packed and not encode_module.MKL_PACKED:
        pytest.skip("torch built without MKL")
    monkeypatch.setattr(encode_module, "MKL_PACKED", packed)
    monkeypatch.setattr(encode_module, "PACKED_CHUNK_ROWS", 16)
    monkeypatch.setattr(encode_module, "PACKED_MIN_ROWS", 40)
    monkeypatch.setattr(encode_module, "CPU_CHUNK_ROWS", 16)
    previous = set_backend("torch")
    try:
        x, W_enc, b_enc = make_encoder(24, 100, torch.float32, "cpu")
        x = torch.randn(45, 24, generator=torch.Generator().manual_seed(4)).requires_grad_()
        for dead in (12, 60):
            dead_mask = torch.arange(100) < dead
            check_encode(x, W_enc, b_enc, 5, dead_mask, 8, torch.float32)
        if packed:  # packed from PACKED_MIN_ROWS rows on; fewer keep addmm
            with mock.patch.object(encode_module, "_pack", wraps=encode_module._pack) as spy:
                encode_topk(x[:39], W_enc, b_enc, 5)
                assert spy.call_count == 0
                encode_topk(x[:40], W_enc, b_enc, 5)
                assert spy.call_count == 1 and spy.call_args.args[1] == 16
    finally:
        set_backend(previous)


RADIX_DTYPES = DTYPES | {"fp16": torch.float16}


RADIX_METHODS = {"resident": True, "histogram": False}


def check_radix(pre_acts, k, dead_mask=None, k_aux=0, resident=True, tile=16):
    """radix_topk against torch.topk: the same values (main rows in order), entries that hold
    them, no column twice, and aux entries among the dead; returns radix_topk's outputs."""
    got = radix_topk(pre_acts, k, dead_mask, k_aux, resident=resident, tile=tile)
    want = radix_topk_reference(pre_acts, k, dead_mask, k_aux)
    values, indices, aux_values, aux_indices = got
    assert torch.equal(values, want[0])
    assert torch.equal(aux_values.sort(1).values, want[2].sort(1).values)
    for v, i in ((values, indices), (aux_values, aux_indices)):
        assert i.dtype == torch.int64 and torch.equal(pre_acts.gather(1, i), v)
        assert (i.sort(1).values.diff(dim=1) > 0).all()  # each column at most once
    if k_aux:
        assert dead_mask[aux_indices].all()
    return got


@pytest.mark.skipif(not TRITON_RUNS_HERE, reason="needs CUDA or Triton's interpreter")
@pytest.mark.parametrize(
    "dtype, n, tile",
    [*((dtype, 100, 16) for dtype in RADIX_DTYPES.values()), (torch.bfloat16, 64, None)],
    ids=[*(f"{name}-100-tiles-16" for name in RADIX_DTYPES), "bf16-64-default-tiles"],
)
@pytest.mark.parametrize("method", RADIX_METHODS.values(), ids=RADIX_METHODS.keys())
def test_triton_radix_topk_matches_torch_topk_with_auxk(method, dtype, n, tile):
    # Rows in registers (bisected) or in memory (histograms); width not a power of two in
    # 7 tiles, or a power of two in the default tiles (the histogram's autotuned);
    # k = 1 and k = n; aux among 40% dead columns, k_aux up to all of them, or among all.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(resident=method, tile=tile)
    gen = torch.Generator().manual_seed(n)
    pre_acts = torch.randn(6, n, generator=gen).to(device, dtype)
    dead_mask = (torch.rand(n, generator=gen) < 0.4).to(device)
    dead = int(dead_mask.sum())
    for k, k_aux in ((1, 1), (7, dead), (n, 5)):
        check_radix(pre_acts, k, dead_mask, k_aux, **kw)
    every = torch.ones(n, dtype=torch.bool, device=device)  # all dead: aux among all
    _, indices, _, aux_indices = check_radix(pre_acts, 5, every, n - 1, **kw)
    assert torch.isin(indices, aux_indices).all()
    values, indices, aux_values, _ = check_radix(pre_acts, 3, **kw)  # no aux
    assert aux_values.shape == (6, 0)
    unsorted = radix_topk(pre_acts, 3, sorted=False, **kw)
    above, tie = unsorted[1][:, :2], unsorted[1][:, 2]  # above the 3rd value, then the 3rd
    assert torch.equal(above, above.sort(1).values) and torch.equal(tie, indices[:, 2])
    assert torch.equal(unsorted[1].sort(1).values, indices.sort(1).values)


@pytest.mark.skipif(not TRITON_RUNS_HERE, reason="needs CUDA or Triton's interpreter")
@pytest.mark.parametrize("dtype", RADIX_DTYPES.values(), ids=RADIX_DTYPES.keys())
@pytest.mark.parametrize("method", RADIX_METHODS.values(), ids=RADIX_METHODS.keys())
def test_triton_radix_topk_gives_ties_to_the_lowest_columns(method, dtype):
    # Rows of few distinct values (the k-th largest ties with many), -0.0 among +0.0, a row
    # of -inf, a row all equal: the entries above the k-th value, then its lowest columns.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    pre_acts = torch.randint(-3, 3, (5, 70), generator=gen).to(dtype)
    pre_acts[0] = float("-inf")
    pre_acts[1, ::3] = -0.0
    pre_acts[2] = 1.5
    pre_acts = pre_acts.to(device)
    dead_mask = (torch.rand(70, generator=gen) < 0.5).to(device)
    for k in (1, 9, 40, 70):
        got = check_radix(pre_acts, k, dead_mask, 11, resident=method)
        values, indices, aux_values, aux_indices = got
        selections = ((values, indices, slice(None)), (aux_values, aux_indices, dead_mask))
        for row in range(5):
            for v, i, cols in selections:
                last = v[row].min()
                candidates = torch.arange(70, device=device)[cols]
                above = candidates[pre_acts[row, candidates] > last]
                equal = candidates[pre_acts[row, candidates] == last]
                want = torch.cat([above, equal[: i.shape[1] - len(above)]])
                assert torch.equal(i[row].sort().values, want.sort().values), (k, row)


@pytest.mark.skipif(not TRITON_RUNS_HERE, reason="needs CUDA or Triton's interpreter")
def test_triton_radix_topk_rejects_bad_input_in_one_line():
    pre_acts = torch.randn(3, 20)
    for call, words in (
        (lambda: radix_topk(pre_acts, 0), "k=0 must be in [1, 20]"),
        (lambda: radix_topk(pre_acts, 21), "k=21"),
        (lambda: radix_topk(pre_acts[0], 2), "2-D"),
        (lambda: radix_topk(pre_acts.double(), 2), "torch.float64"),
        (lambda: radix_topk(pre_acts, 2, torch.ones(19, dtype=torch.bool), 2), "(20,) bool"),
        (lambda: radix_topk(pre_acts, 2, torch.ones(20), 2), "torch.float32"),
        (lambda: radix_topk(torch.randn(1, 40000), 2, resident=True), "at most 32768"),
    ):
        with pytest.raises(ValueError, match=None) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value)
    empty = radix_topk(pre_acts[:0], 2, torch.ones(20, dtype=torch.bool), 3)
    assert [tuple(t.shape) for t in empty] == [(0, 2), (0, 2), (0, 3), (0, 3)]


def test_grouped_cpu_topk_picks_the_same_entries_as_torch_topk():
    pre_acts = torch.randn(33, 2048, generator=torch.Generator().manual_seed(5))
    # Groups of 16 below k = 16, else of 8: twice for k = 1 and 2 (2048 -> 128 -> 8 maxima),
    # once for k = 8 (-> 128) and for k = 16 up to 2048 / (4 * 8) = 64 (-> 256); not at 65.
    for k in (1, 2, 8, 16, 32, 64, 65):
        values, indices = select_topk(pre_acts, k)
        expected = pre_acts.topk(k, dim=1)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


# ---------------------------------------------------------------- decoder norm


@pytest.mark.parametrize("sweeps", ["one-sweep", "two-sweeps"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_decoder_norm_step_projects_the_gradient_and_renormalises_rows(
    device, dtype, shape, sweeps, monkeypatch
):
    # Triton: rows read once and kept in registers (up to ONE_SWEEP_MAX_D wide), or in two
    # sweeps over 256-wide tiles (forced here by a limit below these widths).
    if sweeps == "two-sweeps":
        monkeypatch.setattr(decoder_norm_module, "ONE_SWEEP_MAX_D", 8)
    d_in, num_latents = shape
    gen = torch.Generator().manual_seed(6)
    W_dec = (3 * torch.randn(num_latents, d_in, generator=gen)).to(device, dtype)
    grad = torch.randn(num_latents, d_in, generator=gen).to(device, dtype)
    projected = project_decoder_grad_reference(W_dec, grad)
    normalised = normalize_decoder_reference(W_dec)

    g = grad.clone()
    assert project_decoder_grad_(W_dec, g) is g
    close(g, projected, dtype)
    W = W_dec.clone()
    assert normalize_decoder_(W) is W
    close(W, normalised, dtype)
    W, g = W_dec.clone(), grad.clone()
    decoder_norm_step(W, g)
    close(W, normalised, dtype)
    close(g, projected, dtype)
    # What the references promise: unit rows, and gradients orthogonal to them.
    close(W.float().norm(dim=1), torch.ones(num_latents, device=device), dtype)
    assert (g.float() * W.float()).sum(1).abs().max() < (1e-4 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("sweeps", ["one-sweep", "two-sweeps"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_decoder_adam_step_is_projection_then_adam_then_renormalisation(
    device, dtype, shape, sweeps, monkeypatch
):
    # Three steps of the one-pass update against its reference, and (fp32) against the three
    # ops it fuses: the projection, torch's Adam with weight decay, the renormalisation.
    if sweeps == "two-sweeps":  # Triton: the 4-tensor kernel holds rows up to half as wide
        monkeypatch.setattr(decoder_norm_module, "ONE_SWEEP_MAX_D", 8)
    d_in, num_latents = shape
    gen = torch.Generator().manual_seed(9)
    W0 = F.normalize(torch.randn(num_latents, d_in, generator=gen), dim=1)
    grads = [torch.randn(num_latents, d_in, generator=gen) for _ in range(3)]
    hyper = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)

    W = W0.to(device, dtype, copy=True)
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    step = torch.zeros((), device=device)
    for i, g in enumerate(grads, start=1):  # each step from the same state as the reference
        g = g.to(device, dtype)
        before = g.clone()
        expected = decoder_adam_step_reference(W, g, m, v, i, **hyper)
        assert decoder_adam_step_(W, g, m, v, step, **hyper) is W
        assert torch.equal(g, before)  # the gradient is read, not projected in place
        for got, want in zip((W, m, v), expected, strict=True):
            close(got, want, dtype)
    assert step.item() == 3
    close(W.float().norm(dim=1), torch.ones(num_latents, device=device), dtype)

    if dtype == torch.float32:
        p = torch.nn.Parameter(W0.clone())
        adam = torch.optim.Adam([p], **hyper)
        for g in grads:
            p.grad = g.clone()
            project_decoder_grad_(p.detach(), p.grad)
            adam.step()
            normalize_decoder_(p.detach())
        close(W.cpu(), p.detach(), dtype)
        close(m.cpu(), adam.state[p]["exp_avg"], dtype)
        close(v.cpu(), adam.state[p]["exp_avg_sq"], dtype)


def test_decoder_norm_functions_update_a_parameter_in_place():
    W_dec = torch.nn.Parameter(torch.randn(8, 4))
    W_dec.grad = torch.randn(8, 4)
    project_decoder_grad_(W_dec, W_dec.grad)
    normalize_decoder_(W_dec)
    close(W_dec.detach().norm(dim=1), torch.ones(8), torch.float32)


# ---------------------------------------------------------------- host checks and dispatch


def test_host_wrappers_reject_bad_inputs_with_a_clear_message():
    W = torch.randn(10, 4)
    idx = torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="same \\(B, k\\) shape"):
        decode(torch.rand(3, 5), idx, W)
    with pytest.raises(ValueError, match="cast one to the other"):
        decode(torch.rand(3, 2, dtype=torch.float64), idx, W)
    with pytest.raises(ValueError, match="int32/int64"):
        decode(torch.rand(3, 2), idx.float(), W)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts floats, not ints
        assert decode(torch.rand(3, 2, dtype=torch.float64), idx, W).dtype == torch.bfloat16
        with pytest.raises(ValueError, match="latent values must be a float tensor"):
            decode(torch.ones(3, 2, dtype=torch.int64), idx, W)
    with pytest.raises(ValueError, match="contiguous"):
        decode(torch.rand(2, 3).T, idx, W)
    x, b = torch.randn(3, 4), torch.zeros(10)
    with pytest.raises(ValueError, match="k must be in \\[1, num_latents=10\\], got 11"):
        encode_topk(x, W, b, 11)
    with pytest.raises(ValueError, match="dead_mask must be a \\(10,\\) bool"):
        encode_topk(x, W, b, 2, torch.ones(10), 2)
    with pytest.raises(ValueError, match="x must be \\(B, d_in\\)"):
        encode_topk(torch.randn(3, 5), W, b, 2)
    with pytest.raises(ValueError, match="grad"):
        project_decoder_grad_(W, torch.randn(10, 5))
    m, step = torch.zeros(10, 4), torch.zeros(())
    with pytest.raises(ValueError, match="exp_avg_sq \\(10, 5\\).*shaped like W_dec"):
        decoder_adam_step_(W, W, m, torch.zeros(10, 5), step, lr=1e-3)
    with pytest.raises(ValueError, match="step must be Adam's one-element float step count"):
        decoder_adam_step_(W, W, m, m.clone(), torch.zeros((), dtype=torch.int64), lr=1e-3)
    assert step.item() == 0  # nothing was stepped


def test_backend_is_chosen_by_name_and_rejects_unknown_names():
    previous = get_backend()
    try:
        assert set_backend("auto") == previous
        assert not use_triton(torch.device("cpu"))  # auto: CPU tensors take the torch path
        set_backend("torch")
        assert get_backend() == "torch"
        with pytest.raises(ValueError, match="choose one of auto, triton, torch"):
            set_backend("cuda")
    finally:
        set_backend(previous)


def test_an_unknown_backend_in_the_environment_fails_at_import():
    env = {**os.environ, "SAETRAIN_KERNELS": "fast"}
    result = subprocess.run(
        [sys.executable, "-c", "import saetrain.kernels"], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "SAETRAIN_KERNELS environment variable is 'fast'" in result.stderr


def test_kernel_options_in_the_environment_flip_the_untimed_defaults():
    # Each option flips its switch at import; an unknown name fails there, in one line.
    script = (
        "import saetrain.kernels.topk as t, saetrain.kernels.sparse_ops as s, "
        "saetrain.kernels.encode as e, saetrain.optim as o, saetrain.kernels.loss as l; "
        "print(sorted(t.RADIX_DEVICES), sorted(t.GROUPED_DEVICES), s.LATENT_MAJOR, "
        "e.FUSE_ON_CUDA, o.FUSE_WHERE_TRITON, l.FUSE_LOSSES)"
    )

    def run(options):
        env = {**os.environ, "SAETRAIN_KERNEL_OPTIONS": options}
        command = [sys.executable, "-c", script]
        return subprocess.run(command, env=env, capture_output=True, text=True)

    assert run("").stdout.split("\n")[0] == "[] ['cpu'] False False True True"
    every = "radix, Latent-Major,fused-encoder,grouped-topk,unfused-optimizer,unfused-losses"
    assert run(every).stdout.split("\n")[0] == "['cuda'] ['cpu', 'cuda'] True True False False"
    bad = run("radix,fast-path")
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert "SAETRAIN_KERNEL_OPTIONS environment variable names 'fast-path'; choose" in last


def scatter_sum(values, indices, vectors, num_rows):
    """fp64 sum of values[b, j] * vectors[b] into row indices[b, j]: (num_rows, d)."""
    rows = values.double().unsqueeze(-1) * vectors.double().unsqueeze(1)  # (B, k, d)
    out = torch.zeros(num_rows, vectors.shape[1], dtype=torch.float64, device=vectors.device)
    return out.index_add_(0, indices.reshape(-1), rows.reshape(-1, vectors.shape[1]))


@pytest.mark.parametrize("tile", [0, 1], ids=["first-tile", "second-tile"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_triton_latent_major_sums_match_float64_scatters_and_dots(dtype, tile, monkeypatch):
    # segment_outer alone, with each of the first two autotune tiles (interpreter: 16 and 32
    # rows a block): rows (written whole, or added to an fp32 tensor), the bias sums (added
    # to what is there) and the dots <vectors[b], table[indices[b, j]]>, against fp64.
    # Shapes cover a row block past num_rows (37 rows), a d tile past d (17), k = 1, a
    # latent repeated within a token, one picked by every token (more entries than an entry
    # chunk, in one block), and rows nobody picks (zeros).
    if not TRITON_RUNS_HERE:
        pytest.skip("needs Triton (CUDA or the interpreter)")
    tuner = sparse_ops._segment_outer_tuned
    monkeypatch.setattr(tuner, "configs", [tuner.configs[tile]])
    monkeypatch.setattr(tuner, "cache", {})
    previous = set_backend("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    try:
        for B, k, N, d in ((7, 5, 100, 24), (9, 1, 64, 32), (40, 3, 37, 17)):
            indices = torch.randint(0, N // 2, (B, k), generator=gen)  # the top half: unpicked
            indices[:, 0] = 5
            indices[0, 1:] = 3
            coefs, vectors = torch.randn(B, k, generator=gen), torch.randn(B, d, generator=gen)
            table = torch.randn(N, d, generator=gen)
            indices, coefs, vectors, table = (t.to(dev) for t in (indices, coefs, vectors, table))
            coefs, vectors, table = coefs.to(dtype), vectors.to(dtype), table.to(dtype)
            bias = torch.randn(N, generator=gen).to(dev)
            want_rows = scatter_sum(coefs, indices, vectors, N)
            want_bias = bias.double().index_add(0, indices.reshape(-1), coefs.double().reshape(-1))
            want_dots = (vectors.double().unsqueeze(1) * table.double()[indices]).sum(-1)

            rows, dots = sparse_ops.segment_outer(coefs, indices, vectors, N, None, bias,
                                                  torch.float32, table)  # fmt: skip
            torch.testing.assert_close(rows.double(), want_rows, rtol=1e-5, atol=1e-5)
            assert not rows[N // 2 :].any()
            torch.testing.assert_close(bias.double(), want_bias, rtol=1e-5, atol=1e-5)
            assert dots.dtype == dtype
            close(dots.double(), want_dots, dtype)
            start = torch.randn(N, d, generator=gen).to(dev)
            rows, none = sparse_ops.segment_outer(coefs, indices, vectors, N, start.clone())
            torch.testing.assert_close(
                rows.double(), start.double() + want_rows, rtol=1e-5, atol=1e-5
            )
            assert none is None
            # Through scatter_outer: into a tensor of another dtype (summed in fp32, added
            # once), and with fp32 coefficients for half vectors (multiplied in fp32).
            start = torch.randn(N, d, generator=gen).to(dev, dtype)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(sparse_ops, "LATENT_MAJOR", True)
                rows = sparse_ops.scatter_outer(coefs, indices, vectors, N, start.clone())
                wide = sparse_ops.scatter_outer(coefs.float(), indices, vectors, N)
            close(rows, (start.double() + want_rows).to(dtype), dtype)
            torch.testing.assert_close(wide.double(), want_rows, rtol=1e-5, atol=1e-5)
    finally:
        set_backend(previous)


@pytest.mark.parametrize("half_table", [False, True], ids=["master-table", "half-table"])
def test_under_autocast_fp32_weights_get_fp32_gradients_never_rounded_to_bf16(
    device, half_table, monkeypatch
):
    # Under bf16 autocast with fp32 parameters, as Lightning's bf16-mixed trains: values come
    # out in bf16, but W_enc and W_dec enter the kernels in fp32 and their gradients are fp32
    # sums of the bf16 products, not rounded to bf16 and cast back (which also cost two
    # copies of each weight a step). half-table: the gathers read a bf16 copy of the table,
    # as on CUDA.
    if half_table:
        monkeypatch.setattr(sparse_ops, "HALF_TABLE_DEVICES", frozenset({device.type}))
    x, W_enc, b_enc = make_encoder(24, 100, torch.float32, device)
    gen = torch.Generator().manual_seed(5)
    W_dec = torch.randn(100, 24, generator=gen).to(device).requires_grad_()
    dead_mask = (torch.arange(100) % 3 == 0).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = encode_topk(x, W_enc, b_enc, 5, dead_mask, 6)
        x_hat, e_hat = decode_pair(*out, W_dec)
    assert out.latent_acts.dtype == out.aux_acts.dtype == x_hat.dtype == torch.bfloat16
    for acts in (out.latent_acts, out.aux_acts):
        acts.retain_grad()
    up = [torch.randn(7, 24, generator=gen).to(device) for _ in range(2)]
    ((x_hat.float() * up[0]).sum() + (e_hat.float() * up[1]).sum()).backward()
    for p in (x, W_enc, b_enc, W_dec):
        assert p.grad.dtype == torch.float32

    # W_dec: the bf16 values times the upstream gradients as they reach the kernel (bf16).
    main, aux = (out.latent_acts, out.latent_indices), (out.aux_acts, out.aux_indices)
    want = scatter_sum(*main, up[0].bfloat16(), 100) + scatter_sum(*aux, up[1].bfloat16(), 100)
    torch.testing.assert_close(W_dec.grad.double(), want, rtol=1e-6, atol=1e-6)
    # W_enc: the values' gradients through the relu, times x as the matmul read it.
    mm = encode_module._matmul_dtype(torch.bfloat16, device, use_triton(device))
    x_mm = x.detach().to(mm)
    want = sum(
        scatter_sum((a.grad * (a > 0)).to(mm), i, x_mm, 100) for a, i in (main, aux)
    )  # (100, 24)
    torch.testing.assert_close(W_enc.grad.double(), want, rtol=1e-6, atol=1e-6)
    # Neither was rounded to bf16 on the way: most entries need fp32's mantissa.
    for grad in (W_dec.grad, W_enc.grad):
        used = grad != 0
        assert (grad.bfloat16().float() != grad)[used].float().mean() > 0.9
    assert x.grad.abs().sum() > 0 and b_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("dead", [10, 50], ids=["few-dead", "many-dead"])
def test_a_training_step_on_the_triton_path_waits_for_the_device_once(device, dead, monkeypatch):
    # Each host sync drains CUDA's launch queue, so the step's ~100 small kernels then wait
    # on Python. The one sync left: the dead latents' ids, which fix the AuxK shapes. The
    # dense-or-sparse plans (few dead: dense over them; many: sparse) come from those ids,
    # not from counting the rows each index tensor uses in every pass.
    if get_backend() == "torch":
        pytest.skip("the torch path serves CPUs, where its CSR scatter counts rows on the host")
    monkeypatch.setattr(sparse_ops, "DENSE_MIN_ENTRIES", 0)
    monkeypatch.setattr(sparse_ops, "DENSE_UNDER_INTERPRETER", True)
    monkeypatch.setattr(sparse_ops, "DENSE_MAX_ROWS_PER_K", 4)  # dense over <= 32 aux rows
    if sparse_ops.LATENT_MAJOR:  # the encoder CUDA runs by default (matmul + top-k); the
        monkeypatch.setattr(encode_module, "MAX_FUSED_K", 0)  # "triton" case runs the fused one
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, num_latents=64, k=4, k_aux=8)).to(device)
    x = torch.randn(32, 16, device=device)
    sae.init_from_data(x)
    dead_mask = torch.arange(64, device=device) < dead

    # The optimizer SAEModule uses: on this backend the decoder's step is one Triton pass.
    opt = DecoderNormAdam(sae.parameters(), decoders=[sae.W_dec], lr=1e-3, fused=True)

    def step():
        out = sae(x, dead_mask)
        (out.fvu + out.auxk_loss).backward()
        opt.step()
        opt.zero_grad()

    step()  # on CUDA the first call autotunes the kernels' tiles (its timer reads back)
    with HostSyncs() as syncs:
        step()
    assert syncs.ops == ["nonzero.default"]
    enc = encode_topk(x, sae.W_enc, sae.b_enc, 4, dead_mask, 8)
    assert sparse_ops.compact_rows(enc.latent_indices, 64) is None  # 64 rows > 4 * k
    dense_aux = sparse_ops.compact_rows(enc.aux_indices, 64) is not None
    assert dense_aux == (dead <= 4 * 8)
    # Latent-major: each sparse selection is sorted once a step, the decoder's backward and
    # the encoder's sharing the sort.
    sorts = syncs.all.count("sort")
    assert sorts == ((1 if dense_aux else 2) if sparse_ops.LATENT_MAJOR else 0)


# ---------------------------------------------------------------- a whole training step

REFERENCE_KERNELS = SimpleNamespace(
    EncodeOutput=encode_module.EncodeOutput,
    encode_topk=encode_topk_reference,
    decode=decode_reference,
    decode_pair=lambda a, i, aux_a, aux_i, W: (
        decode_reference(a, i, W),
        decode_reference(aux_a, aux_i, W),
    ),
    project_decoder_grad_=lambda W, g: g.copy_(project_decoder_grad_reference(W, g)),
    normalize_decoder_=lambda W: W.copy_(normalize_decoder_reference(W)),
    sae_losses=sae_losses_reference,
)


def train_steps(sae, batches, dead_mask, optimizer="DecoderNormAdam"):
    """Adam steps as SAEModule takes them: FVU + AuxK, projection, step, renormalisation;
    with SAEModule's optimizer (on the Triton backends the decoder's step is one pass), or
    with torch's Adam between the SAE's own decoder-norm calls."""
    if optimizer == "DecoderNormAdam":
        opt = DecoderNormAdam(sae.parameters(), decoders=[sae.W_dec], lr=3e-3)
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for x in batches:
        out = sae(x, dead_mask)
        (out.fvu + sae.cfg.auxk_coef * out.auxk_loss).backward()
        if optimizer != "DecoderNormAdam":
            sae.remove_parallel_grad()
        opt.step()
        opt.zero_grad()
        if optimizer != "DecoderNormAdam":
            sae.normalize_decoder()
    return sae


@pytest.mark.parametrize("plans", ["sparse", "dense", "radix"])
def test_a_training_step_with_the_kernels_equals_one_with_the_references(
    device, plans, monkeypatch
):
    # Dense autograd through the *_reference functions vs the backend's kernels, with AuxK
    # on (a third of the latents dead), over three Adam steps. dense: the encoder's plans
    # send both selections through the dense-over-rows path (main: all 100 rows; aux: the
    # dead ones), in the decoder's forward and backward and in the encoder's backward.
    # radix: sparse plans, the selections by the radix-select kernel (Triton only).
    if plans == "radix":
        use_radix_select(monkeypatch, device)
    if plans == "dense":
        monkeypatch.setattr(sparse_ops, "DENSE_MIN_ENTRIES", 0)
        monkeypatch.setattr(sparse_ops, "DENSE_MAX_ROWS_PER_K", 25)  # 100 rows <= 25 * k
        monkeypatch.setattr(sparse_ops, "DENSE_UNDER_INTERPRETER", True)
    torch.manual_seed(0)
    batches = [torch.randn(12, 24) + 0.5 for _ in range(3)]
    sae = SAE(SAEConfig(d_in=24, num_latents=100, k=4, k_aux=6))
    sae.init_from_data(batches[0])
    dead_mask = torch.rand(100, generator=torch.Generator().manual_seed(5)) < 0.3
    ours = train_steps(
        copy.deepcopy(sae).to(device), [x.to(device) for x in batches], dead_mask.to(device)
    )
    monkeypatch.setattr(sae_module, "kernels", REFERENCE_KERNELS)
    reference = train_steps(copy.deepcopy(sae), batches, dead_mask, optimizer="Adam")
    for name, value in reference.state_dict().items():
        close(ours.state_dict()[name].cpu(), value, torch.float32)
    assert not torch.equal(reference.W_enc, sae.W_enc)  # the steps did move the weights


@pytest.mark.skipif(
    not _TRITON_IMPORTED_EARLY or torch.cuda.is_available(), reason="they run in this process"
)
def test_triton_cases_pass_in_a_fresh_interpreter_process():
    # Selected by name: a test that needs Triton has "triton" in its name or its ids.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "triton", "-p", "no:cacheprovider"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]


def test_every_test_that_needs_triton_says_so_in_its_name():
    # Where lightning imported triton before TRITON_INTERPRET=1 (CI), the triton cases skip
    # here and rerun in a fresh process chosen by `-k triton`: a test gated on
    # TRITON_RUNS_HERE without "triton" in its name would run nowhere. (Tests on the
    # `device` fixture carry it in their ids; the GPU-only ones skip on CPU anyway.)
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    gated = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
        and "TRITON_RUNS_HERE" in ast.unparse(node)
        and "cuda" not in ast.unparse(node.decorator_list)
    ]  # fmt: skip
    assert gated, "the check found no gated test: has TRITON_RUNS_HERE been renamed?"
    assert [name for name in gated if "triton" not in name] == []


# ---------------------------------------------------------------- the losses


def loss_inputs(B, D, dtype, device, aux, seed=0):
    """xs (fp32, no grad), decoded and err_hat (dtype, leaves), b_dec (fp32 leaf), scale."""
    gen = torch.Generator().manual_seed(seed)
    xs = 2 * torch.randn(B, D, generator=gen) + 1
    decoded = xs + 0.5 * torch.randn(B, D, generator=gen)
    err_hat = 0.3 * torch.randn(B, D, generator=gen)
    b_dec = 0.1 * torch.randn(D, generator=gen)
    leaves = [decoded.to(dtype), b_dec, err_hat.to(dtype) if aux else None]
    leaves = [t if t is None else t.to(device).requires_grad_() for t in leaves]
    return xs.to(device), leaves, torch.tensor(0.25, device=device)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("aux", [True, False], ids=["auxk", "no-aux"])
@pytest.mark.parametrize("uses", ["all", "fvu"])
@pytest.mark.parametrize("B, D", [(7, 24), (33, 40)], ids=["7x24", "33x40"])  # odd tiles
def test_sae_losses_match_the_reference_in_values_and_gradients(device, dtype, aux, uses, B, D):
    xs, leaves, scale = loss_inputs(B, D, dtype, device, aux)
    copies = [t if t is None else t.detach().clone().requires_grad_() for t in leaves]
    ours = sae_losses(xs, leaves[0], leaves[1], scale, leaves[2])
    ref = sae_losses_reference(xs, copies[0], copies[1], scale, copies[2])
    for got, want in zip(ours, ref, strict=True):
        assert got.dtype == want.dtype
        close(got, want, torch.float32)
    weights = torch.randn(B, D, generator=torch.Generator().manual_seed(1)).to(device)

    def loss(x_hat, fvu, auxk):  # through all three outputs, or FVU alone (no AuxK grads)
        return fvu + 0.5 * auxk + (x_hat * weights).sum() if uses == "all" else fvu

    loss(*ours).backward()
    loss(*ref).backward()
    for got, want in zip(leaves, copies, strict=True):
        if want is None:
            continue
        if want.grad is None:
            assert got.grad is None or not got.grad.any()
            continue
        assert got.grad.dtype == want.grad.dtype
        close(got.grad, want.grad, want.dtype)


def test_sae_losses_of_inputs_that_need_a_gradient_or_of_no_tokens_are_the_reference(device):
    xs, (decoded, b_dec, err_hat), scale = loss_inputs(5, 8, torch.float32, device, aux=True)
    xs.requires_grad_()  # a gradient for the inputs: the torch ops give it
    x_hat, fvu, auxk = sae_losses(xs, decoded, b_dec, scale, err_hat)
    (fvu + auxk + x_hat.sum()).backward()
    reference = xs.detach().clone().requires_grad_()
    x_hat, fvu, auxk = sae_losses_reference(reference, decoded, b_dec, scale, err_hat)
    (fvu + auxk + x_hat.sum()).backward()
    close(xs.grad, reference.grad, torch.float32)
    empty = torch.zeros(0, 8, device=device)
    x_hat, fvu, auxk = sae_losses(empty, empty, b_dec, scale, empty)
    assert x_hat.shape == (0, 8) and float(fvu.detach()) == 0 and float(auxk.detach()) == 0


def test_sae_losses_reject_bad_input_in_one_line():
    xs, (decoded, b_dec, _), scale = loss_inputs(4, 6, torch.float32, "cpu", aux=False)
    for args, says in (
        ((xs[0], decoded, b_dec, scale), "xs must be a (B, d_in) float tensor, got (6,)"),
        ((xs, decoded[:, :5], b_dec, scale), "decoded must be a float tensor shaped like xs"),
        ((xs, decoded, b_dec[:5], scale), "b_dec must be (6,), like a row of xs; got (5,)"),
        ((xs, decoded, b_dec, scale, xs[:3]), "err_hat must be a float tensor shaped like xs"),
    ):
        with pytest.raises(ValueError) as info:
            sae_losses(*args)
        assert "\n" not in str(info.value) and says in str(info.value)


# ---------------------------------------------------------------- tune-kernels

# A step's cost under a clock that charges each switch that is on (see `cost_clock`).
SWITCH_COSTS = {
    "fused-encoder": 0.5, "radix": -0.2, "grouped-topk": 0.0, "latent-major": -0.1,
    "fused-optimizer": 0.01, "fused-losses": -0.05,
}  # fmt: skip


def cost_clock(costs: dict, timed: list):
    """A `tuning.Clock` that reports `costs` for each config it is asked to time (and records
    them in `timed`) without running them: each flip's check has run its steps already, and
    the command's test times real ones."""

    def clock(configs, run, rounds):
        timed.extend(dict(choices) for choices in configs.values())
        return {n: 1 + sum(costs[s] for s, on in c.items() if on) for n, c in configs.items()}

    return clock


TUNE_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the interpreter


def tune_tiny(monkeypatch, costs, ran, now=time.monotonic, **cfg):
    """`tuning.tune` on a tiny bf16 SAE, from CUDA's default choices."""
    from saetrain import optim, tuning

    monkeypatch.setattr(encode_module, "FUSE_ON_CUDA", False)
    monkeypatch.setattr(encode_module, "FUSE_UNDER_INTERPRETER", False)  # CUDA's path
    monkeypatch.setattr(topk_module, "RADIX_DEVICES", frozenset())
    monkeypatch.setattr(topk_module, "GROUPED_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(sparse_ops, "LATENT_MAJOR", False)
    monkeypatch.setattr(optim, "FUSE_WHERE_TRITON", True)
    monkeypatch.setattr(loss_module, "FUSE_LOSSES", True)
    cfg = tuning.TuneConfig(d_in=16, num_latents=128, k=4, batch=16, dead_fraction=0.2, **cfg)
    lines = []
    previous = set_backend("triton")
    try:
        before = tuning.current(TUNE_DEVICE)
        clock = cost_clock(costs, ran)
        entry = tuning.tune(cfg, TUNE_DEVICE, clock=clock, log=lines.append, now=now)
    finally:
        set_backend(previous)
    assert tuning.current(TUNE_DEVICE) == before  # tuning leaves the choices as they were
    return before, entry, "\n".join(lines)


@pytest.mark.skipif(not TRITON_RUNS_HERE, reason="see test_triton_cases_pass_in_a_fresh_...")
def test_triton_tune_keeps_each_flip_that_is_faster_by_the_margin(monkeypatch):
    from saetrain import tuning

    ran = []
    start, entry, log = tune_tiny(monkeypatch, SWITCH_COSTS, ran)
    assert entry["rejected"] == {}
    # radix and latent-major save time; the fused encoder costs; fused-optimizer off would
    # save 1.4%, under the 3% margin; grouped-topk is moot once the radix select is on.
    assert entry["choices"] == {**start, "radix": True, "latent-major": True}
    kept = {c["switch"]: c["kept"] for c in entry["comparisons"]}  # grouped-topk: moot
    assert kept == {"fused-encoder": "off", "radix": "on", "latent-major": "on",
                    "fused-optimizer": "on", "fused-losses": "on"}  # fmt: skip
    assert entry["speedup"] == pytest.approx(0.96 / 0.66)
    assert {**start, "radix": True, "latent-major": True} in ran  # the tuned config was timed
    assert entry["shape"] == {"d_in": 16, "num_latents": 128, "k": 4,
                              "k_aux": entry["shape"]["k_aux"], "batch": 16,
                              "dead_fraction": 0.2}  # fmt: skip
    assert 1 <= entry["shape"]["k_aux"] <= 8
    assert f"tuned: {tuning.describe(entry['choices'])}" in log


@pytest.mark.skipif(not TRITON_RUNS_HERE, reason="see test_triton_cases_pass_in_a_fresh_...")
def test_triton_tune_stops_flipping_when_its_budget_is_spent(monkeypatch):
    # A clock that reads 10 s more each time: the flips start at 10 and 20 s, inside a 25 s
    # budget (grouped-topk is moot once radix is on); at 30 s the budget is spent, so every
    # later switch keeps its starting choice.
    readings = iter(range(0, 10_000, 10))
    ran = []
    start, entry, log = tune_tiny(
        monkeypatch, SWITCH_COSTS, ran, now=lambda: next(readings), budget_s=25
    )
    assert [c["switch"] for c in entry["comparisons"]] == ["fused-encoder", "radix"]
    assert entry["not_timed"] == ["latent-major", "fused-optimizer", "fused-losses"]
    assert entry["choices"] == {**start, "radix": True}  # the flips timed in time still count
    assert "  latent-major: not timed, the budget of 25 s is spent" in log
    assert ran[-2:] == [start, entry["choices"]]  # the final timing ran regardless
    assert entry["rejected"] == {}


@pytest.mark.skipif(not TRITON_RUNS_HERE, reason="see test_triton_cases_pass_in_a_fresh_...")
def test_triton_tune_rejects_a_variant_whose_step_differs(monkeypatch):
    real = sparse_ops.segment_outer

    def wrong(*args, **kwargs):  # latent-major sums, 50% too large
        out, dots = real(*args, **kwargs)
        return out * 1.5, dots

    monkeypatch.setattr(sparse_ops, "segment_outer", wrong)
    ran = []
    start, entry, log = tune_tiny(monkeypatch, SWITCH_COSTS, ran)
    assert list(entry["rejected"]) == ["latent-major"]
    assert entry["rejected"]["latent-major"].startswith("its gradient of W_")
    assert not entry["choices"]["latent-major"] and entry["choices"]["radix"]
    assert "latent-major on: REJECTED, its gradient of W_" in log
    assert all(not c["latent-major"] for c in ran)  # never timed, never chosen


@pytest.mark.skipif(not TRITON_RUNS_HERE, reason="see test_triton_cases_pass_in_a_fresh_...")
def test_triton_tune_kernels_command_times_and_stores_the_choices(monkeypatch, tmp_path, capsys):
    import json

    from saetrain import tuning
    from saetrain.cli import main

    monkeypatch.setattr(encode_module, "FUSE_ON_CUDA", False)
    monkeypatch.setattr(encode_module, "FUSE_UNDER_INTERPRETER", False)
    out = tmp_path / "tuning.json"
    shape = "--d-in 16 --num-latents 128 --k 4 --batch 16 --rounds 1 --dead-fraction 0"
    args = ["tune-kernels", "--device", TUNE_DEVICE, *shape.split(), "--out", str(out)]
    previous = set_backend("triton")
    try:
        before = tuning.current(TUNE_DEVICE)
        assert main(args) == 0
        assert tuning.current(TUNE_DEVICE) == before
    finally:
        set_backend(previous)
    key = tuning.device_key(torch.device(TUNE_DEVICE))
    printed = capsys.readouterr().out
    assert f"tuning on {key}: d_in 16, 128 latents, k 4" in printed
    assert f"stored for {key} in {out}" in printed
    entry = json.loads(out.read_text())["devices"][key]
    assert set(entry["choices"]) == set(tuning.SWITCHES) and entry["rejected"] == {}
    assert entry["step_ms"]["tuned"] > 0 and entry["precision"] == "bf16"


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_triton_kernels_match_the_reference_at_training_width_on_gpu(dtype, monkeypatch):
    # The fused encoder selects on fp32 pre-activations, as the reference does, so even in
    # bf16 it picks the same latents (cuBLAS + topk selects on bf16-rounded ones: see the
    # next test).
    monkeypatch.setattr(encode_module, "FUSE_ON_CUDA", True)
    previous = set_backend("triton")
    try:
        x, W_enc, b_enc = make_encoder(576, 4096, dtype, "cuda")
        dead_mask = torch.rand(4096, device="cuda") < 0.05
        out = check_encode(x, W_enc, b_enc, 32, dead_mask, 64, dtype)
        W_dec = W_enc.detach().clone().requires_grad_()
        check_decode(out.latent_acts.detach().requires_grad_(), out.latent_indices, W_dec, dtype)
    finally:
        set_backend(previous)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("major", [False, True], ids=["token-major", "latent-major"])
@pytest.mark.parametrize("selection", ["fused", "matmul+topk", "matmul+radix"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_kernels_at_a_training_batch_on_gpu(dtype, selection, major, monkeypatch):
    # A real batch: 2048 tokens x 16384 latents, so the atomics of the scatter collide (or,
    # latent-major, blocks of rows hold hundreds of sorted entries) and the encoder splits
    # the latents across many programs. Near-ties may pick a different latent than the
    # reference, so selections are checked by value and the backward passes against dense
    # products built from the kernels' own selection. Sums over up to 2048 tokens in
    # another order: fp32 gets atol 1e-4.
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    monkeypatch.setitem(TOL, torch.float32, tol)
    monkeypatch.setattr(encode_module, "FUSE_ON_CUDA", selection == "fused")
    radix = frozenset({"cuda"}) if selection == "matmul+radix" else frozenset()
    monkeypatch.setattr(topk_module, "RADIX_DEVICES", radix)
    monkeypatch.setattr(sparse_ops, "LATENT_MAJOR", major)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    previous = set_backend("triton")
    try:
        B, D, N, k = 2048, 768, 16384, 32
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(B, D, generator=gen).cuda().to(dtype).requires_grad_()
        W = (torch.randn(N, D, generator=gen) / D**0.5).cuda().to(dtype).requires_grad_()
        b = (0.1 * torch.randn(N, generator=gen)).cuda().to(dtype).requires_grad_()
        dead_mask = (torch.rand(N, generator=gen) < 0.05).cuda()
        out = encode_topk(x, W, b, k, dead_mask, 64)
        pre = F.linear(x.float(), W.float(), b.float())  # (B, N)
        want = pre.topk(k, dim=1).values.relu()
        close(out.latent_acts.float(), want, dtype)
        close(pre.gather(1, out.latent_indices).relu(), out.latent_acts.float(), dtype)
        aux_want = pre.masked_fill(~dead_mask, float("-inf")).topk(64, dim=1).values.relu()
        close(out.aux_acts.float().sort(dim=1, descending=True).values, aux_want, dtype)
        assert dead_mask[out.aux_indices].all()
        # Encoder backward from the kernel's selection vs a dense product.
        # Encoder backward through both selections (the aux one goes dense over the few
        # dead latents) vs a dense product from the kernel's selection.
        g = torch.randn(B, k, generator=gen).cuda().to(dtype)
        g_aux = torch.randn(B, 64, generator=gen).cuda().to(dtype)
        outputs = [out.latent_acts, out.aux_acts]
        gx, gW, gb = torch.autograd.grad(outputs, [x, W, b], [g, g_aux])
        dense = torch.zeros(B, N, device="cuda").scatter_add_(
            1, out.latent_indices, g.float() * (out.latent_acts > 0)
        )
        dense.scatter_add_(1, out.aux_indices, g_aux.float() * (out.aux_acts > 0))
        close(gW.float(), dense.T @ x.float(), dtype)
        close(gb.float(), dense.sum(0), dtype)
        close(gx.float(), dense @ W.float(), dtype)
        # Decoder forward and backward at the same scale.
        acts = out.latent_acts.detach().requires_grad_()
        W_dec = W.detach().clone().requires_grad_()
        check_decode(acts, out.latent_indices, W_dec, dtype)
    finally:
        set_backend(previous)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", RADIX_DTYPES.values(), ids=RADIX_DTYPES.keys())
@pytest.mark.parametrize("method", RADIX_METHODS.values(), ids=RADIX_METHODS.keys())
def test_radix_topk_at_training_width_on_gpu(method, dtype):
    # The compiled kernels with their own tiles on 4096 x 24576 pre-activations: the same
    # values as torch.topk, exactly (both select; nothing is summed), with a wide AuxK among
    # 10% dead. Also 40,000 columns: past RESIDENT_MAX_N the histograms serve either way.
    gen = torch.Generator().manual_seed(0)
    for n in (24576, 40000):
        pre_acts = torch.randn(2048 if n > 32768 else 4096, n, generator=gen).cuda().to(dtype)
        dead_mask = (torch.rand(n, generator=gen) < 0.1).cuda()
        check_radix(pre_acts, 32, dead_mask, 512, resident=method and n <= 32768, tile=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d_in", [3072, 16384], ids=["one-sweep", "two-sweeps"])
def test_decoder_adam_step_at_training_width_on_gpu(d_in):
    # The compiled kernel's tiles at real widths: 3072 in one 4096-wide masked tile, 16384 in
    # three sweeps of 256-wide tiles; fp32 master weights and moments mid-training.
    previous = set_backend("triton")
    try:
        gen = torch.Generator().manual_seed(0)
        W = F.normalize(torch.randn(2048, d_in, generator=gen), dim=1).cuda()
        g = (1e-3 * torch.randn(2048, d_in, generator=gen)).cuda()
        m = (1e-3 * torch.randn(2048, d_in, generator=gen)).cuda()
        v = (1e-6 * torch.rand(2048, d_in, generator=gen)).cuda()
        step = torch.full((), 41.0, device="cuda")
        hyper = dict(lr=2e-4, betas=(0.9, 0.999), eps=6.25e-10)
        expected = decoder_adam_step_reference(W, g, m, v, 42, **hyper)
        decoder_adam_step_(W, g, m, v, step, **hyper)
        for got, want in zip((W, m, v), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert step.item() == 42
    finally:
        set_backend(previous)
