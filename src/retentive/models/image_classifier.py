"""ImageClassifier: what the vision models (ViR, RMT) share around their own layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import ImageClassifierOutput


class ImageClassifier(nn.Module):
    """An image classifier: its config, logits and loss in Hugging Face's output, its parameter count.

    A subclass builds its layers after ``super().__init__(config)``; its ``forward`` returns
    ``self.classify(logits, labels)``.

    Args:
        config: the model's config, kept as ``self.config``.
    """

    config_class: type[PretrainedConfig]  # set by each subclass

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config

    @staticmethod
    def classify(logits: Tensor, labels: Tensor | None) -> ImageClassifierOutput:
        """logits (B, num_classes), labels (B,) or None -> the output, with the cross-entropy loss if labels."""
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")

    @classmethod
    def from_pretrained(cls, path: str | Path, source_config: dict[str, Any] | None = None) -> Self:
        """A model from a :meth:`save_pretrained` folder, or from a checkpoint of the official code that
        ``retentive convert`` reads (a ``.pth`` file, or a folder holding one), converted on the fly with the source
        settings ``source_config`` (see :func:`retentive.models.convert.convert`)."""
        path = Path(path)
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            model = cls(cls.config_class.from_pretrained(path), device="meta").to_empty(device="cpu")
            model.load_state_dict(load_file(path / "model.safetensors"))
            return model.eval()
        from .convert import build, convert

        model = build(*convert(path, source_config=source_config))
        if not isinstance(model, cls):
            raise ValueError(f"{path}: holds a {type(model).__name__}, not a {cls.__name__}")
        return model
