"""RMT and ViR in timm: ``timm.create_model("rmt_t", num_classes=10)`` once retentive is imported, when timm is
installed (nothing here imports timm otherwise).

Each preset is a timm name: ``-`` becomes ``_`` and ``/`` becomes ``_patch`` (``rmt-t`` -> ``rmt_t``,
``vir-small/16`` -> ``vir_small_patch16``); keyword arguments are config fields (``num_classes``,
``in_channels``, ``image_size``...). The models carry timm's interface themselves (``forward_features``,
``forward_head``, ``reset_classifier``, ``get_classifier``, ``num_features``, ``pretrained_cfg``, ``feature_info``,
see :class:`~retentive.models.image_classifier.ImageClassifier`); ``features_only=True`` gives
:class:`FeatureMaps`. There are no timm weights: convert the official RMT checkpoints (``retentive convert``) and
load them with ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from .image_classifier import ImageClassifier
from .rmt import RMT_PRESETS, RMTForImageClassification
from .vir import VIR_PRESETS, ViRForImageClassification

logger = logging.getLogger(__name__)

# the arguments timm's create_model passes that are not config fields
TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def timm_name(preset: str) -> str:
    """``rmt-t`` -> ``rmt_t``, ``vir-small/16`` -> ``vir_small_patch16``."""
    return preset.replace("/", "_patch").replace("-", "_")


class FeatureMaps(nn.Module):
    """timm's ``features_only`` model (as its ``FeatureGetterNet``): images (B, C, H, W) -> the feature maps of
    ``out_indices`` (all by default), with timm's ``feature_info`` (``.channels()``, ``.reduction()``) describing
    them. The model is pruned first (``prune_intermediate_layers``): what the maps do not need, the classifier
    included, is gone.

    Args:
        model: the classifier whose maps these are.
        out_indices: which of ``model.feature_info``'s maps (RMT: stages; ViR: blocks), negative from the end.
    """

    def __init__(self, model: ImageClassifier, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        from timm.models._features import FeatureInfo

        self.out_indices = model.prune_intermediate_layers(out_indices, prune_norm=True)  # maps unnormalized
        self.model = model
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(pixel_values, self.out_indices, intermediates_only=True)


def entrypoint(cls: type[ImageClassifier], preset: str) -> Callable[..., nn.Module]:
    """The function timm's ``create_model`` calls for ``preset`` of ``cls``, named as timm names it."""

    def create(
        pretrained: bool = False, features_only: bool = False, out_indices: Sequence[int] | None = None, **fields: Any
    ) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"pretrained=True: retentive has no timm weights for {preset}; convert the official checkpoint "
                "(retentive convert RMT-T.pth out/) and load it with from_pretrained"
            )
        fields = {k: v for k, v in fields.items() if k not in TIMM_ONLY}
        model = cls(cls.config_class.from_preset(preset, **fields))
        return FeatureMaps(model, out_indices) if features_only else model

    create.__name__ = create.__qualname__ = timm_name(preset)
    create.__doc__ = f"{cls.__name__} of the preset {preset!r}; keyword arguments are config fields."
    return create


def register_timm_models() -> bool:
    """Register every RMT and ViR preset with timm if timm imports; True if it did. Run by ``import retentive``."""
    if importlib.util.find_spec("timm") is None:
        return False
    try:
        from timm.models import register_model
    except (
        Exception
    ) as e:  # e.g. a torchvision wheel built for another torch: "operator torchvision::nms does not exist"
        logger.debug("timm does not import (%s): RMT and ViR are not registered with it", e)
        return False
    for cls, presets in ((RMTForImageClassification, RMT_PRESETS), (ViRForImageClassification, VIR_PRESETS)):
        for preset in presets:
            fn = entrypoint(cls, preset)
            fn.__module__ = __name__
            register_model(fn)
    return True
