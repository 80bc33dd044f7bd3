"""The language-model recipe: exact resume with RetNet itself, model configs from files, the unigram baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retentive import baselines
from retentive.data import ByteTokenizer, read_corpus
from retentive.data.tokens import window_batch
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


@pytest.mark.parametrize("preset", ["retnet-tiny", "transformer-tiny"])
def test_documents_option_reads_each_document_as_if_alone(preset: str) -> None:
    """What --documents feeds the model (window_batch with the end-of-text id): the logits of a window's second
    document (opened by the end-of-text) equal those of that document alone, for RetNet and for its Transformer twin
    (transformers' masks read packed position_ids as documents); without the option the first document changes
    them."""
    eos = 0
    torch.manual_seed(0)
    options = {**TINY, "dropout": 0.0, "vocab_size": 64, "eos_token_id": eos}
    model = baselines.model_from_preset(preset, **options).eval()
    first, second = torch.randint(1, 64, (7,)), torch.cat([torch.tensor([eos]), torch.randint(1, 64, (9,))])
    window = torch.cat([first, second])[None].numpy()
    with torch.no_grad():
        alone = model(input_ids=second[None]).logits[0]
        packed = model(**window_batch(window, eos)).logits[0, 7:]
        streamed = model(**window_batch(window)).logits[0, 7:]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    assert (streamed - alone).abs().max() > 1e-2


def test_documents_option_is_stored_with_the_run_and_trains(tmp_path: Path) -> None:
    """documents=True on a folder of short documents: the training windows restart their positions after each
    end-of-text, the run trains and stores the option in run.json; a run stored without it reads as False."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    paragraphs = read_corpus("shakespeare")[0][:20_000].split("\n\n")
    for i, paragraph in enumerate(paragraphs):
        (folder / f"{i:03d}.txt").write_text(paragraph)
    lm = LMConfig(data=str(folder), tokenizer="bytes", model_overrides=TINY, seq_len=32, batch_size=4, eval_batches=1)
    lm.documents = True
    train = TrainConfig(steps=3, lr=3e-3, warmup=1, eval_interval=0, ckpt_interval=3, progress=False, device="cpu")
    run = train_language_model(lm, train, tmp_path / "a", cache_dir=tmp_path / "cache")
    assert len(run.result.losses) == 3 and all(np.isfinite(run.result.losses))
    assert json.loads((tmp_path / "a" / "run.json").read_text())["lm"]["documents"] is True
    batch = run.trainer.train_data.next_batch()
    assert (batch["position_ids"][:, 1:] == 0).any()  # documents open inside the windows
    assert "documents" not in LMConfig().to_dict()


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
