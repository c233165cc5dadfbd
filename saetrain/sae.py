"""The Top-k sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

A plain ``nn.Module``, usable without Lightning::

    from saetrain import SAE, SAEConfig
    sae = SAE(SAEConfig(d_in=576, num_latents=8192, k=32))
    sae.init_from_data(acts)            # b_dec (and the input scale) from a sample of activations
    out = sae(acts, dead_mask=dead)     # out.fvu + sae.cfg.auxk_coef * out.auxk_loss is the loss

The encoder is ``pre_acts = (x - b_dec) @ W_enc.T + b_enc`` followed by Top-k and ReLU; the
decoder is ``x_hat = latent_acts @ W_dec[latent_indices] + b_dec``. Rows of ``W_dec`` are kept at
unit norm: train with :class:`saetrain.DecoderNormAdam` (``decoders=[sae.W_dec]``), or call
:meth:`SAE.remove_parallel_grad` before each optimizer step and :meth:`SAE.normalize_decoder`
after it. The sparse parts (top-k encoder backward, decode) and the losses run through
:mod:`saetrain.kernels`.

``activation: batchtopk`` (BatchTopK while training, a JumpReLU at its running threshold in
eval mode) and ``matryoshka_prefixes`` (a loss summed over nested prefixes of latents) take the
pure-torch path of :mod:`saetrain.architectures` (issue #22). The threshold is one number when
we estimated it, or one per latent when it came from a peer's JumpReLU SAE (SAELens).

Under FSDP (``fully_shard``, as ``SAEModule`` applies it for ``--trainer.strategy fsdp2``) the
parameters are row-sharded DTensors between steps: every rank holds whole rows of ``W_enc`` and
``W_dec``, so the decoder-norm steps run on each rank's own rows, and :meth:`SAE.gathered`
assembles the whole SAE for export.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from . import architectures, kernels
from .errors import UserError
from .files import open_safetensors, read_json

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = distribute_tensor = FSDPModule = None


def _local(t: Tensor) -> Tensor:
    """This rank's part of a sharded (DTensor) tensor, or ``t`` itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _full(t: Tensor) -> Tensor:
    """The whole of a sharded tensor (a collective: every rank must call it), or ``t``."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


SAE_WEIGHTS = "sae.safetensors"
SAE_CONFIG = "cfg.json"


@dataclass
class SAEConfig:
    """Shape and training-time behaviour of a Top-k SAE.

    Attributes:
        d_in: Width of the activations (the LM's hidden size).
        num_latents: Number of latents (dictionary size), e.g. 8 * d_in.
        k: Number of latents kept per token by Top-k.
        k_aux: Latents used by the AuxK loss among dead ones; None means d_in // 2.
        auxk_coef: Weight of the AuxK loss in the total loss (Gao et al.: 1/32).
        dead_tokens_threshold: A latent is dead after this many tokens without firing.
        normalize_activations: Scale inputs to unit mean squared norm during training; the scale
            is folded into the weights on export, so saved SAEs take raw activations.
        b_dec_init: How ``b_dec`` is initialised from data: mean, geometric median, or zeros.
        activation: ``topk``: k latents per token. ``batchtopk`` (Bussmann et al. 2024): the
            k * B largest over a training batch of B tokens, and at inference (``sae.eval()``
            with a threshold estimated) a JumpReLU at the running threshold, independent of the
            batch; see :mod:`saetrain.architectures`.
        threshold_ema: batchtopk: weight of the old value in the threshold's moving average.
        threshold_start: batchtopk: training batches before the threshold estimate starts.
        matryoshka_prefixes: Nested prefixes of latents ``[m1, m2, ..., num_latents]``, each
            reconstructing on its own (Bussmann et al. 2025): the loss is the sum of their
            FVUs. None: the plain loss.
    """

    d_in: int
    num_latents: int
    k: int = 32
    k_aux: int | None = None
    auxk_coef: float = 1 / 32
    dead_tokens_threshold: int = 10_000_000
    normalize_activations: bool = True
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = "mean"
    activation: Literal["topk", "batchtopk"] = "topk"
    threshold_ema: float = 0.999
    threshold_start: int = 1000
    matryoshka_prefixes: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata carried into ``cfg.json`` (model, hookpoint, tokens seen, data)."""

    def __post_init__(self) -> None:
        # Types first: a cfg.json may hold anything (issue #21: "1e12", 1.5, "64").
        for name in (
            "d_in",
            "num_latents",
            "k",
            "dead_tokens_threshold",
            "k_aux",
            "threshold_start",
        ):
            value = getattr(self, name)
            if not _is_int(value) and not (name == "k_aux" and value is None):
                raise UserError(f"{name} must be a whole number, got {value!r}")
        if not _is_number(self.auxk_coef) or not math.isfinite(self.auxk_coef):
            raise UserError(f"auxk_coef must be a finite number, got {self.auxk_coef!r}")
        if not isinstance(self.normalize_activations, bool):
            raise UserError(
                f"normalize_activations must be true or false, got {self.normalize_activations!r}"
            )
        if not isinstance(self.extra, dict):
            raise UserError(f"extra must be a mapping, got {self.extra!r}")
        for name in ("d_in", "num_latents", "k", "dead_tokens_threshold"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.num_latents:
            raise UserError(
                f"k={self.k} is larger than num_latents={self.num_latents}: "
                "choose k <= num_latents (the paper uses k=32)"
            )
        if self.k_aux is None:
            self.k_aux = max(1, self.d_in // 2)
        if self.k_aux < 0:
            raise UserError(f"k_aux must be >= 0, got {self.k_aux}")
        self.k_aux = min(self.k_aux, self.num_latents)
        if self.auxk_coef < 0:
            raise UserError(f"auxk_coef must be >= 0, got {self.auxk_coef}")
        if self.b_dec_init not in ("mean", "geometric_median", "zeros"):
            raise UserError(
                f"b_dec_init must be 'mean', 'geometric_median' or 'zeros', got {self.b_dec_init!r}"
            )
        if self.activation not in ("topk", "batchtopk"):
            raise UserError(f"activation must be 'topk' or 'batchtopk', got {self.activation!r}")
        if not _is_number(self.threshold_ema) or not 0 <= self.threshold_ema < 1:
            raise UserError(f"threshold_ema must be in [0, 1), got {self.threshold_ema!r}")
        if self.threshold_start < 0:
            raise UserError(f"threshold_start must be >= 0, got {self.threshold_start}")
        self._check_prefixes()

    def _check_prefixes(self) -> None:
        prefixes = self.matryoshka_prefixes
        if prefixes is None:
            return
        ok = isinstance(prefixes, list | tuple) and prefixes and all(map(_is_int, prefixes))
        ok = ok and prefixes[0] >= 1 and all(a < b for a, b in pairwise(prefixes))
        if not ok or prefixes[-1] != self.num_latents:
            raise UserError(
                f"matryoshka_prefixes must be increasing whole numbers >= 1 ending at "
                f"num_latents={self.num_latents}, got {prefixes!r}"
            )
        self.matryoshka_prefixes = list(prefixes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """The shape of each weight of an SAE of config ``cfg`` (the (num_latents, d_in) layout)."""
    n, d = cfg.num_latents, cfg.d_in
    return {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}


def check_shapes(source: str | Path, cfg: SAEConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """A one-line error unless ``shapes`` (name -> shape, of the tensors in ``source``) are
    those of an SAE of config ``cfg``: checked before anything of that size is allocated. A
    ``threshold``, if present, is one number () or one per latent (num_latents,)."""
    for name, shape in expected_shapes(cfg).items():
        got = tuple(shapes[name]) if name in shapes else "missing"
        if got != shape:
            raise UserError(
                f"{source}: tensor {name} has shape {got}, expected {shape} from its "
                f"{SAE_CONFIG}; the files do not belong together"
            )
    got = tuple(shapes.get("threshold", ()))
    if got not in ((), (cfg.num_latents,)):
        raise UserError(
            f"{source}: tensor threshold has shape {got}, expected () or ({cfg.num_latents},) "
            f"from its {SAE_CONFIG}; the files do not belong together"
        )


THRESHOLD_TENSORS = ("threshold", "threshold_steps")
"""Tensors a ``batchtopk`` SAE saves beside its weights: its JumpReLU threshold (raw input
scale; () or (num_latents,); < 0: not estimated) and the number of batches that updated it."""
CFG_KEY = "saetrain_cfg"
"""Key of the safetensors header entry holding a copy of cfg.json (see :meth:`SAE.save`)."""
SAVING = ".saving"
"""Marker file present in an SAE folder only while :meth:`SAE.save` renames its two files."""


def read_sae_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in the ``cfg.json`` file ``path``; a one-line error if it is not one."""
    fix = "write it again, or restore it from the run that exported the SAE"
    raw = read_json(path, "the SAE config", fix)
    if not isinstance(raw, dict):
        raise UserError(f"the SAE config {path} holds {type(raw).__name__}, not an object: {fix}")
    return raw


def config_from(path: str | Path, fields_: dict[str, Any]) -> SAEConfig:
    """:meth:`SAEConfig.from_dict` with its errors naming the file the fields came from."""
    try:
        return SAEConfig.from_dict(fields_)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except TypeError as e:  # a required field is missing
        raise UserError(f"{path}: {' '.join(str(e).split())}") from None


class ForwardOutput(NamedTuple):
    """What :meth:`SAE.forward` returns.

    Attributes:
        x_hat: (B, d_in) reconstruction, in the same space as the input.
        latent_acts: (B, k) values of the selected latents (>= 0), in the SAE's internal scale.
            With ``activation: batchtopk``, (B, K) with K the largest row's L0, rows with fewer
            latents padded with zero values.
        latent_indices: (B, k) indices of the selected latents.
        fvu: Scalar fraction of variance unexplained, sum|x - x_hat|^2 / sum|x - mean(x)|^2.
        auxk_loss: Scalar AuxK loss: how well the top ``k_aux`` dead latents reconstruct the
            residual ``x - x_hat``, normalised like ``fvu``; zero when no latent is dead.
        recon_loss: Scalar reconstruction part of the training loss: ``fvu``, or with
            ``matryoshka_prefixes`` the sum of each prefix's FVU (the last prefix's is ``fvu``).
    """

    x_hat: Tensor
    latent_acts: Tensor
    latent_indices: Tensor
    fvu: Tensor
    auxk_loss: Tensor
    recon_loss: Tensor


def geometric_median(points: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``points``."""
    points = points.float()
    guess = points.mean(0)
    for _ in range(iters):
        dist = (points - guess).norm(dim=1).clamp_min(eps)  # (N,)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - guess).norm() < eps * (1 + guess.norm()):
            return new
        guess = new
    return guess


class SAE(nn.Module):
    """Top-k sparse autoencoder. See the module docstring for the maths and usage."""

    def __init__(self, cfg: SAEConfig, *, device: str | torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.num_latents
        # Decoder rows are random unit vectors; the encoder starts as the decoder's transpose
        # (Gao et al. 2024, sec. 2.4); W_enc is laid out like nn.Linear.weight, (num_latents, d_in).
        W_dec = torch.randn(n, d, device=device)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # (N, d)
        self.W_enc = nn.Parameter(W_dec.clone())  # (N, d)
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))  # (N,)
        self.b_dec = nn.Parameter(torch.zeros(d, device=device))  # (d,)
        # Multiplies raw activations before encoding; 1 means "no normalisation" (or folded).
        self.register_buffer("input_scale", torch.ones((), device=device))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        if cfg.activation == "batchtopk":  # (Top-k SAEs keep the state dict they always had)
            # The JumpReLU threshold in the internal scale; < 0 until estimated. One number,
            # or (num_latents,) once loaded from a peer's JumpReLU (see _shape_threshold).
            self.register_buffer("threshold", torch.full((), -1.0, device=device))
            self.register_buffer(
                "threshold_steps", torch.zeros((), dtype=torch.long, device=device)
            )

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Set the input scale and ``b_dec`` from a sample of raw activations ``x`` (B, d_in)."""
        self.set_init(*self.data_init(x))

    @torch.no_grad()
    def data_init(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The input scale () and ``b_dec`` (d_in,) that :meth:`init_from_data` would set."""
        x = x.to(self.device, torch.float32)
        scale = torch.ones((), device=x.device)
        if self.cfg.normalize_activations:
            # Unit mean squared norm: E|x * s|^2 = 1.
            scale = x.pow(2).sum(1).mean().clamp_min(1e-12).rsqrt()
        x = x * scale
        if self.cfg.b_dec_init == "mean":
            b_dec = x.mean(0)
        elif self.cfg.b_dec_init == "geometric_median":
            b_dec = geometric_median(x)
        else:
            b_dec = torch.zeros_like(x[0])
        return scale, b_dec

    @torch.no_grad()
    def set_init(self, scale: Tensor, b_dec: Tensor) -> None:
        """Set the input scale and ``b_dec`` (the same values on every rank when sharded)."""
        if FSDPModule is not None and isinstance(self, FSDPModule):
            # A root FSDP module stays unsharded after a forward without backward (validation):
            # write into the sharded parameters, which the next forward gathers.
            self.reshard()
        self.input_scale.fill_(float(scale))
        b_dec = b_dec.to(self.b_dec.device, self.b_dec.dtype)
        if DTensor is not None and isinstance(self.b_dec, DTensor):
            b_dec = distribute_tensor(
                b_dec, self.b_dec.device_mesh, self.b_dec.placements, src_data_rank=None
            )
        self.b_dec.copy_(b_dec)
        self.initialized.fill_(True)

    def encode(
        self, x: Tensor, dead_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
        """Top-k latents of raw activations ``x`` (B, d_in).

        Returns ``(latent_acts, latent_indices)``, both (B, k); with ``dead_mask`` (num_latents,)
        also the AuxK selection ``(aux_acts, aux_indices)`` among dead latents.
        """
        out = self._topk(self._scaled(x), dead_mask)
        if dead_mask is None:
            return out.latent_acts, out.latent_indices
        return out.latent_acts, out.latent_indices, out.aux_acts, out.aux_indices

    def decode(self, latent_acts: Tensor, latent_indices: Tensor) -> Tensor:
        """Reconstruction (B, d_in) in raw activation space from (B, k) values and indices."""
        x_hat = kernels.decode(latent_acts, latent_indices, self.W_dec) + self.b_dec
        return x_hat / self.input_scale

    def _scaled(self, x: Tensor) -> Tensor:
        return x.to(self.dtype) * self.input_scale

    def _topk(self, xs: Tensor, dead_mask: Tensor | None) -> kernels.EncodeOutput:
        """Top-k (and, with ``dead_mask``, AuxK) selection for already scaled inputs ``xs``."""
        if self.cfg.activation == "batchtopk":
            return self._batchtopk(xs, dead_mask)
        return kernels.encode_topk(
            xs,
            self.W_enc,
            self.b_enc,
            self.cfg.k,
            dead_mask=dead_mask,
            k_aux=self.cfg.k_aux if dead_mask is not None else 0,
            b_dec=self.b_dec,  # its gradient without a (B, d_in) gradient of xs
        )

    @property
    def uses_threshold(self) -> bool:
        """Whether the forward is a JumpReLU at ``threshold``: a batchtopk SAE in eval mode
        whose threshold was estimated (one host read)."""
        batchtopk = self.cfg.activation == "batchtopk"
        return batchtopk and not self.training and bool((self.threshold >= 0).all())

    def _shape_threshold(self, shape: tuple[int, ...]) -> None:
        """Give the threshold buffer ``shape``, () or (num_latents,), before a state dict with
        a threshold of that shape is loaded (its values are then the state dict's)."""
        if tuple(self.threshold.shape) != tuple(shape):
            old = self.threshold
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            self.register_buffer("threshold", new)

    def _batchtopk(self, xs: Tensor, dead_mask: Tensor | None) -> kernels.EncodeOutput:
        """BatchTopK while training (updating the threshold), JumpReLU at inference; torch ops
        on dense (B, num_latents) pre-activations (see :mod:`saetrain.architectures`)."""
        pre_acts = architectures.pre_activations(xs, self.W_enc, self.b_enc, self.b_dec)
        if self.uses_threshold:
            acts = architectures.jumprelu_dense(pre_acts, self.threshold)  # (B, N)
        else:
            acts, kept = architectures.batch_topk_dense(pre_acts, self.cfg.k)
            if self.training:
                cfg = self.cfg
                architectures.update_threshold_(
                    self.threshold,
                    self.threshold_steps,
                    kept,
                    cfg.threshold_ema,
                    cfg.threshold_start,
                )
        latent_acts, latent_indices = architectures.sparse_rows(acts)  # (B, K)
        aux = architectures.aux_topk(pre_acts, dead_mask, self.cfg.k_aux)
        return kernels.EncodeOutput(latent_acts, latent_indices, *aux)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        """Encode, decode and compute the losses for raw activations ``x`` (B, d_in).

        ``dead_mask`` (num_latents,) marks dead latents for the AuxK loss; None skips it.
        Losses are computed in the SAE's internal (normalised) space, where they are invariant
        to the input scale.
        """
        xs = self._scaled(x)  # (B, d)
        enc = self._topk(xs, dead_mask)
        aux = enc.aux_acts.numel() > 0  # AuxK slots exist only where some latent is dead
        err_hat = None
        if aux:  # both decodes at once: one gradient for W_dec
            decoded, err_hat = kernels.decode_pair(
                enc.latent_acts, enc.latent_indices, enc.aux_acts, enc.aux_indices, self.W_dec
            )
        else:
            decoded = kernels.decode(enc.latent_acts, enc.latent_indices, self.W_dec)
        # x_hat, FVU and AuxK (the top dead latents explaining the main reconstruction's
        # residual, a gradient that reaches only dead latents: Gao et al., A.2).
        x_hat, fvu, auxk_loss = kernels.sae_losses(
            xs, decoded, self.b_dec, self.input_scale, err_hat
        )
        recon_loss = fvu
        if self.cfg.matryoshka_prefixes:  # the last prefix (all latents) is fvu itself
            inner = self.cfg.matryoshka_prefixes[:-1]
            if inner:
                recon_loss = (
                    fvu
                    + architectures.prefix_fvus(
                        xs, enc.latent_acts, enc.latent_indices, self.W_dec, self.b_dec, inner
                    ).sum()
                )
        return ForwardOutput(x_hat, enc.latent_acts, enc.latent_indices, fvu, auxk_loss, recon_loss)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of ``W_dec.grad`` parallel to each row (keeps rows on the unit sphere)."""
        if self.W_dec.grad is not None:  # sharded: this rank's rows, whole
            kernels.project_decoder_grad_(_local(self.W_dec), _local(self.W_dec.grad))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every row of ``W_dec`` to unit norm."""
        kernels.normalize_decoder_(_local(self.W_dec))

    @torch.no_grad()
    def gathered(self) -> SAE:
        """This SAE with whole, unsharded tensors: itself unless FSDP shards it, else a copy
        assembled from every rank's rows (a collective: every rank must call it)."""
        if DTensor is None or not any(isinstance(p, DTensor) for p in self.parameters()):
            return self
        whole = SAE(self.cfg, device="cpu").to(self.dtype)
        state = {name: _full(t).detach().cpu() for name, t in self.state_dict().items()}
        if "threshold" in state:
            whole._shape_threshold(tuple(state["threshold"].shape))
        whole.load_state_dict(state)
        return whole

    @torch.no_grad()
    def folded_state_dict(self) -> dict[str, Tensor]:
        """Weights with the input scale folded in, so the SAE takes raw activations.

        With scale s: pre_acts(s x) = s * pre_acts'(x) for b_enc' = b_enc / s, b_dec' = b_dec / s,
        and Top-k/ReLU commute with a positive scale, so latents are divided by s and ``W_dec``
        keeps unit-norm rows.
        """
        s = self.input_scale.float()
        state = {
            "W_enc": self.W_enc.detach().clone().contiguous(),
            "b_enc": (self.b_enc.detach() / s).to(self.dtype).contiguous(),
            "W_dec": self.W_dec.detach().clone().contiguous(),
            "b_dec": (self.b_dec.detach() / s).to(self.dtype).contiguous(),
        }
        if self.cfg.activation == "batchtopk":  # a JumpReLU threshold scales like the latents
            t = self.threshold.detach().float()
            state["threshold"] = torch.where(t >= 0, t / s, t).contiguous()
            state["threshold_steps"] = self.threshold_steps.detach().clone()
        return state

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``cfg.json`` and ``sae.safetensors`` into the folder ``path`` (atomically)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg.to_dict()
        cfg["extra"] = {**cfg.get("extra", {}), **(metadata or {})}
        cfg["format"] = "saetrain"
        cfg["format_version"] = 1
        cfg["normalization_folded"] = True
        cfg["dtype"] = str(self.dtype).removeprefix("torch.")
        if self.cfg.activation == "batchtopk":  # for readers; the weights file's tensor is used
            folded = self.folded_state_dict()["threshold"]
            # null: not estimated, or one per latent (a peer's JumpReLU), in the weights file.
            one = folded.numel() == 1 and bool(folded >= 0)
            cfg["threshold"] = float(folded) if one else None
            cfg["threshold_per_latent"] = folded.dim() == 1
        # The weights file carries its own copy of cfg.json: the two files are renamed into
        # place one after the other, and a kill between the renames must not pair new weights
        # with an old config (load trusts the weights' copy when a save marker is left and they
        # disagree; without one cfg.json wins, so hand edits of it count).
        text = json.dumps(cfg, indent=2) + "\n"
        save_file(self.folded_state_dict(), str(tmp / SAE_WEIGHTS), metadata={CFG_KEY: text})
        (tmp / SAE_CONFIG).write_text(text)
        path.mkdir(parents=True, exist_ok=True)
        marker = path / SAVING
        marker.touch()  # while it exists the two files may be from different saves
        for name in (SAE_WEIGHTS, SAE_CONFIG):
            (tmp / name).replace(path / name)
        marker.unlink()
        tmp.rmdir()
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> SAE:
        """Read an SAE written by :meth:`save` (``cfg.json`` + ``sae.safetensors``)."""
        path = Path(path)
        if not (path / SAE_CONFIG).is_file() or not (path / SAE_WEIGHTS).is_file():
            raise UserError(
                f"{path} is not a saetrain SAE folder: expected {SAE_CONFIG} and {SAE_WEIGHTS} "
                "in it (the export written at the end of `python -m saetrain fit`)"
            )
        # cfg.json checked, and against the tensors' shapes in the safetensors header, before
        # anything is allocated: a cfg.json saying num_latents 1e12 must not start allocating.
        raw = read_sae_config(path / SAE_CONFIG)
        with open_safetensors(path / SAE_WEIGHTS) as f:
            own = (f.metadata() or {}).get(CFG_KEY) if (path / SAVING).exists() else None
            own = json.loads(own) if own is not None else None
            if own is not None and own != raw:  # a torn save: the weights' copy is theirs
                warnings.warn(
                    f"{path / SAE_CONFIG} is not the config {path / SAE_WEIGHTS} was saved with "
                    "(a save was interrupted between its two files): using the weights' own copy",
                    stacklevel=2,
                )
                raw = own
            cfg = config_from(path / SAE_CONFIG, raw)
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
            check_shapes(path / SAE_WEIGHTS, cfg, shapes)
            names = [*expected_shapes(cfg), *THRESHOLD_TENSORS]
            state = {k: f.get_tensor(k) for k in names if k in shapes}
        return cls.from_tensors(cfg, state, device=device)

    @classmethod
    def from_tensors(
        cls,
        cfg: SAEConfig,
        tensors: dict[str, Tensor],
        *,
        input_scale: float = 1.0,
        device: str | torch.device = "cpu",
    ) -> SAE:
        """An SAE holding ``tensors`` (W_enc, b_enc, W_dec, b_dec, shaped as
        :func:`check_shapes` checks), in ``W_dec``'s dtype, without a random init first."""
        dtype = tensors["W_dec"].dtype
        sae = cls(cfg, device="meta")  # nothing allocated: every tensor is assigned below
        state = {k: tensors[k].to(device, dtype).contiguous() for k in expected_shapes(cfg)}
        state["input_scale"] = torch.tensor(float(input_scale), device=device)
        state["initialized"] = torch.ones((), dtype=torch.bool, device=device)
        if cfg.activation == "batchtopk":  # not estimated when the tensors lack it
            for name, default in (("threshold", -1.0), ("threshold_steps", 0)):
                value = tensors.get(name, torch.tensor(default))
                value = value.reshape(()) if value.numel() == 1 else value.reshape(-1)
                state[name] = value.to(device).clone()
            sae._shape_threshold(tuple(state["threshold"].shape))
        sae.load_state_dict(state, assign=True)
        return sae.eval()


def load_sae(path: str | Path, *, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE, detecting its format: a folder written by ``python -m saetrain fit`` or
    :meth:`SAE.save`, a SAELens or sparsify folder (or a sparsify parent folder holding one
    hookpoint), a Lightning ``.ckpt`` from ``fit``, or a Hub id ``owner/repo[/sub/folder]``.
    See :mod:`saetrain.interop`."""
    from .interop import load  # interop imports this module

    return load(path, device=device)
