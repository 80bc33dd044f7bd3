"""Fused retention kernels in Triton, each with the signature of its plain form in ``reference``."""

from .chunk import chunkwise

__all__ = ["chunkwise"]
