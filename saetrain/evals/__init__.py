"""Evaluations: refusal steering against its baselines (arms, trade-off curves), and the
feature statistics that give steering strengths a fixed meaning.

The older evaluation code still lives in :mod:`saetrain.steering` (``evaluate``, ``report``,
``capability``); a later redesign moves it here.
"""

from .arms import ARM_KINDS, FIXED_REFUSAL, SAFETY_SYSTEM_PROMPT, ArmConfig, DirectionConfig
from .fitting import check_apart, fitting_sets

__all__ = [
    "ARM_KINDS",
    "ArmConfig",
    "DirectionConfig",
    "FIXED_REFUSAL",
    "SAFETY_SYSTEM_PROMPT",
    "check_apart",
    "fitting_sets",
]
