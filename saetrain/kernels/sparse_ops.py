"""Four gather/scatter primitives that the sparse decode and the encoder backward share.

With `indices` (B, k) naming k rows of a `table` (num_rows, d) for each of B tokens:

- `gather_combine(coefs, indices, table)`: out[b] = sum_j coefs[b, j] * table[indices[b, j]].
  The decoder forward (coefs = latent_acts, table = W_dec) and grad x of the encoder
  (coefs = grad of the pre-activations, table = W_enc).
- `gather_dot(vectors, indices, table)`: out[b, j] = <vectors[b], table[indices[b, j]]>.
  The gradient of the latent activations in the decoder backward.
- `scatter_outer(coefs, indices, vectors, num_rows)`: grad[indices[b, j]] += coefs[b, j] *
  vectors[b], and optionally the bias gradient grad_b[indices[b, j]] += coefs[b, j]. Grad W_dec
  and grad W_enc (+ grad b_enc) as a scatter-add of k rows per token.
- `segment_outer(coefs, indices, vectors, num_rows, table=table)`: `scatter_outer` computed
  latent-major on the Triton path (the entries sorted by row, each block of rows summed in
  registers and written once), and with `table` also `gather_dot(vectors, indices, table)`
  from the same pass: the decoder's whole backward reads each row of W_dec once. Used
  where `LATENT_MAJOR` is set.

All accumulate in fp32. The Triton kernels serve CUDA tensors; on CPU the torch path uses
the fastest ops measured at B=4096, d=576, num_latents=16384, k=32, fp32, on a 2-core
AVX-512 Xeon (benchmarks/bench_kernels.py --ops): embedding_bag (19 ms vs 270 ms for
gather + bmm), embedding_bag's per-sample-weight backward (35 ms vs 280 ms for gather +
bmm), and a CSR sparse @ dense matmul (32 ms vs 230 ms for index_add_ and 345 ms for a
dense scattered matmul). On CUDA, `scatter_outer` adds with fp32 atomics (relaxed: a sum
needs no ordering, so they compile to fire-and-forget `red.global` reductions, where
Triton's default acq_rel gave `atom` instructions that return a value, and four more
barriers a loop, on sm_90), and the tiles of
the kernels are autotuned on the first call for each (k, d). When the
indices name few distinct rows (AuxK), `compact_rows` switches both devices to dense
matmuls over just those rows.
"""

from __future__ import annotations

