"""ImageClassifier: what the vision models (ViR, RMT) share around their own layers."""

from __future__ import annotations

import torch.nn.functional as F
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
