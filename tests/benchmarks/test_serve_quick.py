"""The serving benchmark runs end to end in quick mode: both models, cache off and on, every cell measured."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import serve


def test_quick_serving_run_writes_a_side_by_side_table(tmp_path):
    serve.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "bench_quick_serve.json").read_text())
    cells = results["cells"]
    assert len(cells) == 2 * 2 * 2 * 2  # models x cache x prompts x clients
    for cell in cells:
        assert cell["tokens_per_s"] > 0 and 0 < cell["ttft_p50"] <= cell["ttft_p99"]
        assert cell["itl_p50"] <= cell["itl_p99"] and cell["peak_rss_bytes"] > 0
    text = (tmp_path / "bench_quick_serve.md").read_text()
    assert "| prompt | clients | model | cache | tokens/s |" in text and "RetNet" in text and "Transformer" in text
    assert (tmp_path / "bench_quick_serve.png").stat().st_size > 0