import time
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import HAS_TRITON, KERNEL_OPTIONS, triton_interpreted, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_combine_kernel(
        coef_ptr, idx_ptr, table_ptr, out_ptr, k, d, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        # One program per (token b, block of d): walk the token's k rows in BLOCK_K chunks.
        b = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask_d = offs_d < d
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            mask_k = offs_k < k
            rows = tl.load(idx_ptr + b * k + offs_k, mask=mask_k, other=0).to(tl.int64)
            coefs = tl.load(coef_ptr + b * k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            tile = tl.load(
                table_ptr + rows[:, None] * d + offs_d[None, :],
                mask=mask_k[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)  # (BLOCK_K, BLOCK_D)
            acc += tl.sum(tile * coefs[:, None], axis=0)
        tl.store(out_ptr + b * d + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _gather_dot_kernel(
        vec_ptr, idx_ptr, table_ptr, out_ptr, k, d, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        # One program per (token b, block of its k slots): dot products over d in chunks.
        b = tl.program_id(0).to(tl.int64)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        mask_k = offs_k < k
        rows = tl.load(idx_ptr + b * k + offs_k, mask=mask_k, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
            mask_d = offs_d < d
            vec = tl.load(vec_ptr + b * d + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            tile = tl.load(
                table_ptr + rows[:, None] * d + offs_d[None, :],
                mask=mask_k[:, None] & mask_d[None, :],
                other=0.0,
            ).to(tl.float32)  # (BLOCK_K, BLOCK_D)
            acc += tl.sum(tile * vec[None, :], axis=1)
        tl.store(out_ptr + b * k + offs_k, acc.to(out_ptr.dtype.element_ty), mask=mask_k)

    @triton.jit
    def _scatter_outer_kernel(
        coef_ptr,
        idx_ptr,
        vec_ptr,
        out_ptr,
        bias_out_ptr,
        k,
        d,
        HAS_BIAS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (token b, block of d): add coef * vector into each of its k rows.
        # fp32 atomics: rows repeat across tokens (and may repeat within one token).
        b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask_d = offs_d < d
        vec = tl.load(vec_ptr + b * d + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            mask_k = offs_k < k
            rows = tl.load(idx_ptr + b * k + offs_k, mask=mask_k, other=0).to(tl.int64)
            coefs = tl.load(coef_ptr + b * k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            tl.atomic_add(
                out_ptr + rows[:, None] * d + offs_d[None, :],
                coefs[:, None] * vec[None, :],
                mask=mask_k[:, None] & mask_d[None, :],
                sem="relaxed",
            )
            if HAS_BIAS:
                if pid_d == 0:
                    tl.atomic_add(bias_out_ptr + rows, coefs, mask=mask_k, sem="relaxed")

    @triton.jit
    def _segment_outer_kernel(
        coef_ptr, entry_ptr, row_ptr, starts_ptr, vec_ptr, out_ptr, table_ptr, dots_ptr,
        num_rows, k, d,
        ACCUMULATE: tl.constexpr, HAS_DOTS: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Latent-major: one program per (block of BLOCK_R rows, block of d). The B * k entries
        # are sorted by row, so the block's are starts[r0]:starts[r0 + BLOCK_R]. Each chunk of
        # BLOCK_E of them is a (BLOCK_R, BLOCK_E) coefficient matrix (entry e in the column of
        # its row) times the (BLOCK_E, BLOCK_D) vectors of their tokens: one tl.dot, summed in
        # fp32 registers. Every row of the block is written once, zeros included: no atomics
        # and no zero fill. With HAS_DOTS each entry also reads its own table row (the
        # block's rows: from memory once, then from cache) for its part of
        # <vectors[token], table[row]>, summed over the d blocks by fp32 atomics. Offsets
        # within the block are int32 from its base pointer and the output's are made after
        # the loop: 90-169 registers in bf16 on sm_90 (benchmarks/kernel_resources.py).
        pid_r, pid_d = tl.program_id(0), tl.program_id(1)
        r0 = pid_r * BLOCK_R
        local_r = tl.arange(0, BLOCK_R)  # (BLOCK_R,) rows of the block, from r0
        mask_r = r0 + local_r < num_rows
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask_d = offs_d < d
        start = tl.load(starts_ptr + r0)
        end = tl.load(starts_ptr + tl.minimum(r0 + BLOCK_R, num_rows))
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for e0 in range(start, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)  # (BLOCK_E,)
            mask_e = offs_e < end
            entry = tl.load(entry_ptr + offs_e, mask=mask_e, other=0).to(tl.int32)
            rows = tl.load(row_ptr + offs_e, mask=mask_e, other=-1).to(tl.int32)
            coefs = tl.load(coef_ptr + entry, mask=mask_e, other=0.0)  # (BLOCK_E,)
            hit = (rows - r0)[None, :] == local_r[:, None]  # (BLOCK_R, BLOCK_E)
            token_start = (entry // k).to(tl.int64) * d  # (BLOCK_E,)
            vecs = tl.load(
                vec_ptr + token_start[:, None] + offs_d[None, :],
                mask=mask_e[:, None] & mask_d[None, :],
                other=0.0,
            )  # (BLOCK_E, BLOCK_D)
            if UPCAST:  # the CPU interpreter's bf16 dot is wrong (triton 3.9); fp32 is exact
                coefs, vecs = coefs.to(tl.float32), vecs.to(tl.float32)
            spread = tl.where(hit, coefs[None, :], 0.0).to(vecs.dtype)  # exact: one coef each
            acc = tl.dot(spread, vecs, acc, input_precision=PRECISION)
            if HAS_DOTS:  # each entry's own row: the block's rows, cached after first use
                w = tl.load(
                    table_ptr + rows.to(tl.int64)[:, None] * d + offs_d[None, :],
                    mask=mask_e[:, None] & mask_d[None, :],
                    other=0.0,
                )  # (BLOCK_E, BLOCK_D)
                mine = tl.sum(vecs.to(tl.float32) * w.to(tl.float32), axis=1)  # (BLOCK_E,)
                tl.atomic_add(dots_ptr + entry, mine, mask=mask_e, sem="relaxed")
        out_block = out_ptr + r0.to(tl.int64) * d
        local = local_r[:, None] * d + offs_d[None, :]  # (BLOCK_R, BLOCK_D)
        mask = mask_r[:, None] & mask_d[None, :]
        if ACCUMULATE:
            acc += tl.load(out_block + local, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_block + local, acc.to(out_ptr.dtype.element_ty), mask=mask)


if HAS_TRITON:

    def _host_bench(fn, quantiles=None):
        """The autotuner's timer under Triton's CPU interpreter (its own needs a GPU)."""
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return [ms, ms, ms] if quantiles else ms

    # The tile over d and the warps are autotuned on the first call for each (k, d): the best
    # differs between GPUs and widths, and a gather or scatter moves too little per token
    # for one guess to serve all. The interpreter (CI) tries two small tiles, so the tuning
    # path, and the restoring of the atomics' output between trials, is tested too.
    _INTERPRETED = triton_interpreted()
    _D_TILES = [
        triton.Config({"BLOCK_D": block_d}, num_warps=warps)
        for block_d, warps in (
            ((16, 1), (32, 1))
            if _INTERPRETED
            else ((64, 2), (128, 4), (256, 4), (256, 8), (512, 4), (512, 8))
        )
    ]

    def _tuned(kernel, restore_value=None):
        """`kernel` autotuned over `_D_TILES`, keyed on (k, d)."""
        return triton.autotune(
            _D_TILES,
            key=["k", "d"],
            restore_value=restore_value,
            do_bench=_host_bench if _INTERPRETED else None,
        )(kernel)

    _gather_combine_tuned = _tuned(_gather_combine_kernel)
    _gather_dot_tuned = _tuned(_gather_dot_kernel)
    # Trials add into the output again and again: it is put back after each.
    _scatter_outer_tuned = _tuned(_scatter_outer_kernel, ["out_ptr", "bias_out_ptr"])
    # The latent-major kernel tunes its row block, d tile, entry chunk and warps. Smaller
    # row blocks waste less of each tl.dot and use fewer registers, so more warps are
    # resident to hide the gathers' latency (R=16: 24-40 warps per SM on sm_90 in bf16,
    # R=64: 8-20; benchmarks/kernel_resources.py); larger ones write wider tiles.
    _segment_outer_tuned = triton.autotune(
        [
            triton.Config({"BLOCK_R": r, "BLOCK_D": block_d, "BLOCK_E": e}, num_warps=warps)
            for r, block_d, e, warps in (
                ((16, 16, 16, 1), (32, 32, 16, 1))
                if _INTERPRETED
                else (
                    (16, 64, 32, 4),
                    (16, 128, 32, 4),
                    (16, 256, 32, 8),
                    (32, 64, 32, 4),
                    (32, 128, 32, 4),
                    (32, 128, 64, 8),
                    (64, 64, 32, 4),
                    (64, 128, 64, 8),
                )
            )
        ],
        key=["k", "d", "HAS_DOTS"],
        restore_value=["out_ptr", "dots_ptr"],
        do_bench=_host_bench if _INTERPRETED else None,
    )(_segment_outer_kernel)


def _pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi] (block sizes)."""
    return max(lo, min(hi, 1 << max(n - 1, 0).bit_length()))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype where torch.autocast is on for `device`'s type, else None."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


# Under autocast, where the gathers read a weight table in the autocast dtype (one cast per
# step) rather than in its own (fp32 master) dtype. On a GPU each row is read about B * k /
# num_latents times a step (5x at B=4096, k=32, 24,576 latents), so half-width rows pay for
# the cast; on CPU the gathers are compute-bound and reading the master skips the copy.
HALF_TABLE_DEVICES = frozenset({"cuda"})


def table_for(W: Tensor, dtype: torch.dtype) -> Tensor:
    """`W` as the gathers read it under autocast to `dtype` (see HALF_TABLE_DEVICES)."""
    return W.to(dtype) if W.device.type in HALF_TABLE_DEVICES else W


def check_rows(
    name: str, indices: Tensor, coefs: Tensor | None, table: Tensor, same_dtype: bool = True
) -> None:
    """Check a (B, k) index tensor, its (B, k) coefficients and the (num_rows, d) table.

    `same_dtype`: coefs must have the table's dtype (not under autocast, which casts both).
    """
    if indices.dim() != 2 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name}: latent_indices must be a (B, k) int32/int64 tensor, got "
            f"{tuple(indices.shape)} {indices.dtype}."
        )
    if table.dim() != 2 or not table.is_floating_point():
        raise ValueError(
            f"{name}: the weight table must be a (num_latents, d_in) float tensor, got "
            f"{tuple(table.shape)} {table.dtype}."
        )
    if coefs is not None and coefs.shape != indices.shape:
        raise ValueError(
            f"{name}: latent values {tuple(coefs.shape)} and latent_indices "
            f"{tuple(indices.shape)} must have the same (B, k) shape."
        )
    if coefs is not None and not coefs.is_floating_point():
        raise ValueError(f"{name}: latent values must be a float tensor, got {coefs.dtype}.")
    if coefs is not None and same_dtype and coefs.dtype != table.dtype:
        raise ValueError(
            f"{name}: latent values are {coefs.dtype} but the weights are {table.dtype}; "
            "cast one to the other (or run under torch.autocast)."
        )
    for what, t in (("latent_indices", indices), ("latent values", coefs), ("weights", table)):
        if t is not None and t.device != table.device:
            raise ValueError(f"{name}: {what} on {t.device}, weights on {table.device}.")
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: {what} must be contiguous; call .contiguous() first.")


class Compact(NamedTuple):
    """The few distinct rows a (B, k) index tensor uses, for the dense-over-them CPU path."""

    rows: Tensor
    """(U,) the distinct rows, ascending."""
    local: Tensor
    """(B, k) position of each index in `rows`."""


# A dense matmul runs ~30x more flops per second than these gathers and scatters on CPU,
# and far more on a GPU, so when the indices name few distinct rows (the AuxK latents:
# k_aux=288 among ~800 dead ones) a dense (B, U) product over just those rows is cheaper
# than k sparse rows per token. (On an H200 the sparse path spent ~25 ms of a 33 ms step
# on k_aux=233 aux latents per token at d_in=3072.)
DENSE_MAX_ROWS_PER_K = 16
DENSE_MIN_ENTRIES = 1 << 16  # below this the choice does not matter; keep the sparse path
# Under Triton's CPU interpreter the tests exercise the sparse kernels, so no plan is dense
# there unless a test asks for it.
DENSE_UNDER_INTERPRETER = False


def _may_go_dense(indices: Tensor) -> bool:
    """Whether a (B, k) index tensor is large enough for the choice to matter (and not under
    the interpreter, unless a test asks)."""
    B, k = indices.shape
    interpreted = indices.device.type == "cpu" and use_triton(indices.device)
    return B * k >= DENSE_MIN_ENTRIES and (DENSE_UNDER_INTERPRETER or not interpreted)


def _few_rows(indices: Tensor, rows: int) -> bool:
    """Whether `rows` rows are few enough for a dense product to beat k rows per token."""
    return rows <= DENSE_MAX_ROWS_PER_K * indices.shape[1]


def _compact_over(indices: Tensor, num_rows: int, rows: Tensor | None) -> Compact:
    """The `Compact` of `indices` over the sorted `rows` (None: all `num_rows`)."""
    if rows is None:
        return Compact(torch.arange(num_rows, device=indices.device), indices.long())
    position = torch.zeros(num_rows, dtype=torch.int64, device=indices.device)
    position[rows] = torch.arange(rows.numel(), device=indices.device)
    return Compact(rows, position[indices])


def plan_rows(indices: Tensor, num_rows: int, rows: Tensor | None = None) -> Compact | None:
    """Plan `indices` (B, k) from the rows it can name, without a host sync.

    `rows`: the sorted candidate rows (AuxK: the dead latents); None: all `num_rows`. The
    plan is kept on the tensor, where `compact_rows` finds it: `encode_topk` plans the index
    tensors it returns, so the decoder and the encoder's backward never count rows (a
    bincount and a nonzero, each a host sync on CUDA, per group, twice a step).
    """
    count = num_rows if rows is None else rows.numel()
    dense = _may_go_dense(indices) and _few_rows(indices, count)
    plan = _compact_over(indices, num_rows, rows) if dense else None
    indices.compact_plan = (indices._version, plan)
    return plan


def compact_rows(indices: Tensor, num_rows: int) -> Compact | None:
    """A `Compact` when going dense over the rows `indices` (B, k) uses pays, else None.

    The plan `plan_rows` left on the tensor if it has one (and the tensor is unchanged since);
    otherwise decided by counting the distinct rows (a host sync on CUDA).
    """
    planned = getattr(indices, "compact_plan", None)
    if planned is not None and planned[0] == indices._version:
        return planned[1]
    if not _may_go_dense(indices):
        return None
    if _few_rows(indices, num_rows):  # few rows in all
        return _compact_over(indices, num_rows, None)
    used = torch.bincount(indices.reshape(-1), minlength=num_rows) > 0  # (num_rows,)
    rows = used.nonzero().squeeze(1)  # (U,)
    return _compact_over(indices, num_rows, rows) if _few_rows(indices, rows.numel()) else None


# Whether the Triton path sums weight-gradient rows latent-major (`segment_outer`: the
# entries sorted by row, each block of rows summed in registers with tl.dot and written
# once, and the decoder's latent gradients taken in the same pass) rather than token-major
# (`scatter_outer`'s fp32 atomics, k rows per token, and a separate `gather_dot`). The
# arithmetic for bf16, d_in=3072, 24,576 latents, k=32, B=4096 on an H200: token-major,
# each pass reads or adds B * k rows of d (805 MB; the atomics at 0.88 ms a call measured
# by session 2, and 0.52 ms for a gather), while latent-major reads each table row once
# (151 MB), writes each gradient row once (302 MB), and reads the tokens' vectors (25 MB,
# L2-resident) once per entry. Off until a GPU run of `benchmarks/bench_kernels.py --parts`
# ("decoder: latent-major is N x token-major") says it pays: session 2's first sorted
# version, one program per (row, 128 columns) with no tl.dot, measured 2.3-3x slower.
LATENT_MAJOR = "latent-major" in KERNEL_OPTIONS  # off unless SAETRAIN_KERNEL_OPTIONS says


class Segments(NamedTuple):
    """A (B, k) index tensor's entries sorted by row: for the latent-major kernel, and as
    the CSR layout of the torch path's scatters."""

    rows: Tensor
    """(B * k,) the entries' rows, ascending."""
    entries: Tensor
    """(B * k,) int64: where each sorted entry sits in the flattened (B, k) tensor."""
    starts: Tensor
    """(num_rows + 1,) int64: the first sorted entry of each row, then B * k."""


def segments_of(indices: Tensor, num_rows: int) -> Segments:
    """`indices` (B, k) sorted by row, with where each row's entries start. No host sync.

    Kept on the tensor (like `plan_rows`' plan): the decoder's backward and the encoder's
    share one sort of the main latents a step.
    """
    kept = getattr(indices, "segments", None)
    if kept is not None and kept[0] == indices._version and kept[1] == num_rows:
        return kept[2]
    rows, entries = indices.reshape(-1).sort()  # (B * k,)
    bounds = torch.arange(num_rows + 1, device=indices.device, dtype=rows.dtype)
    segments = Segments(rows, entries, torch.searchsorted(rows, bounds))
    indices.segments = (indices._version, num_rows, segments)
    return segments


def _latent_major(indices: Tensor, compact: Compact | None) -> bool:
    """Whether a group of `indices` goes through `segment_outer` (see LATENT_MAJOR)."""
    B, k = indices.shape
    return LATENT_MAJOR and compact is None and B * k > 0 and use_triton(indices.device)


def segment_outer(
    coefs: Tensor,
    indices: Tensor,
    vectors: Tensor,
    num_rows: int,
    out: Tensor | None = None,
    out_bias: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    table: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`scatter_outer` latent-major (Triton), and with `table` also
    `gather_dot(vectors, indices, table)` from the same pass: (out, dots or None).

    coefs (B, k), vectors (B, d) and table (num_rows, d) share one dtype. `out`: an fp32
    (num_rows, d) tensor accumulated into, or None: a new one in `dtype`, every row written
    once (rounded once from fp32 sums). `out_bias`: an optional fp32 (num_rows,) tensor
    accumulated into (by torch's index_add_: one add per entry). dots are in coefs' dtype.
    """
    B, k = indices.shape
    d = vectors.shape[1]
    if coefs.dtype != vectors.dtype:  # the kernel multiplies in one dtype: fp32 keeps both
        coefs, vectors = coefs.float(), vectors.float()
        table = None if table is None else table.float()
    segments = segments_of(indices, num_rows)
    accumulate = out is not None
    if out is None:
        out = torch.empty(num_rows, d, dtype=dtype, device=vectors.device)
    elif out.dtype != torch.float32:
        raise ValueError(f"segment_outer accumulates into fp32 only, got {out.dtype}.")
    dots = torch.zeros(B, k, device=vectors.device) if table is not None else None
    interpreted = vectors.device.type == "cpu"
    fp32_on_gpu = vectors.dtype == torch.float32 and not interpreted and not torch.version.hip

    def grid(meta):
        return triton.cdiv(num_rows, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_D"])

    _segment_outer_tuned[grid](
        coefs, segments.entries, segments.rows, segments.starts, vectors, out,
        vectors if table is None else table, out if dots is None else dots, num_rows, k, d,
        ACCUMULATE=accumulate, HAS_DOTS=table is not None,
        UPCAST=interpreted, PRECISION="tf32x3" if fp32_on_gpu else "ieee",
    )  # fmt: skip
    if out_bias is not None:
        out_bias.index_add_(0, indices.reshape(-1), coefs.reshape(-1).float())
    return out, None if dots is None else dots.to(coefs.dtype)


def outer_and_dots(
    coefs: Tensor,
    indices: Tensor,
    vectors: Tensor,
    table: Tensor,
    out: Tensor | None,
    compact: Compact | None,
    dtype: torch.dtype,
    rows: bool,
    dots: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The decoder's backward for one group: (out + scatter_outer's rows if `rows`,
    gather_dot(vectors, indices, table) if `dots`), latent-major in one pass where
    LATENT_MAJOR holds for the group, else as the two ops."""
    num_rows = table.shape[0]
    if rows and _latent_major(indices, compact):
        return segment_outer(coefs, indices, vectors, num_rows, out, None, dtype,
                             table if dots else None)  # fmt: skip
    got = gather_dot(vectors, indices, table, compact) if dots else None
    if rows:
        out = scatter_outer(coefs, indices, vectors, num_rows, out, None, compact, dtype)
    return out, got


# torch's mm with an fp32 result for half inputs (CUDA): tensor cores instead of fp32 math.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b as fp32. Where b is a half CUDA tensor (the bf16 tables and gradients under
    autocast) the product runs in b's dtype with fp32 accumulation and output: the same sums
    as upcasting both, at tensor-core speed (fp32 matmuls run about 10x slower on an H100).
    Elsewhere, in fp32."""
    if a.is_cuda and b.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE:
        return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _dense_coefs(coefs: Tensor, compact: Compact) -> Tensor:
    """(B, U) fp32 matrix with coefs[b, j] summed at column local[b, j]."""
    dense = torch.zeros(coefs.shape[0], compact.rows.numel(), device=coefs.device)
    return dense.scatter_add_(1, compact.local, coefs.float())


def gather_combine(
    coefs: Tensor,
    indices: Tensor,
    table: Tensor,
    compact: Compact | None = None,
    fp32_out: bool = False,
) -> Tensor:
    """out[b] = sum_j coefs[b, j] * table[indices[b, j]], accumulated in fp32. (B, d).

    In table's dtype, or fp32 with `fp32_out` (to sum several calls before one rounding).
    """
    B, k = indices.shape
    d = table.shape[1]
    out_dtype = torch.float32 if fp32_out else table.dtype
    if B == 0 or k == 0:
        return table.new_zeros(B, d, dtype=out_dtype)
    if compact is not None:
        return _mm_fp32(_dense_coefs(coefs, compact), table[compact.rows]).to(out_dtype)
    if not use_triton(table.device):
        # Accumulates in fp32 for bf16/fp16 too (checked against an fp32 sum).
        if fp32_out:
            coefs, table = coefs.float(), table.float()
        return F.embedding_bag(indices, table, per_sample_weights=coefs, mode="sum")
    out = torch.empty(B, d, dtype=out_dtype, device=table.device)  # (B, d)
    grid = lambda meta: (B, triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    _gather_combine_tuned[grid](coefs, indices, table, out, k, d, BLOCK_K=_pow2(k, 16, 32))
    return out


def gather_dot(
    vectors: Tensor, indices: Tensor, table: Tensor, compact: Compact | None = None
) -> Tensor:
    """out[b, j] = <vectors[b], table[indices[b, j]]>, accumulated in fp32. (B, k)."""
    B, k = indices.shape
    d = table.shape[1]
    if B == 0 or k == 0:
        return vectors.new_zeros(B, k)
    if compact is not None:
        dots = _mm_fp32(vectors, table[compact.rows].T)  # (B, U)
        return dots.gather(1, compact.local).to(vectors.dtype)
    if not use_triton(table.device):
        # embedding_bag's gradient for per_sample_weights is exactly this dot product.
        offsets = torch.arange(0, B * k, k, device=indices.device)  # (B,)
        bag_of_entry = torch.arange(B * k, device=indices.device) // k  # (B * k,)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            vectors, table, indices.reshape(-1), offsets, bag_of_entry, 0, -1
        )
        return out.view(B, k)
    out = torch.empty(B, k, dtype=vectors.dtype, device=vectors.device)  # (B, k)
    BLOCK_K = _pow2(k, 16, 64)
    grid = (B, triton.cdiv(k, BLOCK_K))
    _gather_dot_tuned[grid](vectors, indices, table, out, k, d, BLOCK_K=BLOCK_K)
    return out


def scatter_outer(
    coefs: Tensor,
    indices: Tensor,
    vectors: Tensor,
    num_rows: int,
    out: Tensor | None = None,
    out_bias: Tensor | None = None,
    compact: Compact | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """out[indices[b, j]] += coefs[b, j] * vectors[b], and out_bias[indices[b, j]] += coefs[b, j].

    `out`: (num_rows, d), accumulated into; None starts from zeros in `dtype` (fp32 unless
    the caller wants the result rounded once to its own dtype). Sums run in fp32.
    `out_bias`: an optional fp32 (num_rows,) tensor. Returns `out`.
    """
    B, k = indices.shape
    d = vectors.shape[1]
    triton_path = compact is None and B * k > 0 and use_triton(vectors.device)
    if B == 0 or k == 0:
        return torch.zeros(num_rows, d, dtype=dtype, device=vectors.device) if out is None else out
    if compact is not None:
        dense = _dense_coefs(coefs, compact)  # (B, U)
        rows = _mm_fp32(dense.T, vectors)  # (U, d)
        if out is None:
            out = torch.zeros(num_rows, d, dtype=dtype, device=vectors.device)
        out.index_add_(0, compact.rows, rows.to(out.dtype))
        if out_bias is not None:
            out_bias.index_add_(0, compact.rows, dense.sum(0))
        return out
    flat = indices.reshape(-1)  # (B * k,)
    if not triton_path:
        # CSR matrix (num_rows, B): row r holds the coefs of the tokens that picked r. The
        # sort is kept on `indices`, so the decoder's and the encoder's backward share it.
        order, starts = segments_of(indices, num_rows)[1:]
        values = coefs.reshape(-1)[order].float()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": we rely on mm only
            warnings.simplefilter("ignore", UserWarning)
            csr = torch.sparse_csr_tensor(starts, order // k, values, (num_rows, B))
            if out is None:  # beta=0 overwrites: skips the zero fill `csr @ v` does first
                out = torch.empty(num_rows, d, device=vectors.device)  # (num_rows, d)
                torch.addmm(out, csr, vectors.float(), beta=0, out=out)
                out = out.to(dtype)
            elif out.dtype == torch.float32:
                out.addmm_(csr, vectors.float())
            else:
                out += (csr @ vectors.float()).to(out.dtype)
        if out_bias is not None:
            out_bias.index_add_(0, flat, coefs.reshape(-1).float())
        return out
    if _latent_major(indices, compact):
        if out is None or out.dtype == torch.float32:
            return segment_outer(coefs, indices, vectors, num_rows, out, out_bias, dtype)[0]
        return out.add_(segment_outer(coefs, indices, vectors, num_rows, None, out_bias)[0])
    # fp32 atomics. (A sort-by-row segment sum without atomics measured 2.3-3x slower on an
    # H200: 4.6 ms against 2.0 ms for the decoder forward + backward at d_in=3072.)
    fp32_out = out if out is not None and out.dtype == torch.float32 else None
    if fp32_out is None:
        fp32_out = torch.zeros(num_rows, d, device=vectors.device)
    grid = lambda meta: (B, triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    _scatter_outer_tuned[grid](
        coefs, indices, vectors, fp32_out, fp32_out if out_bias is None else out_bias, k, d,
        HAS_BIAS=out_bias is not None, BLOCK_K=_pow2(k, 16, 32),
    )  # fmt: skip
    if out is None:
        return fp32_out.to(dtype)
    if out is not fp32_out:
        out += fp32_out.to(out.dtype)
    return out
