"""``x @ weight.t()`` for a few rows of x on a CPU: the products of a decoding step at batch 2 to 16.

At so few rows a product costs a read of the weights, yet BLAS libraries treat it as a GEMM of large M: on an AMD
CPU, MKL's generic path takes 1.5-2x what the kernel here takes over the weights of a small model at 8 rows
(docs/benchmarks.md, "Decode step"). The kernel (``cpu/linear_rows.cpp``) reads each weight row once for up to 8
rows of x, one vector accumulator per row, parallel over the weight's rows; beyond 16 rows it calls ``at::mm``.
It is built at its first use with the C++ compiler that AOTInductor needs anyway (``$CXX``, else ``c++``) for this
CPU's vector instructions, and kept beside the compiled decoding steps (:func:`cache_root`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu") / "linear_rows.cpp"

log = logging.getLogger(__name__)


def linear_rows_reference(x: Tensor, weight: Tensor) -> Tensor:
    """The plain product the kernel must equal. x: (M, K); weight: (N, K) -> (M, N)."""
    return x @ weight.t()


def linear_rows(x: Tensor, weight: Tensor) -> Tensor:
    """x: (M, K), weight: (N, K), float32 on the CPU -> x @ weight.t(), (M, N). Call :func:`available` first."""
    return torch.ops.retentive.linear_rows(x, weight)


def cache_root() -> Path:
    """Where retentive keeps what it compiles: ``$RETENTIVE_CACHE_DIR``, by default ``~/.cache/retentive``."""
    return Path(os.environ.get("RETENTIVE_CACHE_DIR") or Path.home() / ".cache" / "retentive")


@functools.cache
def available() -> bool:
    """Whether ``torch.ops.retentive.linear_rows`` is loaded: built now, or found built for this source, torch and
    CPU; False, with a warning that says why, where no C++ compiler can build it (callers then use a GEMM)."""
    try:
        torch.ops.load_library(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode(errors="replace")[-2000:] if isinstance(e, subprocess.CalledProcessError) else e
        log.warning("the few-rows product kernel could not be built, products use a GEMM instead: %s", detail)
        return False
    torch.library.register_fake("retentive::linear_rows")(_linear_rows_shape)
    return True


def _linear_rows_shape(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


# x86 compilers may split a 16-float vector into two 8-float ones even where AVX-512 is at hand
_WIDE = ["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []


def _build() -> Path:
    """The kernel's shared library, compiled once per source, torch version and vector instruction set."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch.utils.cpp_extension import include_paths, library_paths

    key = hashlib.sha256(SOURCE.read_bytes() + f"{torch.__version__} {pick_vec_isa()}".encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"linear_rows_{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.so")  # another process may build it too
        command = [
            os.environ.get("CXX", "c++"), "-O3", "-march=native", *_WIDE, "-std=c++17", "-shared", "-fPIC",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
            *(f"-I{p}" for p in include_paths()), str(SOURCE),
            *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu", "-o", str(partial),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        os.replace(partial, path)
    return path
