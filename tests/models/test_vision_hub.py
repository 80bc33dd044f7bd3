"""The vision models as their users' tools take them: a saved folder in transformers' image-classification pipeline
in a process that never imported retentive, and timm's model interface (forward_features / forward_head,
reset_classifier, the feature maps of features_only), here through retentive's own API; through timm itself in
test_timm.py."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from freshproc import run_fresh
from PIL import Image

from retentive.models import (
    RMT_PRESETS,
    VIR_PRESETS,
    RMTConfig,
    RMTForImageClassification,
    ViRConfig,
    ViRForImageClassification,
    register_timm_models,
)
from retentive.models.image_processing import ResizeCropImageProcessor

LABELS = ("tee", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
MODELS = {
    "rmt": (RMTForImageClassification, RMTConfig.from_preset("rmt-tiny-32", image_size=48)),
    "vir": (ViRForImageClassification, ViRConfig.from_preset("vir-tiny-32")),
}


def image(size: tuple[int, int] = (57, 70)) -> Image.Image:
    """A random RGB image, (height, width) odd and not square: both the resize and the crop have work to do."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pipeline_classifies_in_a_process_that_never_imported_retentive(name: str, tmp_path: Path) -> None:
    cls, config = MODELS[name]
    torch.manual_seed(0)
    config.id2label = dict(enumerate(LABELS))
    cls(config).save_pretrained(tmp_path / "saved")
    result = run_fresh(
        f"""
        import json, sys
        import numpy as np
        from PIL import Image
        from transformers import pipeline
        assert "retentive" not in sys.modules
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (57, 70, 3), dtype=np.uint8))
        pipe = pipeline("image-classification", model={str(tmp_path / "saved")!r}, trust_remote_code=True)
        top = pipe(image, top_k=10)
        logits = pipe.model(**pipe.image_processor(image, return_tensors="pt")).logits[0]
        print("RESULT", json.dumps({{"top": top, "logits": logits.tolist(), "model": type(pipe.model).__name__,
                                     "processor": type(pipe.image_processor).__name__}}))
        """,
        tmp_path,
    )
    assert (result["model"], result["processor"]) == (cls.pretrained_class, "ResizeCropImageProcessor")
    model = cls.from_pretrained(tmp_path / "saved")
    pixel_values = ResizeCropImageProcessor.for_config(config)(image())["pixel_values"]
    with torch.no_grad():
        want = model(pixel_values).logits[0]
    torch.testing.assert_close(torch.tensor(result["logits"]), want, rtol=1e-5, atol=1e-5)
    assert result["top"][0]["label"] == LABELS[want.argmax()]
    scores = {r["label"]: r["score"] for r in result["top"]}
    torch.testing.assert_close(torch.tensor([scores[label] for label in LABELS]), want.softmax(-1), atol=1e-5, rtol=0)


def test_processor_is_resize_then_centre_crop_then_standardize() -> None:
    """Against the steps written out in PIL (torchvision's Resize(int), CenterCrop, ToTensor, Normalize), for a
    grayscale model at crop_pct 1 and bilinear."""
    processor = ResizeCropImageProcessor(crop_size=32, crop_pct=1.0, interpolation="bilinear", image_mean=[0.5],
                                         image_std=[0.25])  # fmt: skip
    got = processor(image())["pixel_values"]
    resized = image().convert("L").resize((39, 32), Image.Resampling.BILINEAR)  # short side 32, long int(32 * 70 / 57)
    left = round((39 - 32) / 2)
    crop = np.asarray(resized.crop((left, 0, left + 32, 32)), dtype=np.float32) / 255
    torch.testing.assert_close(got, torch.from_numpy((crop - 0.5) / 0.25)[None, None])
    with pytest.raises(ValueError, match="crop_pct"):
        ResizeCropImageProcessor(crop_pct=1.5)
    with pytest.raises(ValueError, match="images"):
        processor("not an image")


