"""Corpora, tokenizers, token files and resumable samplers, all offline."""

from .corpus import read_corpus, shakespeare_files, strip_gutenberg
from .sampler import IndexSampler, TensorBatches
from .tokenizer import (
    TOKENIZERS,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)
from .tokens import EvalWindows, TokenSplits, TokenWindows, load_token_splits, tokenize_corpus

__all__ = [
    "TOKENIZERS",
    "BPETokenizer",
    "ByteTokenizer",
    "EvalWindows",
    "IndexSampler",
    "TensorBatches",
    "TokenSplits",
    "TokenWindows",
    "Tokenizer",
    "build_tokenizer",
    "gpt2_tokenizer",
    "load_token_splits",
    "load_tokenizer",
    "read_corpus",
    "shakespeare_files",
    "strip_gutenberg",
    "tokenize_corpus",
    "train_bpe",
]
