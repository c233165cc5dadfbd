"""Row-wise top-k selection: a grouped torch path for CPU, a Triton radix select for rows
already in memory, and Triton helpers for fusing the selection into the encoder's matmul.

CPU: `select_topk` first takes the max of each group of G columns (c, c + n/G, ...: a
vectorised pass), keeps the k groups with the largest maxima (they hold the k largest
entries: every top-k entry lies in a group whose max is at least the k-th largest value,
and at most k groups have such a max; selected the same way while it pays), then picks the
k largest of those G * k candidates. G is 8, or 16 for k < 16 (`group_size`): fewer
candidates where k is large, a shorter list of maxima where it is small. On this 2-core CPU,
per 512 x 16384 chunk with k=32: 5.1 ms against 12.9 ms for torch.topk (6.8 ms with G=16
for every k); at k=8, 2.9 ms (3.7 ms with G=8).

Triton: a (value, column) pair is packed into one int64 key whose integer order is the
float order (ties broken by the larger column), so `tl.topk` on keys carries the columns
along; `merge_topk` folds a tile of keys into a running top-KP, and `unpack_keys` (torch)
reads the kernel's keys back as values and columns.

Triton radix select (`radix_topk`), for rows of pre-activations already in memory (CUDA,
where cuBLAS's matmul beats the fused kernel): one program per row finds the k-th largest
value's bits (16 for bf16, 19 for fp16, 32 for fp32, as ordered integer keys), then writes
the entries above it and the first of those equal to it. Rows of up to 32,768 columns are
read once into registers and bisected, a bit per row reduction; wider rows are
histogrammed 8 bits a pass over the row in memory. The cost does not grow with k, and the
AuxK selection among dead latents comes from the same read. torch.topk's CUDA kernel
selects 2 bits a pass over the row in memory. Whether it pays is a GPU measurement:
`RADIX_DEVICES` is empty until `benchmarks/bench_kernels.py --parts` ("top-k: radix is
N x") says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import HAS_TRITON, KERNEL_OPTIONS, use_triton

# Where `select_topk` groups. Measured on CPU (above); on CUDA torch.topk stays until a GPU
# run of `benchmarks/bench_kernels.py --parts` (its "top-k" rows) says grouping pays there.
GROUPED_DEVICES = frozenset({"cpu", "cuda"} if "grouped-topk" in KERNEL_OPTIONS else {"cpu"})
# Where `select_topk` (and the CUDA encoder's selection) runs the radix-select kernel when the
# Triton kernels run there (see above). Empty: not yet timed on a GPU (the "radix" option).
RADIX_DEVICES = frozenset({"cuda"} if "radix" in KERNEL_OPTIONS else ())
# Bits that can differ between values of each input dtype as fp32 (bf16: the top 16; fp16:
# sign, exponent and 10 mantissa bits), and the 8-bit digit passes that cover them.
RADIX_BITS = {torch.float32: 32, torch.float16: 19, torch.bfloat16: 16}
RADIX_PASSES = {torch.float32: 4, torch.float16: 3, torch.bfloat16: 2}
# The widest rows (padded to a power of two) whose keys the radix select holds in registers:
# 32 per thread at 32 warps, 63 registers a thread on sm_90 without spills (benchmarks/
# kernel_resources.py). Each bit is then one pass over registers, against a pass over the
# row in memory, and a histogram of 8 bits costs a warp about 3 instructions an entry
# (Triton's ballot-per-bit lowering) where a bit of bisection costs about 0.15.
RESIDENT_MAX_N = 32768


def resident_warps(width: int) -> int:
    """Warps for the resident radix select on rows `width` wide: 16 up to 8192 (40
    registers a thread on sm_90, so 3 programs an SM), then 32 (1024 threads)."""
    return max(4, min(32, width // 512))


# The smallest key: -inf (bits 0xFF800000, order bits 0x807FFFFF as int32) with column 0.
NEG_KEY = ((0xFF800000 ^ 0x7FFFFFFF) - (1 << 32)) << 32


def group_size(k: int) -> int:
    """Columns per group when `select_topk` groups for the top k (measured: see above)."""
    return 16 if k < 16 else 8


def groupable(n: int, k: int) -> bool:
    """Whether `select_topk` can group n columns for the top k: the group size divides n, and
    the group_size(k) * k candidates are at most a quarter of them."""
    G = group_size(k)
    return n % G == 0 and 4 * G * k <= n


def select_topk(pre_acts: Tensor, k: int, sorted: bool = True) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of a (b, n) tensor: values, int64 indices.

    Largest first if `sorted`, else in no particular order.
    """
    b, n = pre_acts.shape
    if radix_applies(pre_acts) and b:
        values, indices, _, _ = radix_topk(pre_acts, k, sorted=sorted)
        return values, indices
    if pre_acts.device.type not in GROUPED_DEVICES or not groupable(n, k) or b == 0:
        return pre_acts.topk(k, dim=1, sorted=sorted)
    G = group_size(k)
    g = n // G
    group_max = pre_acts.view(b, G, g).amax(1)  # (b, g): max over columns c + g * r
    groups = select_topk(group_max, k, sorted=False)[1]  # (b, k), grouped again if it pays
    offsets = g * torch.arange(G, device=pre_acts.device)  # (G,)
    candidates = (groups.unsqueeze(-1) + offsets).view(b, k * G)  # (b, k * G)
    values, picked = pre_acts.gather(1, candidates).topk(k, dim=1, sorted=sorted)  # (b, k)
    return values, candidates.gather(1, picked)


