"""Peak resident memory of ``generate()`` after prompts of different lengths, each in a fresh process.

The cache of a RetNet does not grow with the prompt, and the prompt is prefilled ``config.prefill_chunk`` tokens at
a time, so the process's peak RSS should not grow with the prompt either (apart from the prompt's ids)::

    python benchmarks/prefill_memory.py --lengths 1024 81920          # retnet-tiny, 2 threads
    python benchmarks/prefill_memory.py --lengths 1024 81920 --set prefill_chunk=1000000   # the prompt in one call
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import add_worker_argument, answer_worker, peak_rss_bytes, run_worker


def measure(job: dict) -> dict:
    """In this process: build ``job["preset"]``, generate 4 tokens after a random prompt of ``job["length"]`` tokens."""
    import torch

    import retentive as rt

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model = rt.RetNetForCausalLM(rt.RetNetConfig.from_preset(job["preset"], **job["overrides"])).eval()
    ids = torch.randint(1, model.config.vocab_size, (1, job["length"]))
    before = peak_rss_bytes()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - t0
    return {"tokens": job["length"], "peak_rss_bytes": peak_rss_bytes(), "before_bytes": before, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="retnet-tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 81920])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a RetNetConfig field")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    add_worker_argument(parser)
    args = parser.parse_args()
    if args.worker:
        answer_worker(measure, args.worker)
        return
    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    # a fresh process per prompt, so that its peak RSS belongs to this prompt alone
    jobs = [{"preset": args.preset, "length": n, "overrides": overrides, "threads": args.threads} for n in args.lengths]
    rows = [run_worker(Path(__file__), job) for job in jobs]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{args.preset} {overrides or ''}: peak RSS of generate(4 new tokens) after a prompt, fresh process each")
    for row in rows:
        mib = row["peak_rss_bytes"] / 2**20
        print(f"  {row['tokens']:>8,} tokens: {mib:8.1f} MiB   ({row['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
