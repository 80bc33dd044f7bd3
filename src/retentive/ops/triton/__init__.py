"""Fused retention kernels in Triton; ``chunkwise`` and ``recurrent`` have the signatures of ``reference``."""

from .chunk import chunkwise
from .recurrent import decode_step, recurrent, recurrent_step

__all__ = ["chunkwise", "decode_step", "recurrent", "recurrent_step"]