def test_save_pretrained_refuses_labels_that_do_not_match_the_classes(tmp_path: Path) -> None:
    cls, config = MODELS["vir"]
    model = cls(ViRConfig(**{**config.to_dict(), "id2label": {0: "a", 1: "b"}}))
    with pytest.raises(ValueError, match="id2label"):
        model.save_pretrained(tmp_path)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_is_forward_head_of_forward_features(name: str) -> None:
    cls, config = MODELS[name]
    torch.manual_seed(1)
    model = cls(config).eval()
    images = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        features = model.forward_features(images)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model.forward_head(features), model.head(pooled))
        torch.testing.assert_close(model.forward_head(features), model(images).logits)
    assert features.shape[1 if name == "rmt" else 2] == model.num_features
    assert model.get_classifier() is model.head and model.num_classes == 10


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reset_classifier(name: str) -> None:
    cls, config = MODELS[name]
    model = cls(cls.config_class(**config.to_dict())).eval()
    images = torch.randn(2, 3, config.image_size, config.image_size)
    model.reset_classifier(4)
    assert model(images).logits.shape == (2, 4) and model.num_classes == model.config.num_classes == 4
    model.reset_classifier(0)  # no classifier: the logits are the pooled features
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, model.forward_head(model.forward_features(images), True))
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


