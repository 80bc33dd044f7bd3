"""The run's record: one JSON object per line in ``metrics.jsonl``, and ``loss.png`` drawn from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSONL metrics with a loss-curve plot.

    Args:
        run_dir: where ``metrics.jsonl`` and ``loss.png`` live.
        resume_step: on resume, drop the records written after this step by the interrupted run
            (None: start a new log).
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.plot_path = Path(run_dir) / "loss.png"
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in records if r.get("step", 0) <= resume_step]
        self._rewrite()

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a flat dict with a ``step``)."""
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        """Draw training and validation loss against the step into ``loss.png``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        curves = {key: [(r["step"], r[key]) for r in self.records if key in r] for key in ("loss", "val_loss")}
        if not any(curves.values()):
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for (key, points), style in zip(curves.items(), ("-", "o-"), strict=True):
            if points:
                ax.plot(*zip(*points, strict=True), style, label=key.replace("_", " "), markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.plot_path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.plot_path)
