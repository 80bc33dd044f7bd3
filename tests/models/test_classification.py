"""The classifiers: RetNetForSequenceClassification reads each row's last real token, whatever the padding and the
form; RetNetForTokenClassification every token; transformers' loss rules, Auto classes, Trainer and peft's SEQ_CLS;
a classifier learns a task that needs the whole text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from retentive import (
    RetNetConfig,
    RetNetForCausalLM,
    RetNetForSequenceClassification,
    RetNetForTokenClassification,
)

V, PAD = 64, 0
FORMS = ("parallel", "chunkwise", "recurrent")


def config(**overrides) -> RetNetConfig:
    fields = dict(vocab_size=V, dim_model=32, num_layers=2, num_heads=4, ffn_dim=64, chunk_size=4, num_labels=3)
    return RetNetConfig(**{**fields, "pad_token_id": PAD, **overrides})


def classifier(cls: type = RetNetForSequenceClassification, **overrides):
    torch.manual_seed(0)
    return cls(config(**overrides)).double().eval()


def rows(lengths: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]  # never PAD


def padded(texts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded with PAD on ``side`` and the attention mask."""
    T = max(len(t) for t in texts)
    ids, mask = torch.full((len(texts), T), PAD), torch.zeros(len(texts), T, dtype=torch.long)
    for i, t in enumerate(texts):
        where = slice(T - len(t), T) if side == "left" else slice(0, len(t))
        ids[i, where], mask[i, where] = t, 1
    return ids, mask


@torch.no_grad()
@pytest.mark.parametrize("mode", FORMS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_each_row_is_classified_as_it_would_be_alone(mode: str, side: str) -> None:
    model = classifier()
    texts = rows((5, 11, 1, 8))
    alone = torch.cat([model(t[None], mode="parallel").logits for t in texts])  # (B, num_labels)
    ids, mask = padded(texts, side)
    torch.testing.assert_close(model(ids, attention_mask=mask, mode=mode).logits, alone, rtol=1e-9, atol=1e-9)
    if side == "right":  # trailing pad tokens need no mask: config.pad_token_id finds the last real token
        torch.testing.assert_close(model(ids, mode=mode).logits, alone, rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_the_head_reads_the_last_real_token_and_nothing_after_it() -> None:
    model = classifier(pad_token_id=None)
    (text,) = rows((9,))
    base = model(text[None]).logits
    ids, mask = text.repeat(2, 1), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # row 1 ends at its 6th token: what follows is padding, whatever its ids
    ids[1, 6:] = torch.tensor([3, 4, 5])
    logits = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[0], base[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits[1], model(text[None, :6]).logits[0], rtol=1e-9, atol=1e-9)
    changed = text.clone()
    changed[-1] = (changed[-1] % (V - 1)) + 1  # another real last token: another answer
    assert not torch.allclose(model(changed[None]).logits, base)


@torch.no_grad()
def test_without_mask_or_pad_token_the_last_position_is_read() -> None:
    model = classifier(pad_token_id=None)
    texts = rows((7, 7))
    ids = torch.stack(texts)
    want = torch.cat([model(t[None]).logits for t in texts])
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-9, atol=1e-9)


def test_the_losses_follow_transformers_problem_types() -> None:
    ids, mask = padded(rows((4, 9, 6)), "right")
    labels = torch.tensor([2, 0, 1])
    model = classifier()
    out = model(ids, attention_mask=mask, labels=labels)
    assert model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))

    model = classifier(num_labels=1)
    target = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    out = model(ids, attention_mask=mask, labels=target)
    assert model.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), target))

    model = classifier(problem_type="multi_label_classification")
    target = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.float64)
    out = model(ids, attention_mask=mask, labels=target)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, target))
    loss, logits = model(ids, attention_mask=mask, labels=target, return_dict=False)
    torch.testing.assert_close((loss, logits), (out.loss, out.logits))


