"""retentive's C++ kernels for the CPU (``ops/cpu``), built at their first use and kept on disk.

- ``linear_rows(x, weight)``: ``x @ weight.t()`` for a few rows of x, the products of a decoding step at batch 2
  to 16. At so few rows a product costs a read of the weights, yet BLAS libraries treat it as a GEMM of large M:
  on an AMD CPU, MKL's generic path takes 1.5-2x what this kernel takes over the weights of a small model at 8
  rows (docs/benchmarks.md, "Decode step"). Each weight row is loaded once for up to 8 rows of x (``cpu/rows.h``);
  beyond 16 rows it calls ``at::mm``. The reference: :func:`linear_rows_reference`.
- :func:`decode_step` (``cpu/decode_step.cpp``): one decoding step of the whole language model in one parallel
  region; :mod:`retentive.models.native_step` lays out its weights and options, and the model's eager step is its
  reference. Beside it, :func:`argmax`, the greedy choice over the logits it returns (reference:
  ``torch.argmax``).

They are compiled together into one library, a Python extension module that also registers the op, with the C++
compiler that AOTInductor needs anyway (``$CXX``, else ``c++``), for this CPU's vector instructions and against
the OpenMP runtime torch itself uses, and kept under :func:`cache_root`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import subprocess
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

SOURCES = sorted(Path(__file__).with_name("cpu").glob("*.cpp"))
HEADERS = sorted(Path(__file__).with_name("cpu").glob("*.h"))

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


def decode_step(weights: list[Tensor | None], options: list[int], scalars: list[float]):
    """The C++ ``DecodeStep`` of one model (``cpu/decode_step.cpp`` lists its arguments); its ``step(ids, S, z,
    offset, new_S)`` runs one token. Call :func:`available` first."""
    return _module().DecodeStep(weights, options, scalars)


def argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(-1)`` for float32 CPU logits (..., V), NaN above all as torch takes it, by a plain loop: a few
    µs where torch's reduction costs ~30 after a decoding step. Call :func:`available` first."""
    return _module().argmax(logits)


def available() -> bool:
    """Whether the kernels are loaded: built now, or found built for this source, torch and CPU; False, with a
    warning that says why, where no C++ compiler (or no Python headers) can build them (callers then use
    PyTorch's ops)."""
    return _module() is not None


def loaded() -> bool:
    """Whether the kernels are loaded in this process already (by a step that uses them), without building them:
    for callers to whom they are an option, not worth a build."""
    return _module.cache_info().currsize > 0 and _module() is not None


@functools.cache
def _module() -> ModuleType | None:
    """The kernels' extension module, loaded once (which registers ``torch.ops.retentive.linear_rows``)."""
    try:
        spec = importlib.util.spec_from_file_location(_MODULE, _build())
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (OSError, ImportError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode(errors="replace")[-2000:] if isinstance(e, subprocess.CalledProcessError) else e
        log.warning("retentive's CPU kernels could not be built, PyTorch's ops run instead: %s", detail)
        return None
    torch.library.register_fake("retentive::linear_rows")(_linear_rows_shape)
    return module


def _linear_rows_shape(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


_MODULE = "_retentive_cpu"  # as PYBIND11_MODULE names it
_X86 = platform.machine() in ("x86_64", "AMD64")
# x86 compilers may split a 16-float vector into two 8-float ones even where AVX-512 is at hand
_WIDE = ["-mprefer-vector-width=512"] if _X86 else []


def _build() -> Path:
    """The kernels' shared library, compiled once per source, torch version, vector instruction set and flags.

    It is an extension module of this Python (its headers; ``libtorch_python`` for pybind11's conversions of
    tensors). ``-fopenmp`` links ``libgomp.so.1`` by that name, which the loader resolves to the copy torch has
    loaded already: the kernels' threads are torch's. On x86, the vector ISA's macro (``CPU_CAPABILITY_AVX512`` or
    ``_AVX2``, as inductor passes it) selects ATen's vectorized exp and erf; elsewhere ATen's scalar ones run
    (ARM's macros would also need its Sleef build flags)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch.utils.cpp_extension import include_paths, library_paths

    isa = pick_vec_isa()
    macros = isa.build_macro() if isa and _X86 else []
    flags = [
        "-O3", "-march=native", *_WIDE, "-std=c++20", "-shared", "-fPIC", "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}", *(f"-D{macro}" for macro in macros),
        f"-I{sysconfig.get_paths()['include']}",
    ]  # fmt: skip
    digest = hashlib.sha256(f"{torch.__version__} {sysconfig.get_config_var('SOABI')} {isa} {flags}".encode())
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    path = cache_root() / "kernels" / f"retentive_cpu_{digest.hexdigest()[:16]}.so"

    def compile_to(partial: Path) -> None:
        command = [
            os.environ.get("CXX", "c++"), *flags, *(f"-I{p}" for p in include_paths()), *map(str, SOURCES),
            *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu", "-ltorch_python", "-o", str(partial),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)

    return build_once(path, compile_to)


def build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """``path``, made by ``build(partial)`` unless it exists already (what retentive compiles and keeps under
    :func:`cache_root`). ``build`` writes a file of its own, renamed into place, so a killed build leaves nothing at
    ``path``; it runs under a file lock, so processes that start together (``torchrun``'s ranks) build once and the
    others wait for its result."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_name(path.name + ".lock")):
        if not path.exists():  # unless the process that held the lock before built it
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial{path.suffix}")
            build(partial)
            os.replace(partial, path)
    return path


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (POSIX ``flock``, which the system releases when the process
    dies, so a killed build never blocks the next). Without ``fcntl`` (Windows), no lock: each process then builds
    its own copy, and the rename keeps whichever lands last."""
    if fcntl is None:
        yield
        return
    with open(lock, "a") as f:  # closing the file releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
