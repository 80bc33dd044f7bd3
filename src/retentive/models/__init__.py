"""Models built on :mod:`retentive.layers`; they know nothing of how retention is computed."""

from .retnet import RetNet

__all__ = ["RetNet"]
