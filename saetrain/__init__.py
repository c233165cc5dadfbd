"""saetrain: train Top-k sparse autoencoders on language-model activations, and steer with them.

The SAE is a plain ``nn.Module`` (:class:`SAE`); Lightning is only needed for training
(:class:`SAEModule`, :class:`ActivationDataModule`, ``python -m saetrain fit``).
"""

from .errors import UserError
from .optim import DecoderNormAdam
from .sae import SAE, ForwardOutput, SAEConfig, load_sae

__all__ = [
    "SAE",
    "SAEConfig",
    "ForwardOutput",
    "load_sae",
    "DecoderNormAdam",
    "SAEModule",
    "ActivationDataModule",
    "UserError",
]


def __getattr__(name: str):
    # Lightning-side classes load lazily, so `import saetrain` for inference stays light.
    if name == "SAEModule":
        from .module import SAEModule

        return SAEModule
    if name == "ActivationDataModule":
        from .data.datamodule import ActivationDataModule

        return ActivationDataModule
    raise AttributeError(f"module 'saetrain' has no attribute {name!r}")
