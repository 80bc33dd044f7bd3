"""Models built on :mod:`retentive.layers`; they know nothing of how retention is computed."""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .cache_retnet import CACHE_NAME, RetNetCache, cache_of, export_decode_step
from .configuration_retnet import PRESETS, RetNetConfig
from .modeling_retnet import (
    RetNetForCausalLM,
    RetNetForSequenceClassification,
    RetNetForTokenClassification,
    RetNetModel,
    RetNetPreTrainedModel,
)
from .retnet import RetNet
from .rmt import RMT_PRESETS, PreTrainedRMT, RMTBackbone, RMTConfig, RMTForImageClassification
from .timm_models import register_timm_models
from .vir import VIR_PRESETS, PreTrainedViR, ViRBackbone, ViRConfig, ViRForImageClassification

AutoConfig.register(RetNetConfig.model_type, RetNetConfig, exist_ok=True)
AutoConfig.register(ViRConfig.model_type, ViRConfig, exist_ok=True)
AutoConfig.register(RMTConfig.model_type, RMTConfig, exist_ok=True)
AutoModel.register(RetNetConfig, RetNetModel, exist_ok=True)
AutoModelForCausalLM.register(RetNetConfig, RetNetForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(RetNetConfig, RetNetForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(RetNetConfig, RetNetForTokenClassification, exist_ok=True)
AutoModelForImageClassification.register(RMTConfig, PreTrainedRMT, exist_ok=True)
AutoModelForImageClassification.register(ViRConfig, PreTrainedViR, exist_ok=True)
AutoBackbone.register(RMTConfig, RMTBackbone, exist_ok=True)
AutoBackbone.register(ViRConfig, ViRBackbone, exist_ok=True)
register_timm_models()  # timm.create_model("rmt_t"), where timm is installed

__all__ = [
    "CACHE_NAME",
    "PRESETS",
    "RMT_PRESETS",
    "VIR_PRESETS",
    "PreTrainedRMT",
    "PreTrainedViR",
    "RMTBackbone",
    "RMTConfig",
    "RMTForImageClassification",
    "RetNet",
    "RetNetCache",
    "RetNetConfig",
    "RetNetForCausalLM",
    "RetNetForSequenceClassification",
    "RetNetForTokenClassification",
    "RetNetModel",
    "RetNetPreTrainedModel",
    "ViRBackbone",
    "ViRConfig",
    "ViRForImageClassification",
    "cache_of",
    "export_decode_step",
    "register_timm_models",
]
