"""Fused retention kernels in Triton: a :class:`~retentive.ops.backend.RetentionBackend`, and the decoding step
in place (:func:`decode_step_`)."""

from .chunk import chunkwise
from .recurrent import decode_step, decode_step_, recurrent

__all__ = ["chunkwise", "decode_step", "decode_step_", "recurrent"]
