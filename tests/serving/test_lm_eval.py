"""lm-evaluation-harness against ``retentive serve``: its ``local-completions`` model, talking to the server over
HTTP, scores a small local multiple-choice task exactly as its ``hf`` model does on the same checkpoint loaded in
process (the same log-likelihood per choice, the same accuracy); token-id and text prompts, alone and in batches."""

from __future__ import annotations

import json

import pytest
from servekit import running, tiny_model

from retentive.data import ByteTokenizer
from retentive.serving import ServeConfig, build_app, load_checkpoint

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lm_eval[api]')")

TASK = "retentive_tiny_choice"
DOCS = [  # question, choices, index of the right one: a random model gets some right, which is all the test needs
    ("The capital of France is", ["Paris", "Rome", "a small dog"], 0),
    ("Two plus two equals", ["four", "seven", "blue"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin", "o'clock"], 0),
    ("The opposite of hot is", ["warm", "cold"], 1),
    ("Bees make", ["milk", "silk", "honey"], 2),
    ("A week has seven", ["days", "weeks", "years"], 0),
    ("Déjà vu is a phrase from", ["French", "German", "Latin"], 0),  # multi-byte characters
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved checkpoint (model, tokenizer) and a task folder whose one task reads a jsonl file beside it."""
    root = tmp_path_factory.mktemp("lm_eval")
    tiny_model("retnet").save_pretrained(root / "ckpt")
    ByteTokenizer().save(root / "ckpt")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in DOCS))
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n  cache_dir: {root / 'datasets'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return root


def evaluate(workdir, model: str, model_args: dict) -> tuple[float, list[list[float]]]:
    """lm-eval's accuracy on the task, and each document's log-likelihood per choice, in document order."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(workdir / "tasks"), include_defaults=False),
        log_samples=True,
    )
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out["results"][TASK]["acc,none"], [[resp[0] for resp in s["filtered_resps"]] for s in samples]


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def hf_result(workdir, offline):
    return evaluate(workdir, "hf", {"pretrained": str(workdir / "ckpt"), "device": "cpu", "dtype": "float32"})


@pytest.fixture(scope="module")
def served(workdir, offline):
    model, tokenizer = load_checkpoint(workdir / "ckpt")  # as `retentive serve CHECKPOINT` loads it
    with running(build_app(model, tokenizer, "tiny", ServeConfig(max_batch=4, prefill_chunk=16))) as url:
        yield url


@pytest.mark.parametrize(("batch_size", "tokenized"), [(1, True), (3, True), (3, False)])
def test_local_completions_scores_as_the_hf_model(workdir, hf_result, served, batch_size, tokenized):
    args = {
        "model": "tiny",
        "base_url": f"{served}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(workdir / "ckpt"),
        "tokenized_requests": tokenized,
        "batch_size": batch_size,
        "num_concurrent": 1,
        "max_retries": 1,
    }
    acc, loglikelihoods = evaluate(workdir, "local-completions", args)
    hf_acc, hf_loglikelihoods = hf_result
    assert [len(doc) for doc in loglikelihoods] == [len(choices) for _, choices, _ in DOCS]
    for got, want in zip(loglikelihoods, hf_loglikelihoods, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    assert acc == hf_acc
