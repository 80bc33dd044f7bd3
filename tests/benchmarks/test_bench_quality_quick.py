"""The quality benchmark runs end to end in quick mode: both models, both corpora, perplexity at T, 2T, 4T."""

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality


def test_kjv_has_one_document_per_book(tmp_path):
    if shutil.which("bible") is None:
        pytest.skip("Debian's bible-kjv is not installed (apt-get install bible-kjv)")
    books = quality.kjv_documents(tmp_path)
    assert len(books) == 66
    assert books[0].startswith("In the beginning God created the heaven and the earth.")
    assert not any(re.match(r"^\S+\d+:\d+ ", line) for book in books for line in book.splitlines())  # no references


def test_quick_quality_run_writes_a_side_by_side_table(tmp_path):
    corpora = ["shakespeare"] + (["kjv"] if shutil.which("bible") else [])
    quality.main(["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--corpora", *corpora])
    results = json.loads((tmp_path / "bench_quick_quality.json").read_text())
    for corpus in corpora:
        runs = results["corpora"][corpus]["runs"]
        params = [run["parameters"] for model in runs.values() for run in model.values()]
        assert max(params) <= 1.02 * min(params)  # the twin is matched
        for model in ("RetNet", "Transformer"):
            ppl = runs[model]["0"]["val_ppl"]
            assert set(ppl) == {"1", "2", "4"} and all(1 < p < math.inf for p in ppl.values())
    text = (tmp_path / "bench_quick_quality.md").read_text()
    assert "gap RetNet - Transformer" in text and "(4T)" in text
    assert (tmp_path / "bench_quick_quality.png").stat().st_size > 0