@torch.no_grad()
def test_both_classifiers_return_the_backbones_hidden_states() -> None:
    ids, mask = padded(rows((4, 9)), "left")
    for cls in (RetNetForSequenceClassification, RetNetForTokenClassification):
        model = classifier(cls)
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        want = model.model(ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states
        assert len(out.hidden_states) == model.config.num_layers + 1
        torch.testing.assert_close(out.hidden_states, want)
        assert model(ids, attention_mask=mask).hidden_states is None


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_classification_labels_every_token_from_the_text_before_it(side: str) -> None:
    model = classifier(RetNetForTokenClassification)
    texts = rows((3, 10, 7))
    ids, mask = padded(texts, side)
    labels = torch.where(mask.bool(), torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(1)), -100)
    out = model(ids, attention_mask=mask, labels=labels, mode="chunkwise")
    real = mask.bool()
    alone = torch.cat([model(t[None]).logits[0] for t in texts])  # (sum of lengths, num_labels)
    torch.testing.assert_close(out.logits[real], alone, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[real], labels[real]))
    out.loss.backward()
    assert model.score.weight.grad.abs().sum() > 0


def test_a_language_models_checkpoint_loads_as_either_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lm = RetNetForCausalLM(config()).eval()
    lm.save_pretrained(tmp_path)
    ids = torch.stack(rows((6, 6)))
    with torch.no_grad():
        hidden = lm.model(ids).last_hidden_state  # (B, T, d)
    for auto, num_labels in ((AutoModelForSequenceClassification, 2), (AutoModelForTokenClassification, 5)):
        model = auto.from_pretrained(tmp_path, num_labels=num_labels).eval()
        assert type(model).__name__ == auto.__name__.replace("AutoModel", "RetNet")
        with torch.no_grad():
            torch.testing.assert_close(model.model(ids).last_hidden_state, hidden)  # the backbone kept
            logits = model(ids).logits
        want = hidden[:, -1] if auto is AutoModelForSequenceClassification else hidden
        torch.testing.assert_close(logits, model.score(want))
        assert logits.shape[-1] == num_labels


def learnable_task(n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Texts of 6 to 16 tokens from 2..V-1, labelled by whether token 1 occurs in them, at any place: the last
    token's state must carry what came long before it."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], torch.randint(0, 2, (n,), generator=g)
    for label in labels.tolist():
        text = torch.randint(2, V, (int(torch.randint(6, 17, (1,), generator=g)),), generator=g)
        if label:
            text[torch.randint(0, len(text) - 3, (1,), generator=g)] = 1  # at least 3 tokens before the end
        texts.append(text)
    return texts, labels


def test_transformers_trainer_fine_tunes_a_classifier_that_reads_the_whole_text(tmp_path: Path) -> None:
    """The user's path: AutoModelForSequenceClassification, transformers' Trainer, right-padded batches (its
    collators' default). Held-out accuracy from chance (0.5) to above 0.9."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config(num_labels=2, num_layers=1))
    texts, labels = learnable_task(2048, seed=0)
    train = [{"input_ids": t, "labels": y} for t, y in zip(texts, labels.tolist(), strict=True)]

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = padded([b["input_ids"] for b in batch], "right")
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([b["labels"] for b in batch])}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=32,
        num_train_epochs=3,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=train, data_collator=collate).train()
    test_texts, test_labels = learnable_task(512, seed=1)
    model.eval()
    with torch.no_grad():
        for side in ("right", "left"):
            ids, mask = padded(test_texts, side)
            accuracy = (model(ids, attention_mask=mask).logits.argmax(-1) == test_labels).double().mean().item()
            assert accuracy > 0.9, (side, accuracy)


def test_peft_seq_cls_trains_the_adapters_and_the_whole_head() -> None:
    peft = pytest.importorskip("peft")
    model = classifier(num_labels=2)
    head = model.score.weight.detach().clone()
    lora = peft.get_peft_model(
        model, peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"])
    )
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert any("score" in n for n in trainable)
    ids, mask = padded(rows((5, 9, 7, 3)), "right")
    labels = torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    losses = []
    for _ in range(20):
        loss = lora(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    lora.eval()
    with torch.no_grad():
        want = lora(input_ids=ids, attention_mask=mask).logits
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(ids, attention_mask=mask).logits, want)
    assert not torch.equal(merged.score.weight, head)
