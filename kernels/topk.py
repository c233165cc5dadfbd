"""Row-wise top-k selection: a grouped torch path for CPU, and Triton helpers for fusion.

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
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import HAS_TRITON

# Where `select_topk` groups. Measured on CPU (above); on CUDA torch.topk stays until a GPU
# run of `benchmarks/bench_kernels.py --parts` (its "top-k" rows) says grouping pays there.
GROUPED_DEVICES = frozenset({"cpu"})
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


def unpack_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 values and int64 columns of int64 keys packed by the Triton `pack_keys`."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)  # negative floats: flip all but the sign
    return bits.view(torch.float32), keys & 0xFFFFFFFF


if HAS_TRITON:
    import triton
    import triton.language as tl

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
