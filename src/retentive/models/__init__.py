"""Models built on :mod:`retentive.layers`; they know nothing of how retention is computed."""

from .retnet import RetNet
from .rmt import RMT_PRESETS, RMTConfig, RMTForImageClassification
from .vir import VIR_PRESETS, ViRConfig, ViRForImageClassification

__all__ = [
    "RMT_PRESETS",
    "VIR_PRESETS",
    "RMTConfig",
    "RMTForImageClassification",
    "RetNet",
    "ViRConfig",
    "ViRForImageClassification",
]
