"""Adam with the decoder-norm step: the optimizer that keeps each SAE's decoder rows unit-norm.

Usable without Lightning::

    opt = DecoderNormAdam(sae.parameters(), decoders=[sae.W_dec], lr=2e-4)
    loss.backward(); opt.step(); opt.zero_grad()

For every tensor in ``decoders``, :meth:`DecoderNormAdam.step` removes from each row's gradient
its component along the row, takes Adam's step, and rescales the rows to unit norm (the
decoder-norm step of Gao et al. 2024). Where the Triton kernels run (CUDA) the three are one
pass over W_dec, its gradient and Adam's moments (:func:`saetrain.kernels.decoder_adam_step_`:
28 bytes moved per fp32 parameter, against 48 for the three passes); elsewhere they are the
decoder-norm kernels around torch's Adam, which a CPU runs faster. Every other parameter steps
in torch's Adam. The state and ``state_dict`` are torch Adam's, so checkpoints move between
the two optimizers and between the fused and the separate paths.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from . import kernels
from .kernels._backend import KERNEL_OPTIONS, use_triton
from .sae import _local

# Fuse the decoder's step where the Triton kernels run. The fused kernel moves 28 of the 48
# bytes per parameter that projection + Adam + renormalisation move; it has not yet been timed
# against them on a GPU (benchmarks/bench_kernels.py --parts prints both: scripts/gpu_check.sh).
FUSE_WHERE_TRITON = "unfused-optimizer" not in KERNEL_OPTIONS


def _is_zero(lr: float | Tensor) -> bool:
    return lr == 0 if not isinstance(lr, Tensor) else lr.device.type == "cpu" and lr.item() == 0


class DecoderNormAdam(torch.optim.Adam):
    """``torch.optim.Adam`` that also keeps the rows of each tensor in ``decoders`` unit-norm.

    Args:
        params: As for Adam (tensors or parameter groups); ``decoders`` must be among them.
        decoders: The (num_latents, d_in) decoder matrices (``SAE.W_dec``), whole or sharded by
            rows (FSDP2's DTensors: each rank steps its own rows).
        project_decoders: Project the decoder gradients inside :meth:`step`. False when the
            caller projects them earlier, e.g. before clipping gradient norms (``SAEModule``
            under ``gradient_clip_val``); the rows are renormalised either way.
        fuse: One pass per decoder (:func:`~saetrain.kernels.decoder_adam_step_`) or the three
            ops; None: fused where the Triton kernels run (see ``FUSE_WHERE_TRITON``).
        **adam: Adam's keyword arguments. Decoders take neither ``amsgrad`` nor ``maximize``.

    A step at lr 0 leaves every parameter as it is, decoders included (their rows are not
    renormalised), as torch's Adam does: distributed checkpointing relies on it.
    """

    def __init__(
        self,
        params: Iterable,
        decoders: Iterable[Tensor],
        project_decoders: bool = True,
        fuse: bool | None = None,
        **adam,
    ):
        super().__init__(params, **adam)
        self.decoders = list(decoders)
        self.project_decoders, self.fuse = project_decoders, fuse
        owned = {id(p): g for g in self.param_groups for p in g["params"]}
        for W in self.decoders:
            if id(W) not in owned:
                raise ValueError(
                    "DecoderNormAdam: a decoder is not among the optimized parameters; pass "
                    "each SAE's W_dec in params too."
                )
            if W.dim() != 2:
                raise ValueError(
                    f"DecoderNormAdam: decoders are (num_latents, d_in) matrices, got shape "
                    f"{tuple(W.shape)}."
                )
            if owned[id(W)]["amsgrad"] or owned[id(W)]["maximize"]:
                raise ValueError(
                    "DecoderNormAdam: the decoder-norm step supports neither amsgrad nor "
                    "maximize; turn them off for the group that holds W_dec."
                )
        # GradScaler (fp16) then checks for infs itself and skips step() when it finds one;
        # the fused decoder pass does not read Adam's found_inf.
        self._step_supports_amp_scaling = False

    def _fused(self, W: Tensor) -> bool:
        if self.fuse is not None:
            return self.fuse
        return FUSE_WHERE_TRITON and use_triton(W.device)

    def _decoder_state(self, W: Tensor) -> dict:
        """Adam's state for W, created as Adam creates it (its step count on W's device)."""
        state = self.state[W]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(W).device)
            state["exp_avg"] = torch.zeros_like(W, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(W, memory_format=torch.preserve_format)
        elif state["step"].device != _local(W).device:  # from a non-fused Adam's checkpoint
            state["step"] = state["step"].to(_local(W).device, torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused, separate = [], []
        # Looked up each step: load_state_dict replaces the group dicts (and a scheduler then
        # sets the learning rates in the new ones).
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        for W in self.decoders:
            group = groups[id(W)]
            # Adam at lr 0 moves no parameter, and torch relies on that: distributed
            # checkpointing builds an empty optimizer's state with such a step before it loads
            # the saved one. The rows then keep their norm, so they are not renormalised
            # (which would change the last bits of unit rows).
            still = _is_zero(group["lr"])
            if W.grad is not None and not still and self._fused(_local(W)):
                state = self._decoder_state(W)
                kernels.decoder_adam_step_(
                    _local(W), _local(W.grad), _local(state["exp_avg"]),
                    _local(state["exp_avg_sq"]), state["step"],
                    lr=group["lr"], betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"], project=self.project_decoders,
                )  # fmt: skip
                fused.append(W)
            else:
                if W.grad is not None and self.project_decoders:
                    kernels.project_decoder_grad_(_local(W), _local(W.grad))
                if not still:
                    separate.append(W)
        # Adam steps the rest: the fused decoders' gradients are hidden from it meanwhile.
        grads = [W.grad for W in fused]
        for W in fused:
            W.grad = None
        try:
            super().step()
        finally:
            for W, grad in zip(fused, grads, strict=True):
                W.grad = grad
        for W in separate:
            kernels.normalize_decoder_(_local(W))
        return loss
