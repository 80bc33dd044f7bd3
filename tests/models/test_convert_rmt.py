"""Converting the official RMT's checkpoints (qhfan/RMT, June 2024): its logits, its every key.

The fixture (tests/fixtures/rmt_official, made once by scripts/make_rmt_fixture.py from the official code, which is
not in this repository) holds a reduced model's random weights, an input and the official model's logits, and the
key names and shapes of the full RMT_T3, RMT_S, RMT_M2 and RMT_L6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retentive.cli import main as cli
from retentive.models import RMTConfig, RMTForImageClassification
from retentive.models.convert import ConversionError, build, convert
from retentive.models.convert.rmt import IGNORED, rename

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rmt_official"
ATOL = 1e-4
# the stages the reduced model decomposes (the weights cannot say)
TINY = {"decomposed": [True, True, False, False]}
OFFICIAL = {"RMT_T3": "rmt-t", "RMT_S": "rmt-s", "RMT_M2": "rmt-b", "RMT_L6": "rmt-l"}


@pytest.fixture(scope="module")
def tiny() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "tiny.safetensors")


def _save(tensors: dict[str, torch.Tensor], path: Path, entry: str | None = "model") -> Path:
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    torch.save(state if entry is None else {entry: state, "epoch": 3}, path)
    return path


def _tiny_json(folder: Path) -> str:
    """A --source-config file with the reduced model's ``decomposed``."""
    (folder / "source.json").write_text(json.dumps(TINY))
    return str(folder / "source.json")


@pytest.mark.parametrize("entry", ["model", "model_ema", "state_dict", None])
def test_logits_match_the_official_code(tiny, tmp_path: Path, entry) -> None:
    config, state, source = convert(_save(tiny, tmp_path / "RMT.pth", entry), source_config=TINY)
    model = build(config, state, source)
    assert config.num_heads == (2, 2, 4, 4) and config.heads_range == (4, 4, 6, 6) and config.initial_value == 2
    with torch.no_grad():
        logits = model(tiny["pixel_values"]).logits
    torch.testing.assert_close(logits, tiny["logits"], atol=ATOL, rtol=0)


def test_cli_writes_a_folder_from_pretrained_reads(tiny, tmp_path: Path) -> None:
    src = _save(tiny, tmp_path / "RMT.pth")
    cli(["convert", str(src), str(tmp_path / "out"), "--source-config", _tiny_json(tmp_path)])
    for path, source_config in ((tmp_path / "out", None), (src, TINY), (tmp_path, TINY)):  # folder, .pth, its folder
        model = RMTForImageClassification.from_pretrained(path, source_config=source_config)
        with torch.no_grad():
            torch.testing.assert_close(model(tiny["pixel_values"]).logits, tiny["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_every_key_of_the_named_models_is_mapped(name: str) -> None:
    """Each official key (less the recomputed buffers) lands on a key of the preset with the same shape, and every
    key of the preset is covered."""
    import re

    official = json.loads((FIXTURE / "keys.json").read_text())[name]
    ours = RMTForImageClassification(RMTConfig.from_preset(OFFICIAL[name]), device="meta").state_dict()
    mapped = {}
    for key, shape in official.items():
        if any(re.search(p, key) for p in IGNORED):
            continue
        numel = torch.Size(shape).numel()
        mapped[rename(key)] = [numel] if re.search(r"\.gamma_[12]$", key) else shape
    assert set(mapped) == set(ours)
    assert {k: list(v.shape) for k, v in ours.items()} == mapped


def test_reduced_model_needs_decomposed(tiny, tmp_path: Path) -> None:
    """Without ``decomposed`` a model of no named shape is refused, naming the option."""
    with pytest.raises(ConversionError, match="decomposed"):
        convert(_save(tiny, tmp_path / "RMT.pth"))


def test_named_model_config_from_its_weights(tmp_path: Path) -> None:
    """RMT_T3's keys with the official decay buffers convert to the rmt-t preset, decomposed stages included."""
    shapes = json.loads((FIXTURE / "keys.json").read_text())["RMT_T3"]
    state = {k: torch.zeros(shape) for k, shape in shapes.items()}
    preset = RMTConfig.from_preset("rmt-t")
    for i, (heads, spread) in enumerate(zip(preset.num_heads, preset.heads_range, strict=True)):
        exponent = preset.initial_value + spread * torch.arange(heads) / heads
        state[f"layers.{i}.Relpos.decay"] = torch.log(1 - 2**-exponent)
    torch.save({"model": state}, tmp_path / "RMT-T.pth")
    config, _, _ = convert(tmp_path / "RMT-T.pth")
    for field in ("dim_model", "num_layers", "num_heads", "heads_range", "ffn_ratio", "decomposed", "layer_scales"):
        assert tuple(getattr(config, field)) == tuple(getattr(preset, field)), field


def test_token_label_head_refused(tiny, tmp_path: Path) -> None:
    tensors = dict(tiny) | {"state.aux_head.weight": torch.zeros(10, 64), "state.aux_head.bias": torch.zeros(10)}
    with pytest.raises(ConversionError, match="aux_head"):
        convert(_save(tensors, tmp_path / "RMT.pth"), source_config=TINY)


def test_preprocessor_is_the_official_evaluation(tiny, tmp_path: Path) -> None:
    """preprocessor_config.json: resize the short side to 256 (bicubic), centre crop 224, ImageNet mean and std."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    cli(
        [
            "convert",
            str(_save(tiny, tmp_path / "RMT.pth")),
            str(tmp_path / "out"),
            "--source-config",
            _tiny_json(tmp_path),
        ]
    )
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out", trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    got = torch.as_tensor(np.asarray(processor(image, return_tensors="np")["pixel_values"]))
    resized = image.resize((341, 256), Image.BICUBIC)  # short side 224 / 0.875
    left, top = (341 - 224) // 2, (256 - 224) // 2
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = torch.as_tensor(((crop - mean) / std).transpose(2, 0, 1)[None], dtype=torch.float32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
