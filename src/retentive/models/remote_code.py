"""What a saved folder carries for transformers' ``trust_remote_code`` route: a small module that takes the classes
from the installed package, so that the Auto classes and pipelines load the folder in a process that never imported
retentive (transformers names the package to install when it is missing)."""

from __future__ import annotations

REMOTE_CODE_FILE = "retentive_auto.py"
REMOTE_CODE = '''"""Loads this folder with transformers' Auto classes (trust_remote_code=True) in a process that never
imported retentive: the classes come from the installed package (pip install retentive). Written by save_pretrained."""

from retentive.models import (
    PreTrainedRMT,
    PreTrainedViR,
    RetNetConfig,
    RetNetForCausalLM,
    RetNetForSequenceClassification,
    RetNetForTokenClassification,
    RetNetModel,
    RMTBackbone,
    RMTConfig,
    ViRBackbone,
    ViRConfig,
)
from retentive.models.image_processing import ResizeCropImageProcessor

__all__ = [
    "PreTrainedRMT",
    "PreTrainedViR",
    "RMTBackbone",
    "RMTConfig",
    "ResizeCropImageProcessor",
    "RetNetConfig",
    "RetNetForCausalLM",
    "RetNetForSequenceClassification",
    "RetNetForTokenClassification",
    "RetNetModel",
    "ViRBackbone",
    "ViRConfig",
]
'''


def remote_code_map(**classes: str) -> dict[str, str]:
    """An ``auto_map`` (config.json, preprocessor_config.json): each Auto class (``AutoModel="RetNetModel"``) -> that
    class in :data:`REMOTE_CODE_FILE`."""
    module = REMOTE_CODE_FILE.removesuffix(".py")
    return {auto: f"{module}.{name}" for auto, name in classes.items()}
