"""What every part of the GPU check shares: its time box, its tables and targets, timers and the two ceilings.

A part is a module with ``run(part: Part) -> None``. It runs in a process of its own (``gpu_check.py`` starts one
per part with a hard time limit), reads ``part.dry_run`` to choose tiny sizes on the CPU, checks ``part.time_left()``
between measurements so that it ends inside its box with whatever it measured, and reports through
:meth:`Part.table`, :meth:`Part.check` and :meth:`Part.target`. Every report is saved at once (``part-NAME.json``),
so a part killed at its limit still leaves what it had measured.

Conventions (docs/gpu.md): inputs are fresh random draws (never zeros), outputs are poisoned with NaN before a
kernel writes them where a kernel takes an output buffer, errors are ``||got - want|| / ||want||`` against float64
(or float32 where float64 would not fit), times are medians of CUDA events.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Part:
    """One part of the check: its name, where it runs, its deadline and what it has reported so far."""

    name: str
    out: Path  # the folder the check writes into
    dry_run: bool  # tiny sizes on the CPU (Triton's interpreter for the kernels)
    deadline: float  # time.monotonic() by which the part should have reported everything
    tables: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # launches (warps, stages) the chunk kernels got wrong or crashed under here: the parts after this one are tuned
    # without them (gpu_check.py sets RETENTIVE_TRITON_LAUNCHES for them)
    avoid_launches: list[list[int]] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def time_left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.monotonic()

    def out_of_time(self, reserve: float = 0.0) -> bool:
        """True (and noted once) when fewer than ``reserve`` seconds are left: the caller skips what follows."""
        if self.time_left() > reserve:
            return False
        note = f"stopped early: the part's time box ran out ({reserve:.0f} s reserve)"
        if note not in self.notes:
            self.notes.append(note)
            self.save()
        return True

    def table(self, title: str, header: Sequence[str]) -> Callable[[Sequence[object]], None]:
        """Start a table; returns ``add(row)``, which appends a row and saves."""
        t = {"title": title, "header": list(header), "rows": []}
        self.tables.append(t)
        self.save()

        def add(row: Sequence[object]) -> None:
            t["rows"].append([cell(x) for x in row])
            self.save()
            print(f"[{self.name}] {title[:40]}: " + " | ".join(cell(x) for x in row), flush=True)

        return add

    def check(self, what: str, error: float, tol: float, **detail: object) -> bool:
        """A correctness check: passes when ``error`` is finite and <= ``tol``."""
        ok = math.isfinite(error) and error <= tol
        self.checks.append({"what": what, "error": error, "tol": tol, "ok": ok, **detail})
        self.save()
        print(f"[{self.name}] {'ok  ' if ok else 'FAIL'} {what}: {error:.2e} (tol {tol:.0e})", flush=True)
        return ok

    def check_true(self, what: str, ok: bool, detail: str = "") -> bool:
        """A correctness check that is a fact rather than an error measure (equal tokens, a falling loss)."""
        self.checks.append({"what": what, "error": None, "tol": None, "ok": bool(ok), "detail": detail})
        self.save()
        print(f"[{self.name}] {'ok  ' if ok else 'FAIL'} {what} {detail}", flush=True)
        return bool(ok)

    def target(self, what: str, met: bool | None, figure: str, bound: str = "") -> None:
        """One of the issue's targets: met, missed (with what bounds it) or not measured (None)."""
        self.targets.append({"what": what, "met": met, "figure": figure, "bound": bound})
        self.save()

    def error(self, where: str, exc: BaseException) -> None:
        """An exception inside a part: recorded (type, message, the last frames), the part goes on."""
        tb = "".join(traceback.format_exception(exc)[-3:])
        self.notes.append(f"error in {where}: {type(exc).__name__}: {str(exc)[:300]}")
        self.checks.append({"what": where, "error": None, "tol": None, "ok": False, "detail": tb[-600:]})
        self.save()
        print(f"[{self.name}] ERROR in {where}: {type(exc).__name__}: {exc}", flush=True)

    def save(self) -> None:
        """Write everything reported so far to ``part-NAME.json`` (atomically: a kill never leaves half a file)."""
        data = {"part": self.name, "tables": self.tables, "checks": self.checks, "targets": self.targets}
        data["notes"] = self.notes
        data["avoid_launches"] = self.avoid_launches
        path = self.out / f"part-{self.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(path)


def cell(x: object) -> str:
    """A table cell: floats with 4 significant digits, None as n/a."""
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (NaN anywhere in got gives NaN: never a pass)."""
    got, want = got.double(), want.double().to(got.device)
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def timer(device: str, warmup_ms: int = 25, rep_ms: int = 100) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn``: CUDA events (triton's do_bench) on a GPU, one wall-clock call on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")

    def once(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return once


def cuda_ms(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median milliseconds of a long call (seconds, not microseconds) between CUDA events; wall clock on the CPU."""
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


@dataclass(frozen=True)
class Ceilings:
    """The hardware's two bounds as measured here: copy bandwidth (bytes read + written per s), bf16 matmul FLOP/s."""

    bandwidth: float
    matmul: float

    def bytes_ms(self, nbytes: float) -> float:
        return nbytes / self.bandwidth * 1e3

    def flops_ms(self, flops: float) -> float:
        return flops / self.matmul * 1e3


def measure_ceilings(device: str) -> Ceilings:
    """A 2 GiB device-to-device copy and an 8192^3 bf16 matrix product on random data (NaN on the CPU)."""
    if device != "cuda":
        return Ceilings(float("nan"), float("nan"))
    bench = timer(device)

    def copy_bandwidth() -> float:
        src = torch.empty(1 << 31, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        return 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-3)

    def matmul_rate(n: int = 8192) -> float:
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        return 2 * n**3 / (bench(lambda: a @ b) * 1e-3)

    bandwidth, matmul = copy_bandwidth(), matmul_rate()
    free_cuda()
    return Ceilings(bandwidth, matmul)


def capture(step: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``step`` captured in a CUDA graph, after a warm-up on a side stream as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def free_cuda() -> None:
    """Release cached blocks between measurements, so one shape's buffers do not crowd the next."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def cuda_usable() -> bool:
    """False once a kernel's fault (an illegal address, say) has lost this process's CUDA context, after which every
    CUDA call fails; True on the CPU."""
    if not torch.cuda.is_available():
        return True
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2
    except Exception:  # torch.AcceleratorError, or a RuntimeError in older torch
        return False


def gib(nbytes: float) -> float:
    return nbytes / 2**30