def radix_applies(pre_acts: Tensor) -> bool:
    """Whether selections from `pre_acts` run the radix-select kernel (`RADIX_DEVICES`)."""
    device = pre_acts.device
    return device.type in RADIX_DEVICES and pre_acts.dtype in RADIX_PASSES and use_triton(device)


def radix_topk_reference(
    pre_acts: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What `radix_topk` returns, from torch.topk: the k largest of each row (largest first),
    and the k_aux largest among the columns `dead_mask` marks (in no particular order)."""
    values, indices = pre_acts.topk(k, dim=1)
    if dead_mask is None or not k_aux:
        return values, indices, values[:, :0], indices[:, :0]
    masked = pre_acts.masked_fill(~dead_mask, float("-inf"))
    aux_values, aux_indices = masked.topk(k_aux, dim=1)
    return values, indices, aux_values, aux_indices


def radix_topk(
    pre_acts: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    sorted: bool = True,
    resident: bool | None = None,
    tile: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The top k of each row of a (b, n) float tensor by the Triton radix select, and with
    `dead_mask` ((n,) bool) the top k_aux among the marked columns from the same loads.

    Returns values (in pre_acts' dtype) and int64 columns, main then aux. Unsorted rows
    hold the entries above the k-th value in column order, then those equal to it; ties at
    the k-th value go to the lowest columns. The main rows come largest first if `sorted`.
    k_aux must be at most the number of marked columns (not checked: counting them would
    wait on the device).

    Rows of up to RESIDENT_MAX_N columns are held in registers and bisected (`resident`;
    None: where they fit), wider ones histogrammed tile by tile. `tile`: columns per tile
    of the passes that walk the row (a power of two; by default autotuned, or 1024 for the
    resident kernel's one pass), for tests.
    """
    if not HAS_TRITON:
        raise RuntimeError("radix_topk needs triton; select_topk runs torch.topk without it.")
    if pre_acts.dim() != 2 or pre_acts.dtype not in RADIX_PASSES:
        raise ValueError(
            f"radix_topk takes a 2-D fp32, bf16 or fp16 tensor, got {tuple(pre_acts.shape)} "
            f"{pre_acts.dtype}."
        )
    b, n = pre_acts.shape
    if not 1 <= k <= n:
        raise ValueError(f"radix_topk: k={k} must be in [1, {n}] for rows of {n} columns.")
    has_aux = dead_mask is not None and k_aux > 0
    if has_aux and (
        dead_mask.shape != (n,) or dead_mask.dtype != torch.bool
        or dead_mask.device != pre_acts.device or k_aux > n
    ):  # fmt: skip
        raise ValueError(
            f"radix_topk: dead_mask must be a ({n},) bool tensor on {pre_acts.device} and "
            f"k_aux <= {n}; got {tuple(dead_mask.shape)} {dead_mask.dtype} on "
            f"{dead_mask.device}, k_aux={k_aux}."
        )
    if pre_acts.stride(1) != 1:
        pre_acts = pre_acts.contiguous()
    k_aux = k_aux if has_aux else 0
    values = pre_acts.new_empty(b, k)
    indices = torch.empty(b, k, dtype=torch.int64, device=pre_acts.device)
    aux_values = pre_acts.new_empty(b, k_aux)
    aux_indices = torch.empty(b, k_aux, dtype=torch.int64, device=pre_acts.device)
    if b:
        args = (pre_acts, pre_acts.stride(0), dead_mask if has_aux else pre_acts,
                values, indices, aux_values, aux_indices, n, k, k_aux)  # fmt: skip
        width = triton.next_power_of_2(n)
        if resident is None:
            resident = width <= RESIDENT_MAX_N
        elif resident and width > RESIDENT_MAX_N:
            raise ValueError(
                f"radix_topk: rows of {n} columns do not fit in registers (resident=True "
                f"takes at most {RESIDENT_MAX_N}); pass resident=None or False."
            )
        if resident:
            warps = 1 if tile else resident_warps(width)
            _resident_topk_kernel[(b,)](
                *args, BITS=RADIX_BITS[pre_acts.dtype], HAS_AUX=has_aux, BLOCK_N=width,
                TILE=tile or min(width, 1024), num_warps=warps,
            )  # fmt: skip
        else:
            flags = dict(PASSES=RADIX_PASSES[pre_acts.dtype], HAS_AUX=has_aux)
            if tile is None:
                _radix_topk_tuned[(b,)](*args, **flags)
            else:
                _radix_topk_kernel[(b,)](*args, **flags, BLOCK_N=tile, num_warps=1)
    if sorted and k > 1:
        values, order = values.sort(dim=1, descending=True)
        indices = indices.gather(1, order)
    return values, indices, aux_values, aux_indices


def unpack_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 values and int64 columns of int64 keys packed by the Triton `pack_keys`."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)  # negative floats: flip all but the sign
    return bits.view(torch.float32), keys & 0xFFFFFFFF


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .sparse_ops import _INTERPRETED, _host_bench

    @triton.jit
    def pack_keys(values, columns):
        """int64 keys ordered like the fp32 `values`, with `columns` in the low 32 bits."""
        bits = values.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip all but the sign
        return (ordered.to(tl.int64) << 32) | columns.to(tl.int64)

    @triton.jit
    def merge_topk(best, keys, KP: tl.constexpr, BLOCK_N: tl.constexpr):
        """Top-KP (sorted, largest first) of a running (R, KP) top and an (R, BLOCK_N) tile."""
        if BLOCK_N > KP:
            tile_best = tl.topk(keys, KP)  # (R, KP)
            both = tl.reshape(tl.join(best, tile_best), (best.shape[0], 2 * KP))
        else:
            both = tl.reshape(tl.join(best, keys), (best.shape[0], 2 * KP))
        return tl.topk(both, KP)

    @triton.jit
    def _ordered_u32(x):
        """uint32 keys whose unsigned order is the float order of x (upcast to fp32)."""
        bits = (x.to(tl.float32) + 0.0).to(tl.int32, bitcast=True)  # -0.0 as +0.0: a tie
        # Negative floats: flip every bit; the rest: set the sign bit.
        return (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)

    @triton.jit
    def _pick_digit(hist, rem):
        """The digit holding the rem-th largest entry, given the histogram of the digits of
        the entries still in the running (the rem-th counted from the top), and the rem
        left for the next digit: the count among the entries with that digit."""
        bins = tl.arange(0, 256)
        at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # entries with digit >= d
        digit = tl.max(tl.where(at_or_above >= rem, bins, 0), 0)
        return digit, rem - tl.sum(tl.where(bins > digit, hist, 0), 0)

    @triton.jit
    def _radix_topk_kernel(
        x_ptr, stride_x, dead_ptr, vals_ptr, idx_ptr, aux_vals_ptr, aux_idx_ptr, N, K, KA,
        PASSES: tl.constexpr, HAS_AUX: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One program per row: the K largest (and the KA largest dead) by radix select."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        prefix = tl.full([], 0, tl.uint32)  # the digits fixed so far
        aux_prefix = prefix
        rem = K  # entries still to take among those with the prefix
        aux_rem = KA
        for p in tl.static_range(PASSES):
            hist = tl.zeros((256,), tl.int32)
            aux_hist = tl.zeros((256,), tl.int32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                valid = cols < N
                key = _ordered_u32(tl.load(x_row + cols, mask=valid, other=0.0))
                digits = ((key >> 24 - 8 * p) & 255).to(tl.int32)
                match = valid  # the entries whose higher digits are the prefix
                if p > 0:
                    match = match & ((key >> 32 - 8 * p) == prefix)
                hist += tl.histogram(digits, 256, mask=match)
                if HAS_AUX:
                    dead = valid & (tl.load(dead_ptr + cols, mask=valid, other=0) != 0)
                    if p > 0:
                        dead = dead & ((key >> 32 - 8 * p) == aux_prefix)
                    aux_hist += tl.histogram(digits, 256, mask=dead)
            digit, rem = _pick_digit(hist, rem)
            prefix = (prefix << 8) | digit.to(tl.uint32)
            if HAS_AUX:
                digit, aux_rem = _pick_digit(aux_hist, aux_rem)
                aux_prefix = (aux_prefix << 8) | digit.to(tl.uint32)
        low: tl.constexpr = 32 - 8 * PASSES
        _write_selected(
            x_row, dead_ptr, N, row, prefix, K - rem, aux_prefix, KA - aux_rem,
            vals_ptr, idx_ptr, aux_vals_ptr, aux_idx_ptr, K, KA, low, HAS_AUX, BLOCK_N,
        )  # fmt: skip

    @triton.jit
    def _write_selected(
        x_row, dead_ptr, N, row, t, above_count, aux_t, aux_above_count,
        vals_ptr, idx_ptr, aux_vals_ptr, aux_idx_ptr, K, KA,
        SHIFT: tl.constexpr, HAS_AUX: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Writes a row's selections, given the K-th largest key t (keys: `_ordered_u32`
        shifted right by SHIFT) and how many keys lie above it: those take the first slots
        in column order, the first of those equal to t the rest. The same for aux."""
        taken = 0
        ties = 0
        aux_taken = 0
        aux_ties = 0
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            valid = cols < N
            x = tl.load(x_row + cols, mask=valid, other=0.0)
            key = _ordered_u32(x) >> SHIFT
            taken, ties = _write_tile(
                x, key, cols, valid, t, above_count, taken, ties,
                vals_ptr + row * K, idx_ptr + row * K, K,
            )  # fmt: skip
            if HAS_AUX:
                dead = valid & (tl.load(dead_ptr + cols, mask=valid, other=0) != 0)
                aux_taken, aux_ties = _write_tile(
                    x, key, cols, dead, aux_t, aux_above_count, aux_taken, aux_ties,
                    aux_vals_ptr + row * KA, aux_idx_ptr + row * KA, KA,
                )  # fmt: skip

    @triton.jit
    def _write_tile(x, key, cols, mask, t, above_count, taken, ties, vals_ptr, idx_ptr, K):
        """One tile of `_write_selected` for one selection (entries where `mask` holds);
        returns the running counts of entries above t and equal to it."""
        above = mask & (key > t)
        equal = mask & (key == t)
        # One scan for both ranks: < K entries lie above t, at most 65,535 tie per tile.
        ranks = tl.cumsum((above.to(tl.int32) << 16) | equal.to(tl.int32), 0)
        tie = ties + (ranks & 0xFFFF)  # 1 for the row's first equal entry
        slot = tl.where(above, taken + (ranks >> 16) - 1, above_count + tie - 1)
        keep = above | (equal & (tie <= K - above_count))
        tl.store(vals_ptr + slot, x, mask=keep)
        tl.store(idx_ptr + slot, cols.to(tl.int64), mask=keep)
        return taken + tl.sum(above.to(tl.int32), 0), ties + tl.sum(equal.to(tl.int32), 0)

    # Columns per tile and warps, autotuned on the first call for each width and dtype: the
    # tiles that leave the most warps resident on sm_90 (benchmarks/kernel_resources.py:
    # 32-36 of 64 for the first three, 16 for 4096 columns; 1024 at 4 warps or 2048 at 8
    # take 80-128 registers a thread and leave 16-24). Programs only write their outputs,
    # so trials need nothing put back. The interpreter tries two.
    RADIX_CONFIGS = [
        triton.Config({"BLOCK_N": block}, num_warps=warps)
        for block, warps in (
            ((16, 1), (32, 1)) if _INTERPRETED else ((512, 4), (1024, 8), (2048, 16), (4096, 16))
        )
    ]
    _radix_topk_tuned = triton.autotune(
        RADIX_CONFIGS,
        key=["N", "PASSES", "HAS_AUX"],
        do_bench=_host_bench if _INTERPRETED else None,
    )(_radix_topk_kernel)

    @triton.jit
    def _bisect(key, K, BITS: tl.constexpr):
        """The K-th largest of a row of uint32 keys below 2**BITS (keys of 0 never count),
        fixed a bit at a time from the top, and how many keys lie above it."""
        t = tl.full([], 0, tl.uint32)
        one = tl.full([], 1, tl.uint32)
        for i in range(BITS):
            candidate = t | (one << (BITS - 1 - i))
            count = tl.sum((key >= candidate).to(tl.int32), 0)
            t = tl.where(count >= K, candidate, t)
        return t, tl.sum((key > t).to(tl.int32), 0)

    @triton.jit
    def _resident_topk_kernel(
        x_ptr, stride_x, dead_ptr, vals_ptr, idx_ptr, aux_vals_ptr, aux_idx_ptr, N, K, KA,
        BITS: tl.constexpr, HAS_AUX: tl.constexpr, BLOCK_N: tl.constexpr,
        TILE: tl.constexpr,
    ):  # fmt: skip
        """One program per row, its keys held in registers: the K-th largest (and the KA-th
        largest dead) by bisection on the keys' bits, a row reduction a bit, then the
        entries written in TILE-wide tiles."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        cols = tl.arange(0, BLOCK_N)
        valid = cols < N
        key = _ordered_u32(tl.load(x_row + cols, mask=valid, other=0.0)) >> 32 - BITS
        key = tl.where(valid, key, 0)
        t, above = _bisect(key, K, BITS)
        aux_t = t
        aux_above = above
        if HAS_AUX:
            dead = tl.load(dead_ptr + cols, mask=valid, other=0) != 0
            aux_t, aux_above = _bisect(tl.where(dead, key, 0), KA, BITS)
        _write_selected(
            x_row, dead_ptr, N, row, t, above, aux_t, aux_above,
            vals_ptr, idx_ptr, aux_vals_ptr, aux_idx_ptr, K, KA, 32 - BITS, HAS_AUX, TILE,
        )  # fmt: skip
