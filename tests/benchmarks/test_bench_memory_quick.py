"""The memory benchmark: its recall task is planted as documented, its batches resume exactly, and it runs end to end
in quick mode (every variant, loss per position and recall per distance, the table and the plot)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import memory

RECALL = memory.Recall(text_vocab=100, keys=8)


def _text(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, size=n)  # text tokens only: every recall token is planted


@pytest.mark.parametrize("seed", range(20))
def test_a_row_holds_one_pair_set_once_and_queried_after(seed):
    row = RECALL.plant(_text(129, seed), queries=3, rng=np.random.default_rng(seed))
    marks = np.flatnonzero(row >= RECALL.set_id)[::3]  # the first token of each planted triple
    assert [int(row[m]) for m in marks] == [RECALL.set_id] + [RECALL.get_id] * 3
    assert all((row[m + 1 : m + 3] == row[marks[0] + 1 : marks[0] + 3]).all() for m in marks)  # one key, one value
    assert int(np.sum(row >= RECALL.text_vocab)) == 4 * 3  # nothing else overwritten or missing


@pytest.mark.parametrize("distance", [16, 17, 18, 64, 300])
def test_a_probe_asks_for_the_value_planted_distance_tokens_back(distance):
    rng = np.random.default_rng(distance)
    ids, asked, answer = RECALL.probe(_text(distance + 19), distance, rng)
    assert len(ids) == asked + 1 and ids[asked - 1] == RECALL.get_id
    value_at = int(np.flatnonzero(ids == answer)[0])
    assert asked - value_at == distance and ids[value_at - 2] == RECALL.set_id
    assert ids[value_at - 1] == ids[asked]  # the key asked is the key set
    assert int(np.sum(ids >= RECALL.text_vocab)) == 5  # SET k v ... GET k, text between


def test_mixture_batches_depend_on_the_step_only():
    plan = memory.QUICK | {"seq_len": 32, "batch_size": 8}
    corpora = [_text(5000, 1), _text(5000, 2)]
    first = memory.Mixture(corpora, RECALL, plan, seed=3)
    batches = [first.next_batch()["input_ids"] for _ in range(3)]
    assert batches[0].shape == (8, 33) and not (batches[0] == batches[1]).all()
    resumed = memory.Mixture(corpora, RECALL, plan, seed=3)
    resumed.load_state_dict({"step": 2})
    assert (resumed.next_batch()["input_ids"] == batches[2]).all()
    planted = (batches[0] >= RECALL.text_vocab).any(1)
    assert planted.tolist() == [True, True] + [False] * 6  # a quarter of the rows


def test_position_bins_cover_every_position_once():
    edges = memory.position_bins(2048)
    assert edges[0] == 1 and edges[-1] == 2049 and edges == sorted(set(edges))


def test_quick_memory_run_writes_curves_and_recall(tmp_path):
    memory.main(["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--corpora", "shakespeare"])
    results = json.loads((tmp_path / "bench_quick_memory.json").read_text())
    plan = results["plan"]
    assert set(results["runs"]) == set(memory.VARIANTS)
    bins = len(memory.position_bins(plan["span"] * plan["seq_len"])) - 1
    for runs in results["runs"].values():
        run = runs["0"]
        curve = run["loss_per_position"]["shakespeare"]
        assert len(curve) == bins and all(math.isfinite(x) and x > 0 for x in curve)
        assert set(run["recall"]) == {str(d) for d in plan["distances"]}
        assert all(0 <= a <= 1 for a in run["recall"].values())
    assert results["horizons"]["RetNet, γ = 1 - 2^(-5-h) (paper)"] == [146, 293]  # γ = 31/32 and 63/64, to 1%
    text = (tmp_path / "bench_quick_memory.md").read_text()
    assert "Recall at distance" in text and "d=64 (>T)" in text
    assert (tmp_path / "bench_quick_memory.png").stat().st_size > 0
