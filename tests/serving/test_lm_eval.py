"""lm-evaluation-harness against ``retentive serve``: its ``local-completions`` model, talking to the server over
HTTP, scores two small local tasks exactly as its ``hf`` model does on the same checkpoint loaded in process: the
same log-likelihood per choice and accuracy (multiple choice), the same greedy answers (generation); token-id and
text prompts, alone and in batches."""

from __future__ import annotations

import json

import pytest
from servekit import running, tiny_model

from retentive.data import ByteTokenizer
from retentive.serving import ServeConfig, build_app, load_checkpoint

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lm_eval[api]')")

CHOICE, GENERATE = "retentive_tiny_choice", "retentive_tiny_generate"
DOCS = [  # question, choices, index of the right one: a random model gets some right, which is all the test needs
    ("The capital of France is", ["Paris", "Rome", "a small dog"], 0),
    ("Two plus two equals", ["four", "seven", "blue"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin", "o'clock"], 0),
    ("The opposite of hot is", ["warm", "cold"], 1),
    ("Bees make", ["milk", "silk", "honey"], 2),
    ("A week has seven", ["days", "weeks", "years"], 0),
    ("Déjà vu is a phrase from", ["French", "German", "Latin"], 0),  # multi-byte characters
]
COMMON = (
    "dataset_path: json\n"
    "dataset_kwargs:\n  data_files:\n    test: {docs}\n  cache_dir: {cache}\n"
    "test_split: test\n"
    'doc_to_text: "{{{{question}}}}"\n'
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved checkpoint (model, tokenizer) and a task folder with two tasks over a jsonl file beside it: the
    choice by log-likelihood (loglikelihood requests) and a short greedy answer (generate_until requests)."""
    root = tmp_path_factory.mktemp("lm_eval")
    tiny_model("retnet").save_pretrained(root / "ckpt")
    ByteTokenizer().save(root / "ckpt")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in DOCS))
    common = COMMON.format(docs=docs, cache=root / "datasets")
    (root / "tasks").mkdir()
    (root / "tasks" / f"{CHOICE}.yaml").write_text(
        f"task: {CHOICE}\n{common}"
        "output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (root / "tasks" / f"{GENERATE}.yaml").write_text(
        f"task: {GENERATE}\n{common}"
        "output_type: generate_until\n"
        'doc_to_target: "{{choices[answer]}}"\n'
        'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return root


def evaluate(workdir, model: str, model_args: dict) -> dict[str, tuple[float, list]]:
    """Per task, lm-eval's metric (accuracy, exact match) and each document's responses in document order: the
    log-likelihood of each choice, or the generated text."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[CHOICE, GENERATE],
        task_manager=TaskManager(include_path=str(workdir / "tasks"), include_defaults=False),
        log_samples=True,
    )
    samples = {task: sorted(out["samples"][task], key=lambda s: s["doc_id"]) for task in (CHOICE, GENERATE)}
    return {
        CHOICE: (out["results"][CHOICE]["acc,none"], [[r[0] for r in s["filtered_resps"]] for s in samples[CHOICE]]),
        GENERATE: (out["results"][GENERATE]["exact_match,none"], [s["resps"][0][0] for s in samples[GENERATE]]),
    }


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
    got, want = evaluate(workdir, "local-completions", args), hf_result
    loglikelihoods, hf_loglikelihoods = got[CHOICE][1], want[CHOICE][1]
    assert [len(doc) for doc in loglikelihoods] == [len(choices) for _, choices, _ in DOCS]
    for doc, hf_doc in zip(loglikelihoods, hf_loglikelihoods, strict=True):
        assert doc == pytest.approx(hf_doc, abs=1e-4)
    assert got[CHOICE][0] == want[CHOICE][0]
    assert got[GENERATE] == want[GENERATE]  # the same greedy texts, cut at the same stop string
