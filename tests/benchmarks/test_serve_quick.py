"""The serving benchmark runs end to end in quick mode: every server, shape and request rate measured, with vLLM's
metrics, finite and positive where they must be (never a speed ratio: that is the full run's to report)."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import serve

LATENCIES = [f"{m}_{s}" for m in ("ttft", "tpot", "itl", "e2e") for s in ("mean", "p50", "p99")]
THROUGHPUTS = ["request_throughput", "output_throughput", "total_token_throughput", "duration_s"]


def test_quick_serving_run_reports_vllms_metrics_for_every_cell(tmp_path):
    serve.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "bench_quick_serve.json").read_text())
    plan, cells = results["plan"], results["cells"]
    keys = {(c["server"], c["input_len"], c["output_len"], c["request_rate"]) for c in cells}
    want = {(s, *shape, r) for s in serve.SERVERS for shape in plan["shapes"] for r in plan["request_rates"]}
    assert keys == want and len(cells) == len(want)
    for cell in cells:
        assert cell["completed"] == plan["num_prompts"]
        for metric in THROUGHPUTS + LATENCIES + ["peak_rss_bytes"]:
            assert math.isfinite(cell[metric]) and cell[metric] > 0, (metric, cell)
        for m in ("ttft", "tpot", "itl", "e2e"):
            assert cell[f"{m}_p50"] <= cell[f"{m}_p99"]
        assert cell["ttft_p50"] <= cell["e2e_p50"] and cell["peak_state_bytes"] >= 0
        step = cell["decode_step_mean"]  # retentive's engine reports its step; transformers' does not
        assert step is None if cell["server"] == "Transformer" else 0 < step < cell["e2e_p50"], cell
        tokens = plan["num_prompts"] * cell["output_len"]
        assert math.isclose(cell["output_throughput"] * cell["duration_s"], tokens, rel_tol=1e-9)
    text = (tmp_path / "bench_quick_serve.md").read_text()
    assert "| input / output | rate | server | req/s | output tok/s |" in text and "Transformer" in text
    assert "**PASS**" in text or "**FAIL**" in text
    assert (tmp_path / "bench_quick_serve.png").stat().st_size > 0
