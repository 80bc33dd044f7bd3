"""Peak resident memory of ``generate()`` after prompts of different lengths, each in a fresh process.

The cache of a RetNet does not grow with the prompt, and the prompt is prefilled ``config.prefill_chunk`` tokens at
a time, so the process's peak RSS should not grow with the prompt either (apart from the prompt's ids)::

    python benchmarks/prefill_memory.py --lengths 1024 81920          # retnet-tiny, 2 threads
    python benchmarks/prefill_memory.py --lengths 1024 81920 --set prefill_chunk=1000000   # the prompt in one call
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(preset: str, length: int, overrides: dict, threads: int) -> dict:
    """In this process: build ``preset``, generate 4 tokens after a random prompt of ``length`` tokens."""
    import torch

    import retentive as rt

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = rt.RetNetForCausalLM(rt.RetNetConfig.from_preset(preset, **overrides)).eval()
    ids = torch.randint(1, model.config.vocab_size, (1, length))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"tokens": length, "peak_rss_bytes": peak, "before_bytes": before, "seconds": seconds}


def in_fresh_process(preset: str, length: int, overrides: dict, threads: int) -> dict:
    """:func:`measure` in a new interpreter, so that its peak RSS belongs to this prompt alone."""
    spec = json.dumps({"preset": preset, "length": length, "overrides": overrides, "threads": threads})
    command = [sys.executable, "-P", __file__, "--child", spec]  # -P: no benchmark module shadows a package
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="retnet-tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 81920])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a RetNetConfig field")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["preset"], spec["length"], spec["overrides"], spec["threads"])))
        return
    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    rows = [in_fresh_process(args.preset, n, overrides, args.threads) for n in args.lengths]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{args.preset} {overrides or ''}: peak RSS of generate(4 new tokens) after a prompt, fresh process each")
    for row in rows:
        mib = row["peak_rss_bytes"] / 2**20
        print(f"  {row['tokens']:>8,} tokens: {mib:8.1f} MiB   ({row['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
