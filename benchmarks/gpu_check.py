"""The whole GPU check in one command: kernels correct on hardware, their speed, the paper's claims, the stack on CUDA.

    python benchmarks/gpu_check.py --out DIR                    # on a CUDA GPU: every part, about 8 minutes on an H200
    python benchmarks/gpu_check.py --out DIR --parts correctness kernels
    python benchmarks/gpu_check.py --out DIR --dry-run          # every part at tiny sizes on the CPU (CI runs this)

Each part runs in a process of its own inside a time box (``--budget``, plus what the parts before it left unused):
it stops measuring when its box is nearly spent and is killed if it overruns, so one slow part cannot eat the others,
and the whole check ends within the sum of the boxes. Every part saves what it has measured
as it goes (``DIR/part-NAME.json``); at the end the check writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``
and prints a short summary table. The project runs from its source tree (``src/`` goes first on the path), so a
machine with torch and triton needs nothing installed but the wheels of ``scripts/gpu_wheels.sh``. docs/gpu.md
holds the figures of the last run on a GPU and how to read them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("correctness", "kernels", "claims", "stack")  # in order of priority
# seconds on one H200 from a cold Triton cache: correctness compiles most kernels (5 per dtype and head shape, each
# autotuned over 4 launches); claims took 50 s of its box on 2026-12-04
BUDGET = {"correctness": 170, "kernels": 135, "claims": 70, "stack": 95}  # 470 s in all: the issue asks under 8 minutes
DRY_BUDGET = {"correctness": 240, "kernels": 120, "claims": 120, "stack": 240}  # the CPU is slower, sizes tiny
GRACE = 25  # seconds past its box before a part is killed: time to save, free the GPU and exit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the report, the JSON and each part's log")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts, in this order")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    p.add_argument(
        "--budget",
        nargs="+",
        default=[],
        metavar="PART=SECONDS",
        help=f"change a part's time box (defaults: {' '.join(f'{k}={v}' for k, v in BUDGET.items())})",
    )
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)  # internal: that part's box
    return p.parse_args(argv)


def budgets(args: argparse.Namespace) -> dict[str, float]:
    """Each part's time box in seconds: the defaults, then ``--budget PART=SECONDS``."""
    out = dict(DRY_BUDGET if args.dry_run else BUDGET)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--budget: expected PART=SECONDS with PART one of {', '.join(PARTS)}, got {item!r}")
        out[name] = float(seconds)
    return out


def run_part(args: argparse.Namespace) -> int:
    """Inside the part's own process: import its module and run it against the deadline."""
    from gpucheck.harness import Part

    part = Part(args.part, args.out, args.dry_run, time.monotonic() + args.seconds)
    part.save()
    module = importlib.import_module(f"gpucheck.{args.part}")
    try:
        module.run(part)
    except Exception as e:  # recorded in the part's JSON; the other parts still run
        part.error("the part as a whole", e)
        return 1
    return 0


