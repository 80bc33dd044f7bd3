"""run_fresh: code run in a new interpreter, as a user's process that never imported retentive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import retentive


def run_fresh(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a new interpreter (offline, its own HF cache, no terminal to answer transformers' prompt) and
    return the JSON it prints after "RESULT " at the end. The package the remote code imports is the one under test
    (its folder first on the path, whatever the installed one), though the process itself never imports it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_VERBOSITY": "error"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(retentive.__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.rpartition("RESULT ")[2])
