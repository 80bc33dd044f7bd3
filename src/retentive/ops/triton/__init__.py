"""Fused retention kernels in Triton; ``chunkwise`` and ``recurrent`` have the signatures of ``reference``."""

from .chunk import chunkwise
from .recurrent import recurrent, recurrent_step

__all__ = ["chunkwise", "recurrent", "recurrent_step"]
