"""Counting the ops that make a CUDA host wait for the device, on any device.

Each such op (item(), nonzero, bincount, boolean indexing, a tensor in an `if`) drains
CUDA's launch queue, so the kernels launched after it wait on Python. The ops are the same
on CPU, so tests count them there. (A module of its own: importing test_kernels.py sets
TRITON_INTERPRET.)
"""

from __future__ import annotations

import traceback

from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset(
    {"_local_scalar_dense", "is_nonzero", "nonzero", "bincount", "unique", "_unique2",
     "masked_select"}
)  # fmt: skip


class HostSyncs(TorchDispatchMode):
    """Records the sync ops run inside it (`ops`, with overloads) and every op's name (`all`).

    `only_from`: count a sync op only where the innermost saetrain frame calling it is in a
    file whose path ends with this (e.g. "module.py"); None: wherever it comes from.
    """

    def __init__(self, only_from: str | None = None):
        super().__init__()
        self.only_from = only_from
        self.ops: list[str] = []
        self.all: list[str] = []

    def _ours(self) -> bool:
        if self.only_from is None:
            return True
        frames = [f.filename for f in traceback.extract_stack() if "/saetrain/" in f.filename]
        return bool(frames) and frames[-1].endswith(self.only_from)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.all.append(name)
        if name in SYNC_OPS and self._ours():
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))
