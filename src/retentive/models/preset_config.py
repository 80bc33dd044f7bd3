"""PresetConfig: the ``PretrainedConfig`` base of every model config (named sizes, aliases, derived fields,
validation), BackboneConfig for the vision models (transformers' backbone fields), and the field checks they
share.

A subclass declares its fields (dataclass style), ``presets`` (name -> the fields that differ from the defaults),
``attribute_map`` (alias -> field), ``derived`` with ``complete()`` for fields that follow from others, and
``validate()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin


class PresetConfig(PretrainedConfig):
    """A ``PretrainedConfig`` built from a named preset, that takes its aliases and refuses what cannot work.

    Aliases given to the constructor are renamed before ``validate()`` runs, so ``ViRConfig(dim=96)`` is checked as
    ``ViRConfig(dim_model=96)``; read or set on a config, they reach their field (``attribute_map``). A list given
    for a field whose default is a tuple becomes a tuple: ``config.json`` stores tuples as lists, and the round trip
    ``cls(**config.to_dict())`` gives back the same fields.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    derived: ClassVar[dict[str, str]] = {}  # a field left None -> the field ``complete()`` derives it from
    init_only: ClassVar[tuple[str, ...]] = ()  # arguments the constructor takes that are not fields

    def __post_init__(self, **kwargs: Any) -> None:
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                setattr(self, name, kwargs.pop(alias))
        for field in dataclasses.fields(self):
            if isinstance(field.default, tuple) and isinstance(getattr(self, field.name), list):
                setattr(self, field.name, tuple(getattr(self, field.name)))
        self.complete()
        self.validate()
        super().__post_init__(**kwargs)

    def complete(self) -> None:
        """Fill in the fields of ``derived`` that were left None (subclasses with derived fields say how)."""

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Self:
        """The preset ``name`` (see ``presets``) with fields overridden, aliases included:
        ``ViRConfig.from_preset("vir-tiny", num_classes=5)``."""
        if name not in cls.presets:
            raise ValueError(f"unknown preset {name!r} of {cls.__name__}: choose one of {tuple(cls.presets)}")
        known = {f.name for f in dataclasses.fields(cls)} | set(cls.attribute_map) | set(cls.init_only)
        if unknown := sorted(set(overrides) - known):
            raise ValueError(f"unknown config field(s) {unknown}: {cls.__name__} has {sorted(known)}")
        return cls(**cls.merge(cls.presets[name], overrides))

    @classmethod
    def merge(cls, fields: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        """``fields`` updated by ``overrides``, aliases renamed to their fields. A derived field whose source the
        overrides change (and that they do not set themselves) is left out, to be derived again from the new value
        rather than kept from the old model."""
        fields, overrides = ({cls.attribute_map.get(k, k): v for k, v in d.items()} for d in (fields, overrides))
        for name, source in cls.derived.items():
            if source in overrides and name not in overrides:
                fields.pop(name, None)
        return {**fields, **overrides}

    def validate(self) -> None:
        """Raise ValueError naming the field if this config cannot build a working model (subclasses say how)."""
        raise NotImplementedError


class BackboneConfig(BackboneConfigMixin, PresetConfig):
    """A :class:`PresetConfig` whose model also serves as transformers' backbone (``AutoBackbone``, the
    ``backbone_config`` of UperNet, DETR, Mask2Former...): ``stage_names`` are ``"stem"``, then ``"stage1"`` to
    ``"stage{num_stages}"``, and ``out_features`` (those names) or ``out_indices`` (their indices) choose the maps the
    backbone returns, the last stage by default. A subclass defines ``num_stages``.
    """

    init_only: ClassVar[tuple[str, ...]] = ("out_features", "out_indices")

    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    @property
    def num_stages(self) -> int:
        raise NotImplementedError

    def __post_init__(self, **kwargs: Any) -> None:
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        super().__post_init__(**kwargs)
        self.stage_names = ["stem", *(f"stage{i}" for i in range(1, self.num_stages + 1))]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)


def check_positive_int(name: str, value: Any) -> None:
    """A ValueError naming the field ``name`` unless ``value`` is an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_heads(dim_model: int, num_heads: int, rotary: bool) -> None:
    """A ValueError naming the fields unless ``num_heads`` split ``dim_model`` evenly, in pairs if ``rotary``."""
    if dim_model % num_heads:
        raise ValueError(
            f"dim_model ({dim_model}) must be a multiple of num_heads ({num_heads}): "
            "each head gets dim_model / num_heads key features"
        )
    if rotary and (dim_model // num_heads) % 2:
        raise ValueError(
            f"rotary needs an even head dim, got dim_model / num_heads = {dim_model // num_heads}: "
            "change dim_model or num_heads, or set rotary=False"
        )
