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


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas for NVIDIA GPUs")
def test_kernels_compile_for_sm90_with_tensor_cores():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compile_kernels.py"), "--dims", "256x512", "--first"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if "_kernel" in line}
    assert len(rows) == 6, result.stdout
    for name, line in rows.items():
        *_, wgmma, transposed = (cell.strip() for cell in line.strip(" |").split("|"))
        if name.startswith("chunk"):  # the chunk kernels multiply on Hopper's tensor cores (wgmma)
            assert wgmma == "True", line
        # no dot result transposed into another dot: Triton >= 3.4 miscompiles that on Hopper (fla issue 640)
        assert transposed == "0", line
