"""Corpora, tokenizers, token files, resumable samplers, image datasets and image folders, all offline."""

from .corpus import read_corpus, shakespeare_files, strip_gutenberg
from .image_folder import FolderBatches, FolderEval, ImageFolder, index_image_folder
from .images import DATASETS as IMAGE_DATASETS
from .images import ImageData, load_images
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
    "IMAGE_DATASETS",
    "TOKENIZERS",
    "BPETokenizer",
    "ByteTokenizer",
    "EvalWindows",
    "FolderBatches",
    "FolderEval",
    "ImageData",
    "ImageFolder",
    "IndexSampler",
    "TensorBatches",
    "TokenSplits",
    "TokenWindows",
    "Tokenizer",
    "build_tokenizer",
    "gpt2_tokenizer",
    "index_image_folder",
    "load_images",
    "load_token_splits",
    "load_tokenizer",
    "read_corpus",
    "shakespeare_files",
    "strip_gutenberg",
    "tokenize_corpus",
    "train_bpe",
]
