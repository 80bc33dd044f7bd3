"""The language-model recipe: exact resume with RetNet itself, model configs from files, the unigram baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retentive.data import ByteTokenizer, read_corpus
from retentive.models import RetNetConfig
from retentive.training import TrainConfig
from retentive.training.lm import LMConfig, build_model_config, train_language_model, unigram_perplexity

TINY = {"dim_model": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64, "dropout": 0.1}


def test_retnet_resume_is_exact(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(read_corpus("shakespeare")[0][:20_000])
    lm = LMConfig(data=str(text), tokenizer="bytes", model_overrides=TINY, seq_len=32, batch_size=4, eval_batches=1)
    train = TrainConfig(steps=6, lr=3e-3, warmup=2, eval_interval=0, ckpt_interval=3, progress=False, device="cpu")
    cache = tmp_path / "cache"
    straight = train_language_model(lm, train, tmp_path / "a", cache_dir=cache).result.losses
    first = train_language_model(lm, train, tmp_path / "b", cache_dir=cache, stop_at=4).result.losses
    rest = train_language_model(lm, train, tmp_path / "b", resume=True, cache_dir=cache).result.losses
    assert len(rest) == 3
    np.testing.assert_array_equal(first[:3] + rest, straight)


def test_model_config_from_file_with_overrides(tmp_path: Path) -> None:
    RetNetConfig.from_preset("retnet-tiny", num_layers=3).save_pretrained(tmp_path)
    lm = LMConfig(model_config=str(tmp_path / "config.json"), model_overrides={"dropout": 0.2})
    config = build_model_config(lm, ByteTokenizer())
    assert (config.num_layers, config.dropout, config.vocab_size, config.eos_token_id) == (3, 0.2, 257, 256)
    assert json.loads((tmp_path / "config.json").read_text())["num_layers"] == 3
    with pytest.raises(ValueError, match="unknown config field"):
        build_model_config(LMConfig(model_overrides={"num_layer": 2}), ByteTokenizer())


def test_unigram_perplexity() -> None:
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 16, 100_000)
    assert unigram_perplexity(uniform, uniform[:5000], 16) == pytest.approx(16, rel=0.01)
    p = np.array([0.5, 0.25, 0.125, 0.125])
    skewed = rng.choice(4, 200_000, p=p)
    entropy = -(p * np.log(p)).sum()
    assert unigram_perplexity(skewed, skewed[:20_000], 4) == pytest.approx(np.exp(entropy), rel=0.01)
