"""Every kernel compiles for Hopper (sm_90), without a GPU: the interpreter does not check what the compiler does
(operand dtypes and sizes of tl.dot, register pressure, layouts), so this does, in a process that does not
interpret."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="compiling the kernels needs the triton package")
ROOT = Path(__file__).resolve().parents[3]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def compiled(dtype: str, documents: bool) -> dict[str, list[str]]:
    """compile_kernels.py's row of each kernel at retnet-1.3b's head dims (dk 256, dv 512), its first launch;
    ``documents``: compiled for rows that pack documents (HAS_DOCS)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT / "src")}
    script = ROOT / "benchmarks" / "compile_kernels.py"
    cmd = [sys.executable, str(script), "--dims", "256x512", "--first", "--dtype", dtype] + ["--documents"] * documents
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip(" |").split("|")] for line in result.stdout.splitlines()]
    rows = {row[0]: row for row in rows if row[0].endswith("_kernel")}
    assert len(rows) == 6, result.stdout
    return rows


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas for NVIDIA GPUs")
@pytest.mark.parametrize("dtype,documents", [("bfloat16", False), ("float32", False), ("bfloat16", True)])
def test_kernels_compile_for_sm90(dtype, documents):
    for name, (*_, stack, _shared, wgmma, transposed) in compiled(dtype, documents).items():
        # in bf16 the chunk kernels multiply on Hopper's tensor cores (wgmma); float32 is multiplied exactly
        if name.startswith("chunk"):
            assert wgmma == str(dtype == "bfloat16"), (name, wgmma)
        # no spills: float32 at bf16's 64-wide head-dim tiles spilled 8 to 176 bytes a thread here, at 32 none
        assert stack == "0", (name, stack)
        # no dot result transposed into another dot: Triton >= 3.4 miscompiles that on Hopper (fla issue 640)
        assert transposed == "0", (name, transposed)
