"""ImageClassifier: what the vision models (ViR, RMT) share around their own layers, timm's model interface
included; PreTrainedImageClassifier: the same model as transformers' Auto classes and pipelines load it;
PreTrainedImageBackbone: its feature maps as transformers' backbone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput, ImageClassifierOutput

from ..layers.checkpointing import TransformersCheckpointing, set_grad_checkpointing
from .image_processing import ResizeCropImageProcessor
from .remote_code import REMOTE_CODE, REMOTE_CODE_FILE, remote_code_map


def take_indices(count: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's choice of ``count`` maps: all (None), the last n (an int n) or those listed (negative from the end)
    -> their indices counted from the start, in the order asked."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 1 <= indices <= count:
            raise ValueError(f"indices: the last {indices} maps asked, but the model has {count}: ask for 1 to {count}")
        return list(range(count - indices, count))
    taken = [i + count if isinstance(i, int) and i < 0 else i for i in indices]
    if not taken or not all(isinstance(i, int) and 0 <= i < count for i in taken):
        raise ValueError(
            f"indices must list maps from {-count} to {count - 1} (the model has {count}), got {list(indices)}"
        )
    return taken


class ImageClassifier(nn.Module):
    """An image classifier: its config, logits and loss in Hugging Face's output, its parameter count.

    A subclass builds its layers after ``super().__init__(config)``, the classifier as ``self.head``; it defines
    ``forward_features`` (images -> the backbone's output; what the model computes on the way, in transformers'
    ``hidden_states``, appended to a list it is given), ``forward_head`` (that output -> pooled features -> logits),
    timm's ``feature_info`` and ``prune_intermediate_layers``, and its ``forward`` returns
    ``self.classify(logits, labels, hidden_states)``. ``forward_features`` takes ``depth``: only the first blocks or
    stages, the last one's output as it is (without a final norm, see :meth:`normalize`); timm's
    ``forward_intermediates`` is built on it here.

    Args:
        config: the model's config, kept as ``self.config``.
    """

    config_class: type[PretrainedConfig]  # set by each subclass
    pretrained_class: ClassVar[str]  # the name of its PreTrainedImageClassifier, in REMOTE_CODE
    backbone_class: ClassVar[str]  # the name of its PreTrainedImageBackbone, in REMOTE_CODE
    output_fmts: ClassVar[tuple[str, ...]] = ("NCHW",)  # forward_intermediates' layouts
    head: nn.Module

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config

    @staticmethod
    def classify(
        logits: Tensor, labels: Tensor | None, hidden_states: list[Tensor] | None = None
    ) -> ImageClassifierOutput:
        """logits (B, num_classes) and labels -> the output, with the cross-entropy loss if labels: class indices
        (B,), or class probabilities (B, num_classes) (soft targets: label smoothing, MixUp, CutMix); and the
        ``hidden_states`` that ``forward_features`` collected, as a tuple, if any."""
        loss = None if labels is None else F.cross_entropy(logits, labels)
        hidden = None if hidden_states is None else tuple(hidden_states)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def num_classes(self) -> int:
        """The classes the head scores: 0 where there is none (``reset_classifier(0)``,
        ``prune_intermediate_layers``)."""
        return self.head.out_features if isinstance(self.head, nn.Linear) else 0

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's description of the maps :meth:`forward_intermediates` gives: per map, ``num_chs`` (channels),
        ``reduction`` (stride in pixels) and ``module`` (the module whose output it is)."""
        raise NotImplementedError

    def forward_intermediates(
        self,
        pixel_values: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        **forward_kwargs: Any,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature extraction: images (B, C, H, W) -> the maps that ``feature_info`` lists (ViR: each block's
        output; RMT: each stage's before its merging), each (B, num_chs, H / reduction, W / reduction).

        Args:
            indices: which maps: all (None), the last n (an int n), or those of a sequence (negative from the end).
            norm: the backbone's final norm on each map, where it has one (ViR; RMT ends in none).
            stop_early: run nothing past the last map taken; the features returned are then that block's or
                stage's output (ViR: normalized).
            output_fmt: one of ``output_fmts``: ``"NCHW"``, or ``"NLC"`` (B, h * w, num_chs) where the model has
                tokens (ViR).
            intermediates_only: return the maps alone, not ``(features, maps)`` with the features of
                ``forward_features``.
            forward_kwargs: more arguments of ``forward_features`` (ViR: its form, ``mode`` and ``chunk_size``).
        """
        if output_fmt not in self.output_fmts:
            raise ValueError(f"output_fmt must be one of {self.output_fmts} for this model, got {output_fmt!r}")
        take = take_indices(len(self.feature_info), indices)
        depth = max(take) + 1 if stop_early else len(self.feature_info)
        hidden: list[Tensor] = []
        x = self.forward_features(pixel_values, hidden_states=hidden, depth=depth, **forward_kwargs)
        maps = [self.feature_map(hidden[1 + i], norm) for i in take]  # hidden: the stem's output first
        if output_fmt == "NLC":
            maps = [m.flatten(2).mT for m in maps]  # (B, h * w, C)
        return maps if intermediates_only else (self.normalize(x), maps)

    def feature_map(self, hidden: Tensor, norm: bool = False) -> Tensor:
        """One of ``forward_features``' ``hidden_states`` -> the feature map (B, C, h, w), with the backbone's final
        norm if ``norm`` (this default: the hidden state is the map, and there is no norm)."""
        return hidden

    def normalize(self, features: Tensor) -> Tensor:
        """The output of ``forward_features(..., depth=n)`` -> the backbone's final norm on it (this default: none)."""
        return features

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] | None = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop what :meth:`forward_intermediates` no longer needs for the maps ``indices`` (as there): the blocks or
        stages past the last, the final norm if ``prune_norm``, the classifier if ``prune_head`` (then
        ``num_classes`` is 0) or if the stages it reads are gone. Returns the maps' indices, counted from the start
        (what timm's ``features_only`` models keep). The config is left as it is: it still describes the model
        before pruning."""
        raise NotImplementedError

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """``forward_features``' output -> logits (B, num_classes), or the pooled features the classifier reads."""
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block's activations in the backward pass instead of keeping them (timm's name; see
        :class:`~retentive.layers.checkpointing.CheckpointedBlocks`)."""
        set_grad_checkpointing(self, enable)

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialized classifier for ``num_classes`` classes (0: none, logits are the pooled
        features), ``config.num_classes`` following."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        like = next(self.parameters())
        kw = {"device": like.device, "dtype": like.dtype}
        self.head = nn.Linear(self.head_hidden_size, num_classes, **kw) if num_classes else nn.Identity()
        self.config.num_classes = num_classes
        self.config.id2label = self.config.label2id = None

    @property
    def num_features(self) -> int:
        """Channels of ``forward_features``' output (timm's name)."""
        raise NotImplementedError

    @property
    def head_hidden_size(self) -> int:
        """Width of the pooled features the classifier reads (timm's name)."""
        raise NotImplementedError

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's data config: what the default preprocessing (:class:`ResizeCropImageProcessor`) does."""
        processor = ResizeCropImageProcessor.for_config(self.config)
        return {
            "input_size": (self.config.in_channels, processor.crop_size, processor.crop_size),
            "crop_pct": processor.crop_pct,
            "interpolation": processor.interpolation,
            "mean": tuple(processor.image_mean),
            "std": tuple(processor.image_std),
            "num_classes": self.num_classes,
            "classifier": "head",
        }

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    def save_pretrained(
        self,
        folder: str | Path,
        image_processor: ResizeCropImageProcessor | None = None,
        remote_code: bool = True,
    ) -> None:
        """Write ``config.json`` (with ``id2label``; ``LABEL_i`` where the config names no classes),
        ``model.safetensors`` and ``preprocessor_config.json`` (``image_processor``, by default
        :meth:`ResizeCropImageProcessor.for_config`) into ``folder``. With ``remote_code`` (the default), the folder
        also loads through ``pipeline("image-classification", model=folder, trust_remote_code=True)`` and the Auto
        classes in a process that never imported retentive: both files get an ``auto_map`` naming
        :data:`REMOTE_CODE_FILE`, which imports the classes from the installed package."""
        folder, config = Path(folder), self.config
        folder.mkdir(parents=True, exist_ok=True)
        if not config.id2label:
            config.id2label = {i: f"LABEL_{i}" for i in range(config.num_classes)}
        if len(config.id2label) != config.num_classes:
            raise ValueError(
                f"config.id2label names {len(config.id2label)} classes but the model has {config.num_classes}: "
                "give one name per class, or None"
            )
        config.label2id = {name: int(i) for i, name in config.id2label.items()}
        config.auto_map = (
            remote_code_map(
                AutoConfig=type(config).__name__,
                AutoModelForImageClassification=self.pretrained_class,
                AutoBackbone=self.backbone_class,
            )
            if remote_code
            else None
        )
        config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        processor = image_processor or ResizeCropImageProcessor.for_config(config)
        processor.auto_map = remote_code_map(AutoImageProcessor=type(processor).__name__) if remote_code else None
        processor.save_pretrained(folder)
        if remote_code:
            (folder / REMOTE_CODE_FILE).write_text(REMOTE_CODE)

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


class PreTrainedImageClassifier(TransformersCheckpointing, PreTrainedModel):
    """An :class:`ImageClassifier` as transformers' Auto classes and image-classification pipeline load it: a
    ``PreTrainedModel`` holding the model as ``classifier`` and passing its calls on (one definition of the model).

    Args:
        config: the model's config.
        classifier: the model to hold; by default a new one from ``config``.
    """

    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    # the loss is a mean over the images: transformers' Trainer must scale it for gradient accumulation itself rather
    # than pass num_items_in_batch (which forward's **kwargs would take and ignore, doubling the loss at 2 steps)
    accepts_loss_kwargs = False
    classifier_class: ClassVar[type[ImageClassifier]]  # set by each subclass, with config_class

    def __init__(self, config: PretrainedConfig, classifier: ImageClassifier | None = None) -> None:
        super().__init__(config)
        self.classifier = classifier if classifier is not None else self.classifier_class(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: the classifier initialized its weights when it was built (or holds loaded ones), and
        ``post_init`` would otherwise overwrite them with transformers' defaults."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any) -> Self:
        """A local folder written by ``save_pretrained`` (or anything ``ImageClassifier.from_pretrained`` reads), in
        ``dtype`` if given; the Hub and device arguments the Auto classes pass along are not used."""
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        classifier = cls.classifier_class.from_pretrained(pretrained_model_name_or_path)
        if isinstance(dtype, torch.dtype):
            classifier.to(dtype)
        return cls(classifier.config, classifier).eval()

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutput | tuple:
        """Images (B, C, H, W) -> the classifier's output (logits; loss if ``labels``; with ``output_hidden_states``,
        None following ``config.output_hidden_states``, what the model computes on the way: see each classifier's
        ``forward``), or its tuple with ``return_dict=False``. transformers' other arguments are taken where they ask
        for nothing (None, False) and refused where they would (``output_attentions``: no attention weights here)."""
        if asked := sorted(name for name, value in kwargs.items() if value is not None and value is not False):
            raise TypeError(
                f"{type(self).__name__}.forward takes pixel_values, labels, output_hidden_states and return_dict, "
                f"not {asked}; timm's feature maps: model.classifier.forward_intermediates(pixel_values)"
            )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        out = self.classifier(pixel_values, labels, output_hidden_states=output_hidden_states)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()


class PreTrainedImageBackbone(BackboneMixin, PreTrainedImageClassifier):
    """An :class:`ImageClassifier` as transformers' backbone: ``AutoBackbone``, and the ``backbone_config`` of
    UperNet, DETR, Mask2Former and the other models built on ``load_backbone``. Its ``feature_maps`` are those of
    ``config.out_features`` among ``stage_names`` (:class:`~retentive.models.preset_config.BackboneConfig`): the
    stem's output (``"stem"``) and each stage's, as ``forward_intermediates`` gives them, each (B, C, H / stride,
    W / stride); ViR's carry its final norm, as DINOv2's backbone does.

    The classifier is pruned away (``prune_intermediate_layers``), so that a trained classifier's folder loads as a
    backbone and every parameter gets a gradient (DDP refuses parameters that get none).
    """

    has_attentions = False  # transformers' forward_with_filtered_kwargs then drops output_attentions

    def __init__(self, config: PretrainedConfig, classifier: ImageClassifier | None = None) -> None:
        super().__init__(config, classifier)
        self.classifier.prune_intermediate_layers(None, prune_head=True)  # the config keeps its classes
        info = self.classifier.feature_info
        self.num_features = [info[0]["num_chs"], *(i["num_chs"] for i in info)]  # the stem: the first stage's width

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *args: Any,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs: Any,
    ) -> Self:
        """:meth:`PreTrainedImageClassifier.from_pretrained`, the maps of ``out_features`` or ``out_indices`` if given
        (as ``AutoBackbone.from_pretrained`` takes them) rather than the config's."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if out_features is not None or out_indices is not None:
            model.config.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        return model

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple:
        """Images (B, C, H, W) -> ``BackboneOutput``: ``feature_maps``, one (B, C_i, H_i, W_i) per ``out_features``;
        with ``output_hidden_states`` (None: the config's), ``hidden_states``, what ``forward_features`` collects
        (the stem's output and every stage's, as they are). Stages past the last map asked for are not run."""
        if output_attentions:
            raise ValueError(f"output_attentions=True: {type(self).__name__} computes no attention weights")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        stages = len(self.stage_names)
        indices = sorted(i % stages for i in self.out_indices)
        hidden: list[Tensor] = []
        depth = stages - 1 if output_hidden_states else max(1, indices[-1])
        self.classifier.forward_features(pixel_values, hidden_states=hidden, depth=depth)
        maps = tuple(self.classifier.feature_map(hidden[i], norm=True) for i in indices)
        out = BackboneOutput(feature_maps=maps, hidden_states=tuple(hidden) if output_hidden_states else None)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()