def spawn(name: str, seconds: float, args: argparse.Namespace, extra_env: dict[str, str]) -> dict:
    """Run one part in a child process with a hard limit and ``extra_env``; returns its status and wall time."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra_env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter on CPU tensors
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # a later part re-uses an earlier part's tuning from disk
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--seconds", str(seconds), "--out"]
    cmd.append(str(args.out))
    if args.dry_run:
        cmd.append("--dry-run")
    started = time.monotonic()
    with open(args.out / f"part-{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            rc = proc.wait(timeout=seconds + GRACE)
            status = "finished" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = f"killed after {seconds + GRACE:.0f} s"
    return {"status": status, "seconds": round(time.monotonic() - started, 1)}


def launches_kept(launches: tuple[tuple[int, int], ...], part: dict) -> tuple[tuple[int, int], ...]:
    """``launches`` less those a part's report names wrong or faulting (``avoid_launches``), in their order; all of
    them where none would be left (a wrong kernel then stays visible rather than untunable)."""
    avoid = {tuple(launch) for launch in part.get("avoid_launches", [])}
    return tuple(launch for launch in launches if launch not in avoid) or launches


def environment(args: argparse.Namespace) -> dict:
    """What the figures were measured on: the GPU, the versions, the date and the command."""
    import torch

    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "CPU (dry run)",
        "cuda": torch.version.cuda,
        "cpu_load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    for pkg in ("triton", "transformers", "tokenizers", "safetensors", "fla", "timm"):
        try:
            env[pkg] = importlib.import_module(pkg).__version__
        except Exception:  # absent, or broken on import: either way not there for the check
            env[pkg] = "absent"
    return env


def report(env: dict, runs: dict[str, dict], parts: dict[str, dict]) -> tuple[str, list[str]]:
    """The markdown report and the summary lines printed last."""
    lines = ["# GPU check", "", *(f"- {k}: {v}" for k, v in env.items()), ""]
    summary = ["part         status               s  checks  targets met", "-" * 60]
    for name, run in runs.items():
        data = parts.get(name, {})
        checks, targets = data.get("checks", []), data.get("targets", [])
        passed = sum(c["ok"] for c in checks)
        met = sum(t["met"] is True for t in targets)
        summary.append(
            f"{name:<12} {run['status']:<18} {run['seconds']:>5.0f}  {passed:>3}/{len(checks):<3}  {met}/{len(targets)}"
        )
        lines += [f"## {name}", "", f"{run['status']} in {run['seconds']:.0f} s of a {run['box']:.0f} s box; the chunk "
                  f"kernels tuned over the launches (warps x stages) {run['launches']}", ""]  # fmt: skip
        if data.get("avoid_launches"):
            avoid = ", ".join(f"{w}x{s}" for w, s in data["avoid_launches"])
            lines += [f"**Launches wrong or faulting here, so avoided by the parts after this one: {avoid}**", ""]
        for t in data.get("tables", []):
            lines += [f"**{t['title']}**", "", "| " + " | ".join(t["header"]) + " |"]
            lines += ["|" + "---|" * len(t["header"]), *("| " + " | ".join(r) + " |" for r in t["rows"]), ""]
        if checks:
            lines += ["| check | error | tolerance | result |", "|---|---|---|---|"]
            for c in checks:
                err = "" if c["error"] is None else f"{c['error']:.2e}"
                tol = "" if c["tol"] is None else f"{c['tol']:.0e}"
                lines.append(
                    f"| {md_cell(c['what'])} | {err or md_cell(c.get('detail', '')[:120])} | {tol} | "
                    f"{'ok' if c['ok'] else 'FAIL'} |"
                )
            lines.append("")
        if targets:
            lines += ["| target | met | figure | what bounds it |", "|---|---|---|---|"]
            for t in targets:
                met = {True: "met", False: "missed", None: "not measured"}[t["met"]]
                lines.append(f"| {t['what']} | {met} | {t['figure']} | {t['bound']} |")
            lines.append("")
        lines += [f"- {n}" for n in data.get("notes", [])] + [""]
        for c in checks:
            if not c["ok"]:
                summary.append(f"  FAIL {name}: {c['what']}")
    return "\n".join(lines), summary


def md_cell(text: str) -> str:
    """Text that keeps a markdown table whole: one line, its bars escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:
        return run_part(args)
    boxes = budgets(args)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(
                "gpu_check.py: no CUDA device here; run it on a GPU, or pass --dry-run to check it on the CPU"
            )
    from retentive.ops.triton.common import LAUNCHES_ENV, launches_from

    runs, parts, started, planned = {}, {}, time.monotonic(), 0.0
    launches = launches_from(os.environ.get(LAUNCHES_ENV))  # the chunk kernels', less those a part found wrong
    for name in args.parts:
        # its own box and what the parts before it left unused (less what they overran): the whole check ends
        # within the sum of the boxes and one GRACE, and a part that ends early gives its time to the next
        planned += boxes[name]
        box = max(planned - (time.monotonic() - started), 0.0)
        tuned_over = ",".join(f"{w}x{s}" for w, s in launches)
        print(f"== {name}: time box {box:.0f} s (its own {boxes[name]:.0f} s)", flush=True)
        runs[name] = spawn(name, box, args, {LAUNCHES_ENV: tuned_over})
        runs[name] |= {"box": round(box, 1), "own box": boxes[name], "launches": tuned_over}
        print(f"== {name}: {runs[name]['status']} in {runs[name]['seconds']:.0f} s", flush=True)
        path = args.out / f"part-{name}.json"
        parts[name] = json.loads(path.read_text()) if path.exists() else {}
        if (kept := launches_kept(launches, parts[name])) != launches:
            print(f"== launches wrong or faulting in {name}: the parts after it are tuned over {kept}", flush=True)
            launches = kept
    env = environment(args)
    (args.out / "gpu_check.json").write_text(json.dumps({"environment": env, "runs": runs, "parts": parts}, indent=1))
    text, summary = report(env, runs, parts)
    (args.out / "gpu_check.md").write_text(text)
    print("\n".join(["", f"{env['device']}; torch {env['torch']}; triton {env['triton']}", *summary]))
    failed = any(not c["ok"] for p in parts.values() for c in p.get("checks", []))
    incomplete = any(r["status"] != "finished" for r in runs.values())
    return 1 if failed or incomplete else 0


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(ROOT / "src")]  # the check's modules, and the project from its source tree
    sys.exit(main())
