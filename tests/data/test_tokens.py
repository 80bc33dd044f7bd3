"""Memory-mapped token files (cached by content hash) and the resumable, distributed window samplers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retentive.data import ByteTokenizer, EvalWindows, IndexSampler, TensorBatches, TokenWindows, tokenize_corpus
from retentive.data.tokens import window_batch

DOCS = ["To be, or not to be: that is the question.\n", "Shall I compare thee to a summer's day?\n" * 3]


def test_token_file_holds_every_document_split_and_is_cached(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    splits = tokenize_corpus(DOCS, tok, tmp_path, val_fraction=0.25)
    assert isinstance(splits.train, np.memmap) and splits.train.dtype == np.uint16
    eos = tok.eos_id
    train_docs = np.split(np.asarray(splits.train), np.flatnonzero(splits.train == eos) + 1)[:-1]
    val_docs = np.split(np.asarray(splits.val), np.flatnonzero(splits.val == eos) + 1)[:-1]
    for doc, head, tail in zip(DOCS, train_docs, val_docs, strict=True):
        ids = tok.encode(doc)
        assert head[-1] == eos and tail[-1] == eos
        assert head[:-1].tolist() + tail[:-1].tolist() == ids
        assert len(tail) - 1 == round(0.25 * len(ids))
    mtime = (splits.directory / "train.bin").stat().st_mtime_ns
    again = tokenize_corpus(DOCS, tok, tmp_path, val_fraction=0.25)
    assert again.directory == splits.directory and (again.directory / "train.bin").stat().st_mtime_ns == mtime
    assert tokenize_corpus(DOCS, tok, tmp_path, val_fraction=0.1).directory != splits.directory
    assert tokenize_corpus(DOCS[:1], tok, tmp_path, val_fraction=0.25).directory != splits.directory


def test_large_vocabularies_use_uint32(tmp_path: Path) -> None:
    class WideBytes(ByteTokenizer):
        vocab_size = 70_000
        eos_id = 69_999

        def fingerprint(self) -> str:
            return "wide"

    splits = tokenize_corpus(DOCS, WideBytes(), tmp_path, val_fraction=0.0)
    assert splits.train.dtype == np.uint32 and splits.train[-1] == 69_999 and len(splits.val) == 0


def test_windows_are_contiguous_and_resume_at_their_position() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    data = TokenWindows(tokens, seq_len=10, batch_size=4, seed=0)
    batch = data.next_batch()["input_ids"]
    assert batch.shape == (4, 11) and batch.dtype == torch.int64
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(4, 10, dtype=torch.int64))
    assert (batch[:, 0] % 10 == 0).all()
    state = data.state_dict()
    want = [data.next_batch()["input_ids"] for _ in range(30)]  # crosses an epoch boundary (99 windows)
    resumed = TokenWindows(tokens, seq_len=10, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch()["input_ids"], w) for w in want)
    with pytest.raises(ValueError, match="same data and seed"):
        TokenWindows(tokens, seq_len=10, batch_size=4, seed=1).load_state_dict(state)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 5), world=st.integers(1, 3), seed=st.integers(0, 3))
def test_ranks_together_see_what_one_process_sees(n: int, batch: int, world: int, seed: int) -> None:
    single = IndexSampler(n, batch * world, seed)
    ranks = [IndexSampler(n, batch, seed, rank=r, world_size=world) for r in range(world)]
    for _ in range(4):
        assert np.concatenate([r.next_indices() for r in ranks]).tolist() == single.next_indices().tolist()
    # one epoch visits every item once
    epoch = IndexSampler(n, 1, seed)
    assert sorted(int(epoch.next_indices()[0]) for _ in range(n)) == list(range(n))


def test_eval_windows_are_fixed_and_shared_between_ranks() -> None:
    tokens = np.arange(500, dtype=np.uint16)
    alone = [b["input_ids"] for b in EvalWindows(tokens, seq_len=10, batch_size=4, max_batches=3)]
    assert len(alone) == 3 and torch.equal(alone[0][:, 0], torch.tensor([0, 10, 20, 30]))
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(alone, EvalWindows(tokens, 10, 4, 3), strict=True))
    halves = [list(EvalWindows(tokens, 10, 2, 3, rank=r, world_size=2)) for r in range(2)]
    for b, (r0, r1) in enumerate(zip(*halves, strict=True)):
        assert torch.equal(torch.cat([r0["input_ids"], r1["input_ids"]]), alone[b])


def test_documents_restart_their_positions_after_each_end_of_text() -> None:
    """With an end-of-text id, each window's position_ids restart at 0 on every end-of-text (which opens the next
    document), in training and evaluation windows alike; without one, no position_ids."""
    eos = 9
    windows = np.array([[1, 2, eos, 3, 4, eos, eos, 5], [eos, 6, 7, 8, 1, 2, 3, 4]])
    batch = window_batch(windows, eos)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert batch["input_ids"] is batch["labels"] and "position_ids" not in window_batch(windows)

    tokens = np.tile(np.array([1, 2, 3, eos], dtype=np.uint16), 50)  # documents of 3 tokens and their end
    for data in (
        TokenWindows(tokens, seq_len=10, batch_size=4, eos_id=eos).next_batch(),
        next(iter(EvalWindows(tokens, 10, 4, eos_id=eos))),
    ):
        ids, positions = data["input_ids"], data["position_ids"]
        at_eos = ids == eos
        assert (positions[at_eos] == 0).all() and (positions[:, 0] == 0).all()
        assert (positions[:, 1:][~at_eos[:, 1:]] == positions[:, :-1][~at_eos[:, 1:]] + 1).all()


def test_too_little_data_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter --seq-len"):
        TokenWindows(np.arange(8, dtype=np.uint16), seq_len=10, batch_size=2)
    with pytest.raises(ValueError, match="share their first dimension"):
        TensorBatches({"x": torch.zeros(3, 2), "y": torch.zeros(4)}, batch_size=2)
