"""RetNetForCausalLM under transformers' own ``Trainer``, as its users train it: gradient accumulation weighs every
token alike (the model takes ``num_items_in_batch``), ``activation_checkpointing=True`` takes the same steps, and
documents packed into rows (``DataCollatorWithFlattening``) take the steps of the same documents padded on the
right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retentive import RetNetConfig, RetNetForCausalLM

transformers = pytest.importorskip("transformers")

V = 64


def rows() -> list[dict[str, torch.Tensor]]:
    """16 sequences whose labels ignore a different share of each (a prompt masked out, say)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, ids in enumerate(torch.randint(0, V, (16, 16), generator=gen)):
        labels = ids.clone()
        labels[: (i * 5) % 15] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def trained(
    out: Path, dropout: float = 0.0, train_dataset: list | None = None, data_collator=None, **args
) -> dict[str, torch.Tensor]:
    """The weights after 2 optimizer steps of transformers' Trainer (no shuffling: every run sees the same rows)."""
    torch.manual_seed(0)
    model = RetNetForCausalLM(RetNetConfig(vocab_size=V, dim_model=32, num_layers=2, num_heads=4, dropout=dropout))
    arguments = transformers.TrainingArguments(
        out, max_steps=2, learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", seed=3,
        disable_tqdm=True, train_sampling_strategy="sequential", **args,
    )  # fmt: skip
    data = rows() if train_dataset is None else train_dataset
    transformers.Trainer(model=model, args=arguments, train_dataset=data, data_collator=data_collator).train()
    assert model.is_activation_checkpointing == args.get("activation_checkpointing", False)
    return model.state_dict()


def test_gradient_accumulation_takes_the_steps_of_the_whole_batch(tmp_path: Path) -> None:
    """4 x 2 accumulated micro-batches, each with its own share of ignored labels, step as batches of 8 do: the
    Trainer divides each micro-batch's summed loss by the targets of the whole step, not by its own."""
    whole = trained(tmp_path / "whole", per_device_train_batch_size=8)
    accumulated = trained(tmp_path / "accumulated", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    for name, weight in whole.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointing_takes_the_same_steps(tmp_path: Path) -> None:
    """``TrainingArguments(activation_checkpointing=True)``, as a transformers user turns it on: the same weights
    after the same steps, dropout included."""
    plain = trained(tmp_path / "plain", dropout=0.1, per_device_train_batch_size=8)
    checkpointed = trained(tmp_path / "ac", dropout=0.1, per_device_train_batch_size=8, activation_checkpointing=True)
    for name, weight in plain.items():
        torch.testing.assert_close(checkpointed[name], weight, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("markers", [{}, {"return_flash_attn_kwargs": True, "return_seq_idx": True}])
def test_packed_documents_take_the_steps_of_the_same_documents_padded(tmp_path: Path, markers: dict) -> None:
    """Documents of 2 to 15 tokens, 8 a step: packed into one row by ``DataCollatorWithFlattening`` (position_ids
    restarting at each; with ``markers``, also seq_idx and FlashAttention's cu_seq_lens) or padded on the right
    (transformers' collators' side, the padding's labels ignored), the Trainer takes the same steps: no document
    reads another, and no padding counts."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 16, (16,), generator=gen).tolist()
    docs = [torch.randint(0, V, (n,), generator=gen).tolist() for n in lengths]
    docs = [{"input_ids": d, "labels": d} for d in docs]

    def padded(batch: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(b["input_ids"]) for b in batch)
        right = [[0] * (T - len(b["input_ids"])) for b in batch]
        return {
            "input_ids": torch.tensor([b["input_ids"] + p for b, p in zip(batch, right, strict=True)]),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + p for b, p in zip(batch, right, strict=True)]),
            "labels": torch.tensor([b["labels"] + [-100] * len(p) for b, p in zip(batch, right, strict=True)]),
        }

    args = dict(per_device_train_batch_size=8, train_dataset=docs)
    flat = trained(tmp_path / "flat", data_collator=transformers.DataCollatorWithFlattening(**markers), **args)
    right = trained(tmp_path / "right", data_collator=padded, **args)
    for name, weight in right.items():
        torch.testing.assert_close(flat[name], weight, rtol=1e-5, atol=1e-6, msg=name)
