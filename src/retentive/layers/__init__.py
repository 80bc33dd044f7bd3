"""nn.Modules built on :mod:`retentive.ops`: projections, gates, norms. They know nothing of tokens."""

from .block import RetNetBlock
from .feedforward import ACTIVATIONS, FeedForward
from .retention import GATES, HEAD_NORMS, HeadNorm, MultiScaleRetention

__all__ = ["ACTIVATIONS", "GATES", "HEAD_NORMS", "FeedForward", "HeadNorm", "MultiScaleRetention", "RetNetBlock"]
