"""nn.Modules built on :mod:`retentive.ops`: projections, gates, norms. They know nothing of tokens."""

from .block import RetNetBlock
from .conv import ConvFeedForward, ConvStem, DepthwiseConv2d, PatchMerging
from .feedforward import ACTIVATIONS, FeedForward
from .form import Form
from .layer_scale import LayerScale
from .masa import ManhattanSelfAttention, MaSA, MaSAD
from .retention import GATES, HEAD_NORMS, HeadNorm, MultiScaleRetention, positions_of
from .rmt_block import RMTBlock

__all__ = [
    "ACTIVATIONS",
    "GATES",
    "HEAD_NORMS",
    "ConvFeedForward",
    "ConvStem",
    "DepthwiseConv2d",
    "FeedForward",
    "Form",
    "HeadNorm",
    "LayerScale",
    "MaSA",
    "MaSAD",
    "ManhattanSelfAttention",
    "MultiScaleRetention",
    "PatchMerging",
    "RMTBlock",
    "RetNetBlock",
    "positions_of",
]
