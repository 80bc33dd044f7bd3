"""``/metrics`` in Prometheus' text format, under the names operators know from vLLM's server.

vLLM's names (``vllm:num_requests_running``, ``vllm:time_to_first_token_seconds``, ...) let its dashboards and alerts
read this server as they are; what vLLM has no name for is under ``retentive:``. Written by hand (the format is a
few lines of text) rather than adding a dependency.
"""

from __future__ import annotations

import threading
from bisect import bisect_left

# seconds; vLLM's buckets for the same histograms
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)


class Histogram:
    """A Prometheus histogram: counts per upper bound (cumulated when rendered), their sum and count."""

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.lock = threading.Lock()  # observed on the engine's thread, rendered on the event loop's

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect_left(self.buckets, value)] += 1
            self.sum += value

    def render(self, labels: str) -> list[str]:
        with self.lock:
            counts, total = list(self.counts), self.sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), counts, strict=True):
            cumulative += count
            lines.append(f'{self.name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        lines += [f"{self.name}_sum{{{labels}}} {total}", f"{self.name}_count{{{labels}}} {cumulative}"]
        return lines


class Metrics:
    """The server's histograms; the gauges and counters are read from the engine's stats when scraped.

    Args:
        model_name: the ``model_name`` label of every series, as vLLM labels them.
    """

    def __init__(self, model_name: str) -> None:
        self.labels = f'model_name="{_escape(model_name)}"'
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token, in seconds.", TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between two tokens, in seconds.", ITL_BUCKETS)

    def render(self, stats: dict) -> str:
        """The exposition text: the engine's ``stats()`` as gauges and counters, then the histograms."""
        cache = stats.get("prompt_cache", {})
        series = [
            ("vllm:num_requests_running", "gauge", "Sequences prefilling or decoding.", stats["running"]),
            ("vllm:num_requests_waiting", "gauge", "Requests waiting for a slot.", stats["waiting"]),
            ("vllm:prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats["prefill_tokens"]),
            ("vllm:generation_tokens_total", "counter", "Tokens generated.", stats["generated_tokens"]),
            ("vllm:prefix_cache_queries_total", "counter", "Prompt-cache lookups.", _lookups(cache)),
            ("vllm:prefix_cache_hits_total", "counter", "Prompt-cache lookups that hit.", cache.get("hits", 0)),
            ("retentive:state_bytes", "gauge", "Bytes held by the running sequences' states.", stats["state_bytes"]),
            ("retentive:free_slots", "gauge", "State slots free for new sequences.", stats["free_slots"]),
            ("retentive:prompt_cache_bytes", "gauge", "Prompt-cache bytes in memory.", cache.get("bytes", 0)),
        ]
        if "decode_seconds" in stats:  # retentive's engine: how long its batched decoding steps took
            help_ = "Seconds in batched decoding steps (the model's forward, without sampling)."
            series.append(("retentive:decode_step_seconds_total", "counter", help_, stats["decode_seconds"]))
            series.append(("retentive:decode_steps_total", "counter", "Batched decoding steps.", stats["steps"]))
        lines = []
        for name, kind, help_, value in series:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{self.labels}}} {value}"]
        lines += self.ttft.render(self.labels) + self.itl.render(self.labels)
        return "\n".join(lines) + "\n"


def _lookups(cache: dict) -> int:
    return cache.get("hits", 0) + cache.get("misses", 0)


def _escape(value: str) -> str:
    """A label value as the text format writes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
