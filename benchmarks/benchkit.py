"""What every benchmark script shares: the docs section writer, memory readers, the worker spawn, tables, captions.

The name is deliberate: the scripts run with ``benchmarks/`` on ``sys.path``, where a module ``benchmarks/X.py``
shadows any installed top-level package ``X``. transformers probes and imports optional PyPI packages (``kernels``,
for one), so no module here may take the name of a package that our dependencies import. ``benchkit`` is none
of them (a PyPI project of that name exists, an unrelated tool that nothing we depend on imports).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MiB = 2**20

# ---- memory, from /proc (Linux) ----

# With glibc's mmap threshold fixed at 64 KiB every buffer above it is its own mapping, returned to the system
# when freed, so the resident set follows the live tensors. Workers that measure memory start with this variable.
MMAP_VARIABLE = "MALLOC_MMAP_THRESHOLD_"
TRACKED_MEMORY_ENV = {MMAP_VARIABLE: "65536"}


def _status_bytes(field: str, pid: int | str) -> int:
    """A field of /proc/<pid>/status that the kernel gives in kB (VmRSS, VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M)[1]) * 1024


def rss_bytes(pid: int | str = "self") -> int:
    """The resident set size of process ``pid`` now (VmRSS)."""
    return _status_bytes("VmRSS", pid)


def peak_rss_bytes(pid: int | str = "self") -> int:
    """The resident set's high-water mark of process ``pid`` (VmHWM): since it started or since :func:`reset_peak_rss`.

    Unlike ``getrusage``'s ``ru_maxrss``, it does not count the peak of the parent that spawned this process.
    """
    return _status_bytes("VmHWM", pid)


def reset_peak_rss(pid: int | str = "self") -> None:
    """Lower the high-water mark of process ``pid`` (this one, or a child of ours) to its current resident size
    (``/proc/<pid>/clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def require_proc(script: str) -> None:
    """Stop with a message where /proc cannot reset the high-water mark (not Linux)."""
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit(f"benchmarks/{script} measures memory through /proc (Linux only)")


# ---- a measurement in a fresh process ----


class WorkerFailed(RuntimeError):
    """A worker process exited with an error, printed no result, or ran out of time."""


def run_worker(
    script: Path, job: dict, *, timeout: float | None = None, env: dict[str, str] | None = None, progress: bool = False
) -> dict:
    """Run ``python script --worker JOB`` in a fresh interpreter; return the JSON object of its last stdout line.

    A fresh process owns its peak memory and its one-time setup. It imports retentive from this checkout (``src/``
    first on ``PYTHONPATH``); ``env`` adds variables (e.g. :data:`TRACKED_MEMORY_ENV`). With ``progress`` the
    worker's stderr goes to ours as it runs; otherwise the last line of it names the failure.

    Raises:
        WorkerFailed: the worker exited non-zero, printed no result, or took longer than ``timeout`` seconds.
    """
    paths = [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(paths)} | (env or {})
    command = [sys.executable, str(script), "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(
            command, env=env, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True,
            timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise WorkerFailed(f"{script.name} worker timed out after {timeout:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        errors = (proc.stderr or "").strip().splitlines()
        why = errors[-1] if errors else "its error is above" if progress else "no output"
        raise WorkerFailed(f"{script.name} worker exited with code {proc.returncode}: {why}")
    return json.loads(lines[-1])


def answer_worker(measure: Callable[[dict], dict], job: str) -> None:
    """The worker's side of :func:`run_worker`: run ``measure`` on the JSON ``job`` and print its JSON result."""
    print(json.dumps(measure(json.loads(job))))


def add_worker_argument(parser: argparse.ArgumentParser) -> None:
    """The hidden ``--worker JOB`` option through which :func:`run_worker` starts a script."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)


# ---- markdown ----


def table_row(cells: Sequence[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def table_rule(columns: int, align: str = "") -> str:
    """The line under a markdown table's header; ``align=":"`` right-aligns every column (numbers)."""
    return "|" + f"---{align}|" * columns


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A markdown table: ``header``, its rule (see :func:`table_rule` for ``align``), ``rows``."""
    return "\n".join([table_row(header), table_rule(len(header), align), *map(table_row, rows)])


def write_section(doc: Path, heading: str, text: str, name: str | None = None) -> None:
    """Write generated ``text`` into the section ``heading`` (``## ...``) of the markdown file ``doc``.

    Without ``name``, ``text`` is the whole section, heading included: it replaces everything from the heading
    to the next ``## `` heading. With ``name``, ``text`` replaces what lies between the markers
    ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``, so the section's written prose stays. Either
    way the other sections stay as they are; a section not found is appended (with its heading and markers).
    """
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if name is None:
        block, start = text, old.find(heading + "\n")
        stop = old.find("\n## ", start + len(heading)) if start >= 0 else -1
        stop = len(old) if stop < 0 else stop
        appended = old.rstrip("\n") + "\n\n" + text
    else:
        first, last = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
        block = f"{first}\n{text}\n{last}"
        start = old.find(first) if first in old and last in old else -1
        stop = old.find(last) + len(last)
        appended = old.rstrip() + f"\n\n{heading}\n\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(appended if start < 0 else old[:start] + block + old[stop:])


# ---- plots ----


def subplots(*args, **kwargs) -> tuple:
    """``plt.subplots(...)`` on matplotlib's Agg backend, which writes files and needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out ``fig``, write it to ``path`` (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ---- the machine, for captions ----


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what ``platform`` knows."""
    info = Path("/proc/cpuinfo")
    name = re.search(r"model name\s*:\s*(.+)", info.read_text()) if info.exists() else None
    return name[1].strip() if name else platform.processor() or platform.machine()


def machine(device: str = "cpu") -> str:
    """The device for a caption: a GPU's name, or the CPU, its cores and the load average at the start."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_name()}, {os.cpu_count()} cores, load average {load:.1f} at start"


def environment(script: str, started: float, quick: bool, argv: list[str]) -> dict:
    """The machine, the versions and the command (``python benchmarks/<script> <argv>``), for the tables' captions."""
    import torch

    versions = {}
    for package in ("torch", "transformers", "torchscale", "yet-another-retnet", "retentive"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "quick": quick,
        "command": " ".join(["python", f"benchmarks/{script}", *argv]),
    }


# ---- command line ----


def add_sweep_arguments(parser: argparse.ArgumentParser, max_seconds: float, max_seconds_help: str) -> None:
    """The options of a sweep over growing sizes in one worker process: its threads, its limits, ``--worker``."""
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip a run whose extrapolated peak exceeds this")
    parser.add_argument("--max-seconds", type=float, default=max_seconds, help=max_seconds_help)
    add_worker_argument(parser)
