"""The ViT baseline: Hugging Face ``ViTForImageClassification`` with the shape of a ViR (no torchvision needed).

Same width, depth, heads, FFN width, patch size and LayerNorm epsilon as the ViR it is compared with; it
differs in what the paper changes: softmax attention over all tokens, the class token first, no LayerScale.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from transformers import ViTConfig, ViTForImageClassification

from .vir import ViRConfig


def classification_loss(labels: Tensor, logits: Tensor, config: Any = None, **kwargs: Any) -> Tensor:
    """The loss of :meth:`ImageClassifier.classify`, in transformers' signature: cross-entropy against class
    indices (B,) or class probabilities (B, num_classes) (MixUp's soft targets, which transformers' own loss would
    take for multi-label ones)."""
    return F.cross_entropy(logits, labels)


def vit_like(config: ViRConfig) -> ViTForImageClassification:
    """A ViT of the same size as the ViR of ``config`` (its parameter count differs by LayerScale only)."""
    vit = ViTConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.in_channels,
        hidden_size=config.dim_model,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.ffn_dim,
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        layer_norm_eps=config.norm_eps,
        num_labels=config.num_classes,
    )
    model = ViTForImageClassification(vit)
    model.loss_function = classification_loss
    return model
