"""Steering by a direction of the residual stream: the difference-in-means refusal direction
(Arditi et al. 2024, "Refusal in language models is mediated by a single direction") and a
random control of the same norm, the baselines SAE-feature steering is judged against.

    d = fit_direction(model, tok, harmful, harmless, sae=sae, pool="mean")
    add = DirectionEdit(d.vector, "add", value=1.0 * d.scale)   # ActAdd: + the diff-in-means
    gone = DirectionEdit(d.vector, "ablate")                     # project it out of every token
    gens = generate(model, tok, prompts, sae=sae, interventions=[add])

The direction is read exactly where the SAE and the gates read (the output of decoder layer
``layer``), from the prompt as the gates pool it (:func:`~saetrain.steering.gate.prompt_features`:
``mean`` over the prompt's content tokens, or the ``last`` one, where the model has read the
whole request). Its unit of strength, ``scale``, is the distance between the two classes'
means: strength 1 adds the difference-in-means vector itself, as Arditi et al. do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..errors import UserError

DirectionPool = Literal["mean", "last"]


@dataclass
class DirectionEdit:
    """An edit of the residual stream along a unit ``vector`` (d_in,), applied per token:
    ``add``: x + value * vector; ``ablate``: x - (x . vector) vector (the reverse test: with the
    refusal direction projected out, refusal should fall)."""

    vector: Tensor
    """(d_in,) unit direction in raw activation space."""
    op: Literal["add", "ablate"] = "add"
    value: float = 0.0
    """Coefficient of ``add`` in activation units (ignored by ``ablate``)."""
    positions: Literal["all", "prompt", "generated"] = "all"
    """Tokens to edit, as for an SAE :class:`~saetrain.steering.hooks.Intervention`."""
    start: int = 0
    """Leave positions below this alone."""

    def __post_init__(self) -> None:
        if self.op not in ("add", "ablate"):
            raise UserError(f"a direction edit's op must be add or ablate, got {self.op!r}")
        if self.vector.dim() != 1:
            raise UserError(
                f"a direction must be one vector (d_in,), got {tuple(self.vector.shape)}"
            )
        norm = float(self.vector.float().norm())
        if not abs(norm - 1.0) < 1e-3:
            raise UserError(f"a direction must have unit norm, got {norm:.4g}")

    def delta(self, x: Tensor) -> Tensor:
        """(N, d) the change this edit makes to float32 activations ``x`` (N, d)."""
        u = self.vector.to(x.device, torch.float32)
        if self.op == "add":
            return (self.value * u).expand_as(x)
        return -(x @ u).unsqueeze(-1) * u  # (N, d): the component along u, removed


@dataclass
class Direction:
    """A fitted direction and what it was fitted on."""

    vector: Tensor
    """(d_in,) unit vector: mean(positive) - mean(negative), normalised."""
    scale: float
    """|mean(positive) - mean(negative)|: the unit of strength (1 = the diff-in-means itself)."""
    layer: int
    """Decoder layer whose output it was read from."""
    model: str | None = None
    """The LM it was fitted on (as the SAE's cfg.json names it)."""
    pool: DirectionPool = "mean"
    """How each prompt was read: mean over its content tokens, or its last one."""
    fitted_on: dict = field(default_factory=dict)
    """The prompt sets it was fitted on, and how many prompts of each class."""

    def edit(self, op: Literal["add", "ablate"], strength: float = 0.0, **kw) -> DirectionEdit:
        """An edit adding ``strength`` units of the direction, or ablating it."""
        return DirectionEdit(self.vector, op, value=float(strength) * self.scale, **kw)

    def save(self, path: str | Path) -> Path:
        """Write ``direction.safetensors`` (the vector) and ``direction.json`` (the rest)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"vector": self.vector.float().contiguous()}, str(path / "direction.safetensors"))
        meta = {k: getattr(self, k) for k in ("scale", "layer", "model", "pool", "fitted_on")}
        (path / "direction.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Read a direction written by :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        if (
            not (path / "direction.json").is_file()
            or not (path / "direction.safetensors").is_file()
        ):
            raise UserError(
                f"{path} holds no direction (direction.json + direction.safetensors): fit one "
                "with eval-refusal's direction settings"
            )
        meta = json.loads((path / "direction.json").read_text())
        return cls(vector=load_file(str(path / "direction.safetensors"))["vector"], **meta)

    def check_matches(self, sae, layer: int, model: str | None) -> None:
        """A one-line error unless the direction was fitted where ``sae`` steers."""
        if self.vector.numel() != sae.cfg.d_in:
            raise UserError(
                f"the direction has width {self.vector.numel()} but the SAE takes d_in="
                f"{sae.cfg.d_in}: fit the direction on the SAE's model"
            )
        if self.layer != layer:
            raise UserError(
                f"the direction was fitted on layer {self.layer} but the SAE steers layer "
                f"{layer}: fit it on the SAE's layer"
            )
        if model is not None and self.model is not None and self.model != model:
            raise UserError(
                f"the direction was fitted on {self.model} but the SAE steers {model}: fit it "
                "on the SAE's model"
            )


def diff_in_means(positive: Tensor, negative: Tensor) -> tuple[Tensor, float]:
    """Unit vector (d,) and norm of mean(positive) - mean(negative), from (P, d) and (N, d)."""
    if positive.shape[0] == 0 or negative.shape[0] == 0:
        raise UserError("a difference-in-means direction needs prompts of both classes")
    r = positive.float().mean(0) - negative.float().mean(0)
    norm = float(r.norm())
    if not norm > 0:
        raise UserError("the two classes' mean activations are equal: no direction to fit")
    return r / norm, norm


def fit_direction(
    model,
    tokenizer,
    positive: Sequence,
    negative: Sequence,
    *,
    sae,
    layer: int | None = None,
    pool: DirectionPool = "mean",
    batch_size: int = 8,
    model_name: str | None = None,
    fitted_on: dict | None = None,
) -> Direction:
    """The difference-in-means direction between prompts that should be refused (``positive``)
    and prompts that should not, read at the SAE's layer as a gate reads prompts (``pool``)."""
    from .gate import pooled_activations
    from .hooks import sae_layer

    if pool not in ("mean", "last"):
        raise UserError(f"a direction's pool must be mean or last, got {pool!r}")
    layer = sae_layer(sae) if layer is None else int(layer)
    kw = dict(sae=sae, layer=layer, batch_size=batch_size, pool=pool)
    pos = pooled_activations(model, tokenizer, list(positive), **kw)  # (P, d)
    neg = pooled_activations(model, tokenizer, list(negative), **kw)  # (N, d)
    vector, scale = diff_in_means(pos, neg)
    info = {"n_positive": len(positive), "n_negative": len(negative), **(fitted_on or {})}
    return Direction(vector, scale, layer, model_name, pool, info)


def random_direction(d_in: int, seed: int = 0) -> Tensor:
    """(d_in,) a unit vector drawn uniformly on the sphere, the same for the same seed."""
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(d_in, generator=g)
    return v / v.norm()
