"""Data: image classification sets (``images``)."""

from .images import DATASETS, ImageData, load_images

__all__ = ["DATASETS", "ImageData", "load_images"]