def test_timm_entrypoints_build_every_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    """register_timm_models against a stand-in for timm's registry (timm itself: test_timm.py): one entry point per
    preset, named as timm names models, that builds that preset with the fields and timm arguments create_model
    passes."""
    registry = {}
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.__spec__ = importlib.machinery.ModuleSpec("timm", None)
    models.register_model = lambda fn: registry.setdefault(fn.__name__, fn)
    timm.models = models
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.models", models)
    assert register_timm_models()
    assert {"rmt_t", "rmt_s", "rmt_b", "rmt_l", "vir_small_patch16", "vir_base_patch16", "vir_tiny"} <= set(registry)
    assert len(registry) == len(RMT_PRESETS) + len(VIR_PRESETS)
    model = registry["rmt_t"](pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, num_classes=10)
    assert type(model) is RMTForImageClassification and model.config == RMTConfig.from_preset("rmt-t", num_classes=10)
    model = registry["vir_small_patch16"](num_layers=1)
    assert type(model) is ViRForImageClassification and model.config.dim_model == 384
    with pytest.raises(ValueError, match="pretrained"):
        registry["rmt_t"](pretrained=True)
    with pytest.raises(ValueError, match="drop_rate"):
        registry["rmt_t"](drop_rate=0.1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_transformers_trainer_accumulates_gradients_as_for_the_whole_batch(name: str, tmp_path: Path) -> None:
    """The Auto class model under transformers' Trainer: 2 accumulated micro-batches of 4 step as batches of 8 (the
    model's loss is a mean per image, so the Trainer must scale it for the accumulation itself; it logged twice the
    loss when the model took num_items_in_batch and ignored it). ViR's steps are the same to rounding; RMT's batch
    norms see batches of 4, so only its loss is compared, loosely."""
    from transformers import Trainer, TrainingArguments

    from retentive.models import PreTrainedRMT, PreTrainedViR

    wrapper = {"rmt": PreTrainedRMT, "vir": PreTrainedViR}[name]
    config = MODELS[name][1]
    gen = torch.Generator().manual_seed(0)
    size = config.image_size
    rows = [
        {"pixel_values": torch.randn(3, size, size, generator=gen), "labels": int(label)}
        for label in torch.randint(0, config.num_classes, (16,), generator=gen)
    ]

    def trained(out: Path, **batching) -> tuple[dict[str, torch.Tensor], float]:
        torch.manual_seed(0)
        model = wrapper(config)
        args = TrainingArguments(
            out, max_steps=2, learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", seed=3,
            disable_tqdm=True, train_sampling_strategy="sequential", logging_steps=1, **batching,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        return model.state_dict(), trainer.state.log_history[0]["loss"]

    whole, whole_loss = trained(tmp_path / "whole", per_device_train_batch_size=8)
    accumulated, accumulated_loss = trained(
        tmp_path / "accumulated", per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    if name == "rmt":  # batch statistics: micro-batches are not the batch
        assert accumulated_loss == pytest.approx(whole_loss, rel=0.05)
        return
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-4)
    for key, weight in whole.items():
        torch.testing.assert_close(accumulated[key], weight, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_auto_class_model_refuses_what_it_would_silently_ignore(name: str) -> None:
    from retentive.models import PreTrainedRMT, PreTrainedViR

    torch.manual_seed(0)
    model = {"rmt": PreTrainedRMT, "vir": PreTrainedViR}[name](MODELS[name][1]).eval()
    size = model.config.image_size
    images, labels = torch.randn(2, 3, size, size), torch.tensor([1, 4])
    with torch.no_grad():
        out = model(images, labels=labels, output_hidden_states=False, output_attentions=None)
        loss, logits = model(images, labels=labels, return_dict=False)
    torch.testing.assert_close((loss, logits), (out.loss, out.logits))
    for asked in ({"output_attentions": True}, {"num_items_in_batch": 16}):
        with pytest.raises(TypeError, match=f"not \\['{next(iter(asked))}'\\].*forward_intermediates"):
            model(images, labels=labels, **asked)


@torch.no_grad()
def test_vir_hidden_states_are_each_blocks_input_and_the_normalized_output_in_every_form() -> None:
    """output_hidden_states: the embedded tokens, each block's output (forward hooks), and the normalized output,
    the same in the parallel, chunkwise and recurrent forms; through the Auto class, and by the config's default."""
    from retentive.models import PreTrainedViR

    config = ViRConfig(image_size=48, patch_size=16, dim_model=32, num_layers=3, num_heads=4, num_classes=5)
    model = ViRForImageClassification(config).eval()
    images = torch.randn(2, 3, 48, 48)
    outputs = []
    hooks = [block.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for block in model.backbone.blocks]
    plain = model(images)
    for hook in hooks:
        hook.remove()
    want = (model.embed(images), *outputs[:-1], model.forward_features(images))
    assert plain.hidden_states is None
    for form in ({"mode": "parallel"}, {"mode": "chunkwise", "chunk_size": 4}, {"mode": "recurrent"}):
        out = model(images, output_hidden_states=True, **form)
        assert len(out.hidden_states) == 4 and all(h.shape == (2, 10, 32) for h in out.hidden_states)
        for got, expected in zip(out.hidden_states, want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-5)
    wrapped = PreTrainedViR(config, model).eval()
    for got, expected in zip(wrapped(images, output_hidden_states=True).hidden_states, want, strict=True):
        torch.testing.assert_close(got, expected)
    wrapped.config.output_hidden_states = True
    assert len(wrapped(images).hidden_states) == 4 and len(wrapped(images, return_dict=False)) == 2  # logits, hidden


@torch.no_grad()
def test_rmt_hidden_states_are_the_stems_map_and_each_stages() -> None:
    """output_hidden_states: the stem's map at stride 4, then the stages' maps (forward_stages), the last one the
    features the head reads; through the Auto class too."""
    from retentive.models import PreTrainedRMT

    cls, config = MODELS["rmt"]
    model = cls(config).eval()
    images = torch.randn(2, 3, 48, 48)
    out = model(images, output_hidden_states=True)
    stem, *stages = out.hidden_states
    torch.testing.assert_close(stem, model.stem(images).permute(0, 3, 1, 2))
    for got, expected in zip(stages, model.forward_stages(images), strict=True):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(stages[-1], model.forward_features(images))
    assert [h.shape[1] for h in out.hidden_states] == [config.dim_model[0], *config.dim_model]
    torch.testing.assert_close(out.logits, model(images).logits)
    wrapped = PreTrainedRMT(config, model).eval()
    assert len(wrapped(images, output_hidden_states=True).hidden_states) == len(config.dim_model) + 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_classes_build_and_load_the_models_in_a_process_that_imported_retentive(name: str, tmp_path: Path) -> None:
    """Importing retentive registers the vision configs with AutoModelForImageClassification and AutoBackbone:
    no trust_remote_code needed in the same process."""
    from transformers import AutoBackbone, AutoModelForImageClassification

    from retentive.models import PreTrainedRMT, PreTrainedViR, RMTBackbone, ViRBackbone

    cls, config = MODELS[name]
    torch.manual_seed(0)
    model = cls(config).eval()
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "saved"))
    assert type(loaded) is {"rmt": PreTrainedRMT, "vir": PreTrainedViR}[name]
    images = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, model(images).logits)
    assert type(AutoModelForImageClassification.from_config(config)) is type(loaded)
    assert type(AutoBackbone.from_config(config)) is {"rmt": RMTBackbone, "vir": ViRBackbone}[name]
