"""A saved folder loads where retentive was never imported: transformers' Auto classes (trust_remote_code=True) and
AutoTokenizer, and a text-generation pipeline batches prompts of different lengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from freshproc import run_fresh

from retentive import RetNetConfig, RetNetForCausalLM
from retentive.data import ByteTokenizer, train_bpe

TEXT = "the quick brown fox jumps over the lazy dog; hello world, and good night to all. " * 40


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model and its BPE, saved as `retentive train` saves a checkpoint (save_pretrained + tokenizer.save)."""
    folder = tmp_path_factory.mktemp("saved")
    tokenizer = train_bpe([TEXT], vocab_size=300)
    eos = tokenizer.eos_id
    config = RetNetConfig(vocab_size=300, dim_model=32, num_layers=2, num_heads=4, ffn_dim=64, chunk_size=4)
    config.eos_token_id = config.bos_token_id = config.pad_token_id = eos
    torch.manual_seed(0)
    RetNetForCausalLM(config).save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def test_auto_classes_load_the_folder_in_a_process_that_never_imported_retentive(saved: Path, tmp_path: Path) -> None:
    assert json.loads((saved / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    result = run_fresh(
        f"""
        import json, sys
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        assert "retentive" not in sys.modules
        try:
            AutoModelForCausalLM.from_pretrained({str(saved)!r})
            refused = ""
        except (ValueError, OSError) as e:
            refused = str(e)
        model = AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True).eval()
        config = AutoConfig.from_pretrained({str(saved)!r}, trust_remote_code=True)
        ids = torch.arange(1, 11)[None]
        print("RESULT", json.dumps({{"refused": refused, "class": type(model).__name__, "config": type(config).__name__,
                          "logits": model(ids).logits[0, -1, :5].tolist()}}))
        """,
        tmp_path,
    )
    assert "trust_remote_code=True" in result["refused"]  # without it: the error says what to pass
    assert (result["class"], result["config"]) == ("RetNetForCausalLM", "RetNetConfig")
    model = RetNetForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        want = model(torch.arange(1, 11)[None]).logits[0, -1, :5]
    torch.testing.assert_close(torch.tensor(result["logits"]), want, rtol=1e-5, atol=1e-5)


def test_the_saved_tokenizer_lets_a_pipeline_batch_prompts(saved: Path, tmp_path: Path) -> None:
    result = run_fresh(
        f"""
        import json
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        tokenizer = AutoTokenizer.from_pretrained({str(saved)!r})
        model = AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True)
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, batch_size=2)
        prompts = ["the quick brown fox jumps over", "hello", "good night to", "the lazy dog; hello world, and"]
        kw = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
        batched = [r[0]["generated_text"] for r in pipe(prompts, **kw)]
        alone = [pipe(p, **kw)[0]["generated_text"] for p in prompts]
        special = [tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token, tokenizer.padding_side]
        print("RESULT", json.dumps({{"batched": batched, "alone": alone, "special": special}}))
        """,
        tmp_path,
    )
    assert result["special"] == ["<|endoftext|>"] * 3 + ["left"]
    assert result["batched"] == result["alone"]  # left padding: every row as it would be alone
    assert any(result["batched"])


def test_every_saved_tokenizer_loads_in_transformers_with_the_same_ids(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    text = "héllo wörld, 日本語\n\tand bytes"
    for name, tokenizer in (("bytes", ByteTokenizer()), ("bpe", train_bpe([TEXT, text], vocab_size=300))):
        tokenizer.save(tmp_path / name)
        loaded = AutoTokenizer.from_pretrained(tmp_path / name)
        assert loaded(text)["input_ids"] == tokenizer.encode(text), name
        assert loaded.decode(tokenizer.encode(text)) == text
        assert loaded.eos_token_id == loaded.pad_token_id == tokenizer.eos_id


def test_a_text_classification_pipeline_loads_the_language_models_folder(saved: Path, tmp_path: Path) -> None:
    """The fine-tuning route: the language model's folder loads as a classifier (the backbone kept, a new head) where
    retentive was never imported, and the pipeline scores padded batches as it scores each text alone."""
    result = run_fresh(
        f"""
        import json, sys
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
        assert "retentive" not in sys.modules
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained({str(saved)!r}, trust_remote_code=True, num_labels=3)
        tokenizer = AutoTokenizer.from_pretrained({str(saved)!r})
        pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None, batch_size=2)
        texts = ["the quick brown fox jumps over", "hello", "good night to", "the lazy dog; hello world, and"]
        scores = lambda results: [[d["score"] for d in sorted(r, key=lambda d: d["label"])] for r in results]
        print("RESULT", json.dumps({{"class": type(model).__name__, "batched": scores(pipe(texts)),
                                     "alone": [scores(pipe([t]))[0] for t in texts]}}))
        """,
        tmp_path,
    )
    assert result["class"] == "RetNetForSequenceClassification"
    torch.testing.assert_close(torch.tensor(result["batched"]), torch.tensor(result["alone"]), rtol=1e-5, atol=1e-6)
    assert all(len(r) == 3 and abs(sum(r) - 1) < 1e-4 for r in result["batched"])
