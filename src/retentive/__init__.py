"""retentive: Retentive Networks (RetNet) for language and vision in PyTorch.

The math lives in ``retentive.ops`` (``retention(q, k, v, decay, mode=...)``), the modules in
``retentive.layers`` and the models in ``retentive.models``; the README shows the API.
"""

from . import ops
from .layers import FeedForward, MultiScaleRetention, RetNetBlock
from .models import (
    RetNet,
    RetNetCache,
    RetNetConfig,
    RetNetForCausalLM,
    RetNetForSequenceClassification,
    RetNetForTokenClassification,
    RetNetModel,
    RMTBackbone,
    RMTConfig,
    RMTForImageClassification,
    ViRBackbone,
    ViRConfig,
    ViRForImageClassification,
    cache_of,
)
from .ops import RetentionState, retention

__version__ = "0.1.0"

__all__ = [
    "FeedForward",
    "MultiScaleRetention",
    "RMTBackbone",
    "RMTConfig",
    "RMTForImageClassification",
    "RetNet",
    "RetNetBlock",
    "RetNetCache",
    "RetNetConfig",
    "RetNetForCausalLM",
    "RetNetForSequenceClassification",
    "RetNetForTokenClassification",
    "RetNetModel",
    "RetentionState",
    "ViRBackbone",
    "ViRConfig",
    "ViRForImageClassification",
    "cache_of",
    "ops",
    "retention",
]
