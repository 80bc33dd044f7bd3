"""benchmarks/gpu_check.py --dry-run: every part of the GPU check runs on the CPU at tiny sizes (the kernels in Triton's
interpreter), so that nothing the CPU could catch (an import, a typo, an API call) fails on the GPU machine."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from benchscript import load_script

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the check needs triton")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_dry_run_of_every_part(tmp_path):
    result = run("--out", str(tmp_path), "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["runs"]) == {"correctness", "kernels", "claims", "stack"}
    for name, run_ in report["runs"].items():
        assert run_["status"] == "finished", (name, run_)
        part = report["parts"][name]
        assert part["tables"] or part["checks"], f"{name} reported nothing"
        failed = [c for c in part["checks"] if not c["ok"]]
        assert not failed, (name, failed)
    assert report["parts"]["correctness"]["checks"], "the correctness part compared nothing"
    first, second = report["runs"]["correctness"], report["runs"]["kernels"]
    assert first["box"] == first["own box"] > first["seconds"], "the first part has its own box, and ends early"
    left = first["own box"] - first["seconds"]
    assert abs(second["box"] - (second["own box"] + left)) < 5, "what the first part left goes to the second"
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## kernels" in text and "Chunkwise retention" in text
    by_kernel = [
        t for t in report["parts"]["kernels"]["tables"] if t["title"].startswith("Chunkwise retention by kernel")
    ]
    assert len(by_kernel) == 1 and len(by_kernel[0]["rows"]) == 7, "five kernels alone, their sum, the whole"
    for setting in ("MAX_CHUNK", "MAX_TILE_FLOAT32"):  # each at two values, o and three gradients compared
        assert sum(f"{setting} =" in c["what"] for c in report["parts"]["kernels"]["checks"]) == 4, setting
    assert result.stdout.splitlines()[-1].strip(), "the summary table is printed last"


def test_a_bad_budget_is_refused_by_name(tmp_path):
    result = run("--out", str(tmp_path), "--dry-run", "--budget", "kernels=soon", timeout=60)
    assert result.returncode != 0
    assert "--budget" in result.stderr and "kernels=soon" in result.stderr


def test_a_part_past_its_box_is_stopped_and_reported(tmp_path):
    """A box too short for the part: the part stops early or is killed; the report still names it."""
    result = run("--out", str(tmp_path), "--dry-run", "--parts", "kernels", "--budget", "kernels=0", timeout=120)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    notes = report["parts"]["kernels"].get("notes", [])
    stopped = any("time box" in n for n in notes) or report["runs"]["kernels"]["status"].startswith("killed")
    assert stopped, (report["runs"], notes, result.stdout[-2000:])


def test_failed_kernel_cases_run_again_under_another_ptxas(tmp_path, monkeypatch):
    """A chunkwise case that fails on a GPU runs again in a child whose Triton compiles with the CUDA toolkit's ptxas
    (correctness.retry_under); here, in the interpreter, with Triton's own ptxas standing in for the toolkit's."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton build ships no ptxas")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    from gpucheck import correctness
    from gpucheck.harness import Part
    from retentive.ops.triton.common import LAUNCHES

    part = Part("correctness", tmp_path, dry_run=True, deadline=time.monotonic() + 300)
    correctness.retry_under(part, ptxas, [correctness.Case("bf16", 64, 64, False, False)])
    marked = [c for c in part.checks if c["what"].startswith("ptxas ")]
    assert marked, part.notes
    assert all(c["ok"] and "bf16 dk 16 dv 16" in c["what"] for c in marked), marked  # the dry run's dk 64 / 4
    launches = sum("pinned" in c["what"] for c in marked)
    assert launches == len(LAUNCHES), "and under each launch the kernels are tuned over"


def test_a_launch_that_faults_is_named_for_the_parts_after(tmp_path, monkeypatch):
    """correctness.chunkwise(each_launch=True) runs each launch alone before tuning: one whose run raises, as a kernel
    fault does, goes into the part's avoid_launches by name, and the check stops there."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpucheck import correctness
    from gpucheck.harness import Part
    from retentive.ops.triton.common import LAUNCHES

    bad = LAUNCHES[1]
    real = correctness.pinned

    @contextmanager
    def faulting(warps: int, stages: int):
        with real(warps, stages):
            if (warps, stages) == bad:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            yield

    monkeypatch.setattr(correctness, "pinned", faulting)
    part = Part("correctness", tmp_path, dry_run=True, deadline=time.monotonic() + 300)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        correctness.chunkwise(part, correctness.DRY, torch.bfloat16, 64, 64, False, each_launch=True)
    assert part.avoid_launches == [list(bad)]
    assert [c["ok"] for c in part.checks] == [True], "the launch before it was checked, and passed"


def test_the_parts_after_are_tuned_without_the_launches_a_part_avoids():
    gpu_check = load_script("gpu_check")
    launches = ((8, 2), (8, 3), (4, 2), (8, 1))
    assert gpu_check.launches_kept(launches, {}) == launches
    assert gpu_check.launches_kept(launches, {"avoid_launches": [[4, 2], [8, 2]]}) == ((8, 3), (8, 1))
    everything = {"avoid_launches": [list(launch) for launch in launches]}
    assert gpu_check.launches_kept(launches, everything) == launches, "never none: a wrong kernel stays visible"
