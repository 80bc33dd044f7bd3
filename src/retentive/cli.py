"""Command line: ``retentive demo | train | generate | serve | train-vision | bench | convert``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .data import TOKENIZERS
from .models.decoding import DECODE_IMPLEMENTATIONS
from .training.checkpoint import CheckpointError, read_run_config


def _model_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value (``dropout=0.1``, ``rotary=false``) or a plain string (``gate_fn=gelu``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _suffixes(text: str) -> list[str]:
    """``.py,.rst`` -> [".py", ".rst"]."""
    from .data.corpus import normalize_suffixes

    try:
        return list(normalize_suffixes(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


ACTIVATION_CHECKPOINTING_HELP = (
    "recompute each block's activations in the backward pass instead of keeping them: less memory, about one more "
    "forward pass of time"
)

# The fields of run.json that options of other names set; every other field is set by the option of its name.
_FIELD_OPTIONS = {
    "model_config": ("config",),
    "model_overrides": ("set",),
    "epochs": ("epochs", "steps"),  # train-vision: --steps replaces the epochs
}


def _given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options ``argv`` gives, as their ``dest``: ``argv`` parsed again with every default suppressed, so an
    option left off is absent rather than equal to its default."""
    defaults = {action: action.default for action in parser._actions}  # argparse lists a parser's options nowhere else
    for action in defaults:
        action.default = argparse.SUPPRESS
    try:
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in defaults.items():
            action.default = default
    return {action.dest for action in defaults if hasattr(given, action.dest)}


def _run_config(args: argparse.Namespace, options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The run's configuration, in the sections of run.json, from ``options`` (every field as the options set it).

    On ``--resume`` the run continues as it was configured (in ``--out``, or in the run directory of the checkpoint
    given): every field keeps the value the run stored, and only the options the command line gives change it
    (``--set`` changes single keys of the stored model overrides). Whether a change can continue the same run is
    decided afterwards, for every entry point alike, by ``check_run_dir`` (``RESUMABLE_CHANGES``), which refuses
    the others naming the field.
    """
    if not args.resume or args.overwrite:
        return options
    stored = read_run_config(args.out)
    if stored is None and args.resume is not True:  # --resume runs/a/checkpoints/step-N --out runs/b: run a's options
        stored = read_run_config(Path(args.resume).resolve().parents[1])
    if stored is None:  # nothing to continue yet: the run starts
        return options
    config = {}
    for section, fields in options.items():
        config[section] = dict(stored.get(section, {}))
        for name, value in fields.items():
            if not any(option in args.given for option in _FIELD_OPTIONS.get(name, (name,))):
                continue
            old = config[section].get(name)
            config[section][name] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    return config


def train(args: argparse.Namespace) -> None:
    """Train a RetNet language model (alone, or one process of ``torchrun``)."""
    logging.getLogger("retentive.data.corpus").setLevel(logging.INFO)  # what was read and skipped, always
    from .training import TrainConfig
    from .training.lm import LMConfig, train_language_model

    run_config = _run_config(args, {
        "lm": dict(
            preset=args.preset, model_config=args.config, model_overrides=dict(args.set), data=args.data,
            suffixes=args.suffixes, tokenizer=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len,
            batch_size=args.batch_size, val_fraction=args.val_fraction, eval_batches=args.eval_batches,
            seed=args.seed, documents=args.documents,
        ),
        "train": dict(
            steps=args.steps, grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
            warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
            eval_interval=args.eval_interval, ckpt_interval=args.ckpt_interval, keep_last=args.keep_last,
            log_interval=args.log_interval, precision=args.precision, compile=args.compile, device=args.device,
            parallel=args.parallel, activation_checkpointing=args.activation_checkpointing,
            progress=args.progress,
        ),
    })  # fmt: skip
    lm, config = LMConfig(**run_config["lm"]), TrainConfig(**run_config["train"])
    run = train_language_model(lm, config, args.out, resume=args.resume or False, overwrite=args.overwrite)
    if run.trainer.dist.is_main and not run.result.losses:
        print(f"nothing to train: {args.out} is at its last step, {run.trainer.step}; --steps N continues it")
    elif run.trainer.dist.is_main:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in run.result.eval.items())
        print(f"trained to step {run.trainer.step} in {run.result.seconds:.0f} s; {summary}")
        print(f"checkpoint: {run.result.checkpoint}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _check_generation(args: argparse.Namespace) -> None:
    """Refuse generation options that cannot work, with one line naming the option (before loading anything)."""
    checks = (
        (bool(args.prompt), "--prompt is empty: give at least one character to continue"),
        (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
        (args.num_beams >= 1, f"--num-beams must be >= 1 (1: no beam search), got {args.num_beams}"),
        (args.temperature >= 0, f"--temperature must be >= 0 (0: greedy), got {args.temperature}"),
        # below it, generate() divides float32 logits into inf - inf = nan (at such a temperature, 0 is the same)
        (
            args.temperature == 0 or args.temperature >= MIN_TEMPERATURE,
            f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {args.temperature}",
        ),
        (args.top_k >= 0, f"--top-k must be >= 0 (0: no top-k filtering), got {args.top_k}"),
        (0 < args.top_p <= 1, f"--top-p must lie in (0, 1] (1: no nucleus filtering), got {args.top_p}"),
        (args.repetition_penalty > 0, f"--repetition-penalty must be > 0 (1: none), got {args.repetition_penalty}"),
    )
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")
    _check_device(args.device)


def _check_device(device: str) -> None:
    """Refuse a device that torch cannot parse or this machine does not have, in one line naming ``--device``."""
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {device} is not a device: use cpu, cuda, cuda:N or mps ({e})") from e
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device}: this torch has no CUDA device (use --device cpu)")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {device}: MPS is not available here (use --device cpu)")


MIN_TEMPERATURE = 1e-5


def _generation_checkpoint(path: str) -> Path:
    """A folder written by ``save_pretrained`` as it is; else a run directory's newest or a given checkpoint."""
    from .training import resolve_checkpoint
    from .training.checkpoint import CHECKPOINTS, MANIFEST

    folder = Path(path)
    if not (folder / MANIFEST).is_file() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder  # from_pretrained names a missing or damaged file
    if folder.is_dir() and not folder.name.startswith("step-") and not (folder / CHECKPOINTS).is_dir():
        raise CheckpointError(
            f"no checkpoint in {folder}: give a run directory (retentive train --out), one of its "
            f"{CHECKPOINTS}/step-* folders, or a folder written by save_pretrained (config.json + model.safetensors)"
        )
    return resolve_checkpoint(folder, use="retentive generate {}")


def generate(args: argparse.Namespace) -> None:
    """Continue a prompt with a trained model, streaming the tokens as they come."""
    from .data import load_tokenizer
    from .models import RetNetForCausalLM
    from .streamer import TokenStreamer

    _check_generation(args)
    ckpt = _generation_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer(ckpt)
    model = RetNetForCausalLM.from_pretrained(ckpt, decode_implementation=args.decode_implementation)
    model = model.to(args.device).eval()
    ids = torch.tensor([tokenizer.encode(args.prompt)], device=args.device)
    torch.manual_seed(args.seed)
    sampling = args.temperature > 0
    streamer = TokenStreamer(tokenizer) if args.num_beams == 1 else None
    print(args.prompt, end="", flush=True)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.max_new_tokens,
        do_sample=sampling,
        temperature=args.temperature if sampling else None,
        top_k=args.top_k if sampling else None,
        top_p=args.top_p if sampling else None,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams,
        streamer=streamer,
        pad_token_id=tokenizer.eos_id,
    )
    if streamer is None:  # beam search cannot stream: its best beam is known at the end
        print(tokenizer.decode(out[0, ids.shape[1] :].tolist()))


def inspect(args: argparse.Namespace) -> None:
    """Print a trained model's heads (gamma, horizon) and, for a text, how far back each head's state reaches."""
    from .data import load_tokenizer
    from .memory import DISTANCES, bucket_names, heads, state_shares
    from .models import RetNetForCausalLM

    ckpt = _generation_checkpoint(args.checkpoint)
    model = RetNetForCausalLM.from_pretrained(ckpt).eval()
    text = Path(args.file).read_text() if args.file else args.text
    rows = [vars(head) for head in heads(model)]
    names = bucket_names(DISTANCES)
    if text:
        ids = torch.tensor([load_tokenizer(ckpt).encode(text)])
        shares = state_shares(model, ids)  # (L, H, buckets)
        for row in rows:
            row["shares"] = dict(zip(names, shares[row["layer"], row["head"]].tolist(), strict=True))
    if args.json:
        print(json.dumps({"tokens": None if not text else ids.shape[1], "heads": rows}, indent=1))
        return
    header = f"{'layer':>5} {'head':>4} {'gamma':>10} {'horizon':>8}"
    if text:
        print(f"{ids.shape[1]} tokens; the state's share from tokens at each distance back (see retentive.memory)")
        header += "".join(f"{name:>11}" for name in names)
    print(header)
    for row in rows:
        line = f"{row['layer']:>5} {row['head']:>4} {row['gamma']:>10.6f} {row['horizon']:>8,}"
        print(line + "".join(f"{share:>11.1%}" for share in row.get("shares", {}).values()))


def demo(args: argparse.Namespace) -> None:
    """Train retnet-tiny on Shakespeare in minutes; perplexity, a sample, the three forms, O(1) decoding."""
    from .demo import run_demo

    run_demo(args)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a RetNet language model on a text corpus (torchrun for several processes)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="retnet-tiny",
                   help="RetNetConfig preset (default retnet-tiny), or transformer-<size>: its Llama twin")  # fmt: skip
    g.add_argument("--config", default=None, help="a RetNetConfig config.json, instead of the preset")
    g.add_argument("--set", type=_model_override, action="append", default=[], metavar="KEY=VALUE",
                   help="change one config field, e.g. --set dropout=0.1 (repeatable)")  # fmt: skip
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shakespeare",
                   help="'shakespeare', a text file or folder, or 'datasets:<glob>' (HF datasets)")  # fmt: skip
    g.add_argument("--suffixes", type=_suffixes, default=None, metavar=".EXT,...",
                   help="file suffixes read from a --data folder, e.g. .py,.rst (default .txt,.md,.text)")  # fmt: skip
    g.add_argument("--tokenizer", choices=TOKENIZERS, default="bpe", help="bpe: trained on the data (default)")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per training window (default 128)")
    g.add_argument("--batch-size", type=int, default=16, help="windows per micro-batch per process (default 16)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="share of each document held out")
    g.add_argument("--documents", action="store_true",
                   help="read each document of a window on its own: no state (or, for a Transformer, attention) "
                        "crosses an end-of-text token")  # fmt: skip
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=int, default=100)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA, float32 on CPU")  # fmt: skip
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help=ACTIVATION_CHECKPOINTING_HELP)  # fmt: skip
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: ddp replicates the model, fsdp shards it per block (FSDP2)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, loss.png, tokenizer")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the run in --out (its newest intact checkpoint, or the one given) with the "
                        "options it stored; the options given change it where that keeps it the same run")  # fmt: skip
    g.add_argument("--overwrite", action="store_true", help="delete what --out holds and start afresh")
    g.add_argument("--eval-interval", type=int, default=200)
    g.add_argument("--eval-batches", type=int, default=20, help="validation batches per evaluation")
    g.add_argument("--ckpt-interval", type=int, default=500)
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")
    p.set_defaults(func=train)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model, streaming tokens")
    p.add_argument(
        "checkpoint", help="a run directory (its newest checkpoint), a checkpoint folder or a save_pretrained folder"
    )
    p.add_argument("--prompt", default="ROMEO.\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--decode-implementation", choices=DECODE_IMPLEMENTATIONS, default="eager",
                   help="the decoding step: eager, compiled (torch.compile), aot (AOTInductor) or native (a C++ "
                   "step, the fastest on a CPU); all but eager compile first, in seconds")  # fmt: skip
    p.set_defaults(func=generate)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="a trained model's heads: gamma, horizon, and how far back their state reaches")
    p.add_argument("checkpoint", help="a run directory, a checkpoint folder or a save_pretrained folder")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", default=None, help="a text to read: the state's share by distance, per head")
    text.add_argument("--file", default=None, help="read the text from this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=inspect)


def serve(args: argparse.Namespace) -> None:
    """Serve a trained model over OpenAI's HTTP API (``/v1/completions``, ``/v1/chat/completions``)."""
    from .serving import ServeConfig, ServerLimits, build_app, compile_decoding, load_checkpoint, run

    _check_serving(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint, args.device)
    implementation = args.decode_implementation or ("native" if torch.device(args.device).type == "cpu" else "compiled")
    if implementation != "eager" and (seconds := compile_decoding(model, args.max_batch, implementation)) is not None:
        print(f"compiled the decoding step ({implementation}) in {seconds:.1f} s", flush=True)
    limits = ServerLimits(
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens, max_n=args.max_n, max_body_bytes=int(args.max_body_mib * 2**20),
    )  # fmt: skip
    config = ServeConfig(
        max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
        prompt_cache_mib=args.prompt_cache_mib, prompt_cache_dir=args.prompt_cache_dir,
        prompt_cache_disk_mib=args.prompt_cache_disk_mib, cache_block=args.cache_block, limits=limits,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, engine=args.engine,
    )  # fmt: skip
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = build_app(model, tokenizer, name, config)
    print(f"serving {name!r} ({type(model).__name__}) on http://{args.host}:{args.port}/v1", flush=True)
    run(app, args.host, args.port, args.shutdown_timeout)


API_KEY_ENV = "RETENTIVE_API_KEY"


def _check_serving(args: argparse.Namespace) -> None:
    """Refuse server options that cannot work, with one line naming the option (before loading anything)."""
    checks = (
        (0 <= args.port <= 65535, f"--port must lie in [0, 65535], got {args.port}"),
        (args.max_batch >= 1, f"--max-batch must be >= 1, got {args.max_batch}"),
        (args.max_queue >= 0, f"--max-queue must be >= 0, got {args.max_queue}"),
        (args.prefill_chunk >= 1, f"--prefill-chunk must be >= 1, got {args.prefill_chunk}"),
        (args.max_prompt_tokens >= 1, f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}"),
        (args.max_tokens >= 1, f"--max-tokens must be >= 1, got {args.max_tokens}"),
        (
            1 <= args.default_max_tokens <= args.max_tokens,
            f"--default-max-tokens must lie in [1, --max-tokens={args.max_tokens}], got {args.default_max_tokens}",
        ),
        (1 <= args.max_n <= args.max_batch, f"--max-n must lie in [1, --max-batch={args.max_batch}], got {args.max_n}"),
        (args.max_body_mib > 0, f"--max-body-mib must be > 0, got {args.max_body_mib}"),
        (args.prompt_cache_mib >= 0, f"--prompt-cache-mib must be >= 0 (0: no cache), got {args.prompt_cache_mib}"),
        (args.prompt_cache_disk_mib >= 0, f"--prompt-cache-disk-mib must be >= 0, got {args.prompt_cache_disk_mib}"),
        (args.cache_block >= 0, f"--cache-block must be >= 0 (0: off), got {args.cache_block}"),
        (args.threads >= 0, f"--threads must be >= 0 (0: torch's default), got {args.threads}"),
        (args.shutdown_timeout >= 0, f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}"),
        (
            args.engine == "retentive" or (args.prompt_cache_dir is None and not args.cache_block),
            "--prompt-cache-dir and --cache-block are options of --engine retentive: leave them out with --engine "
            "transformers (its prefix sharing, on unless --prompt-cache-mib 0, keeps blocks in memory only)",
        ),
    )
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")
    _check_device(args.device)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: continuous batching, prompt-state cache")
    p.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoding at once, one state slot each")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; beyond: 429")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens read between two decode steps")
    p.add_argument("--max-prompt-tokens", type=int, default=16384)
    p.add_argument("--max-tokens", type=int, default=4096, help="the most tokens one choice may ask for")
    p.add_argument("--default-max-tokens", type=int, default=256, help="for chat requests without max_tokens")
    p.add_argument("--max-n", type=int, default=4, help="the most choices (n) per request, one slot each")
    p.add_argument("--max-body-mib", type=float, default=4, help="the largest request body; beyond: 413")
    p.add_argument("--api-key", default=None,
                   help=f"require Authorization: Bearer KEY on all but /health (default: ${API_KEY_ENV})")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=30,
                   help="on SIGTERM, seconds the running requests may take to finish before they are cut")  # fmt: skip
    p.add_argument("--prompt-cache-mib", type=float, default=256, help="prompt-state cache in memory (0: off)")
    p.add_argument("--prompt-cache-dir", default=None, help="spill evicted prompt states here as safetensors")
    p.add_argument("--prompt-cache-disk-mib", type=float, default=1024)
    p.add_argument("--cache-block", type=int, default=0, help="also cache the state every N prompt tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--decode-implementation", choices=DECODE_IMPLEMENTATIONS, default=None,
                   help="a RetNet's decoding step, compiled at start (eager where that fails); default: native on a "
                   "CPU (the C++ step, the fastest there; aot where it does not apply), compiled on CUDA "
                   "(torch.compile, CUDA graphs)")  # fmt: skip
    p.add_argument("--engine", choices=("retentive", "transformers"), default="retentive",
                   help="the scheduler: retentive's (any model), or transformers' own continuous batching (a "
                   "Transformer checkpoint, greedy decoding only: the baseline as its library serves it)")  # fmt: skip
    p.set_defaults(func=serve)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train retnet-tiny on Shakespeare in minutes, sample, compare the three forms")
    p.add_argument("--train-seconds", type=float, default=180, help="training time budget (sets the steps)")
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of the time budget")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--sample-tokens", type=int, default=120)
    p.add_argument("--greedy-tokens", type=int, default=24)
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="run directory (replaced)")
    p.set_defaults(func=demo)


def train_vision(args: argparse.Namespace) -> None:
    """Train ViR, RMT or the ViT baseline on an offline image dataset or an image folder; report accuracy and time."""
    from .training import TrainConfig
    from .training.vision import VisionConfig
    from .training.vision import train_vision as run

    if args.threads:
        torch.set_num_threads(args.threads)
    run_config = _run_config(args, {
        "vision": dict(
            model=args.model, data=args.data, data_root=args.data_root, batch_size=args.batch_size,
            epochs=None if args.steps else args.epochs, eval_batch_size=args.eval_batch_size, seed=args.seed,
            image_size=args.image_size, rand_augment=args.rand_augment, mixup=args.mixup, cutmix=args.cutmix,
            label_smoothing=args.label_smoothing,
        ),
        "train": dict(
            steps=args.steps or 1, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
            grad_clip=args.grad_clip, ema_decay=args.ema_decay, eval_interval=args.eval_interval,
            ckpt_interval=args.ckpt_interval, log_interval=args.log_interval, device=args.device, perplexity=False,
            activation_checkpointing=args.activation_checkpointing, progress=args.progress,
        ),
    })  # fmt: skip
    vision, config = VisionConfig(**run_config["vision"]), TrainConfig(**run_config["train"])
    trained = run(vision, config, args.out, resume=args.resume, overwrite=args.overwrite)
    result, n_params = trained.result, sum(p.numel() for p in trained.model.parameters())
    acc = result.eval.get("val_accuracy", float("nan"))
    ema = f" (EMA {result.eval['val_ema_accuracy']:.4f})" if "val_ema_accuracy" in result.eval else ""
    print(
        f"{vision.model} ({n_params:,} parameters) on {vision.data}: {'val' if vision.is_folder else 'test'} "
        f"accuracy {acc:.4f}{ema} after {trained.trainer.step} steps, {result.seconds:.0f} s training"
    )
    print(f"checkpoint: {result.checkpoint}")


def _add_train_vision(sub: argparse._SubParsersAction) -> None:
    from .training.vision import FOLDER_DEFAULTS, VISION_MODELS

    p = sub.add_parser(
        "train-vision", help="train ViR / RMT / the ViT baseline on Fashion-MNIST, digits or an image folder"
    )
    p.add_argument("--model", choices=VISION_MODELS, default="vir-tiny")
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="fashion-mnist, digits, or an image folder (train/<class>/*.jpg|png, val/<class>/)",
    )
    p.add_argument("--data-root", default=None, help="directory of Fashion-MNIST's idx files (default: Debian's)")
    p.add_argument("--out", default=None, help="run directory (default runs/<model>-<data>)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training set (unless --steps)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="a moving average of the weights, evaluated beside them (0: none; timm: 0.9998)")  # fmt: skip
    p.add_argument("--eval-interval", type=int, default=200)
    p.add_argument("--ckpt-interval", type=int, default=200)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help=ACTIVATION_CHECKPOINTING_HELP)  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the options it stored")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="delete what --out holds and start afresh")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")
    g = p.add_argument_group("image folder (timm's recipe; needs pip install 'retentive[vision]')")
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"side of the square crops the model sees (default {FOLDER_DEFAULTS['image_size']})",
    )
    g.add_argument(
        "--rand-augment",
        default=None,
        metavar="mM-nN",
        help="RandAugment: N operations of magnitude M on timm's 0-10 scale, or none "
        f"(default {FOLDER_DEFAULTS['rand_augment']})",
    )
    g.add_argument(
        "--mixup",
        type=float,
        default=None,
        help=f"share of batches mixed by MixUp (default {FOLDER_DEFAULTS['mixup']})",
    )
    g.add_argument(
        "--cutmix",
        type=float,
        default=None,
        help=f"share of batches mixed by CutMix, + --mixup <= 1 (default {FOLDER_DEFAULTS['cutmix']})",
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=None,
        help=f"of the targets (default {FOLDER_DEFAULTS['label_smoothing']})",
    )
    p.set_defaults(func=train_vision)


def bench(args: argparse.Namespace) -> None:
    """Run benchmarks/run.py (speed) or benchmarks/quality.py (``--quality``) from the source checkout.

    Options the subcommand does not know (``--contexts``, ``--seeds``, ...) go to the script.
    """
    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / ("quality.py" if args.quality else "run.py")
    if not script.exists():
        raise SystemExit(f"retentive bench runs from a source checkout; {script} is missing (git clone the repository)")
    python = args.python or sys.executable
    extra = (["--quick"] if args.quick else []) + args.extra
    print(f"$ {python} {script.relative_to(root)} {' '.join(extra)}", flush=True)
    raise SystemExit(subprocess.call([python, str(script), *extra], cwd=root))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="RetNet vs the Transformer vs the peers: tables, JSON and plots in docs/ (other options go to the script)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--quality", action="store_true", help="the perplexity comparison instead of speed")
    p.add_argument("--python", help="the interpreter to run under (the peers' environment: .venv-peers/bin/python)")
    p.set_defaults(func=bench)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert(args: argparse.Namespace) -> None:
    """Convert a torchscale, syncdoth/RetNet, flash-linear-attention or official RMT checkpoint into a
    save_pretrained folder."""
    from .models.convert import convert_checkpoint
    from .models.modeling_retnet import _download, _is_hub_id

    src = args.src
    if not Path(src).exists() and _is_hub_id(src):
        src = _download(src, {})
    source_config = None
    if args.source_config:
        source_config = json.loads(Path(args.source_config).read_text())
        if not isinstance(source_config, dict):
            raise ValueError(f"--source-config {args.source_config}: expected a JSON object of the source's settings")
    out = convert_checkpoint(src, args.out, args.layout, source_config, DTYPES.get(args.dtype))
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    rmt = json.loads((out / "config.json").read_text()).get("model_type") == "rmt"
    loader = "RMTForImageClassification" if rmt else "RetNetForCausalLM"
    print(f"wrote {out}: {files}\nload it with {loader}.from_pretrained({str(out)!r})")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a torchscale, syncdoth/RetNet (hf-retnet) or flash-linear-attention RetNet checkpoint, or an "
        "official RMT (qhfan/RMT) .pth",
    )
    p.add_argument("src", help="a checkpoint file (.pt), a downloaded model folder, or a Hub id (owner/name)")
    p.add_argument("out", help="the folder to write (config.json, model.safetensors, the tokenizer files of SRC)")
    p.add_argument("--from", dest="layout", choices=("torchscale", "hf-retnet", "fla", "rmt"), help="default: detected")
    p.add_argument(
        "--source-config",
        help="a JSON file of the source's settings the checkpoint lacks, e.g. a torchscale .pt saved without its "
        'fairseq cfg: {"activation_fn": "swish", "no_scale_embedding": false}',
    )
    p.add_argument("--dtype", choices=("source", *DTYPES), default="source", help="of the written weights")
    p.set_defaults(func=convert)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="retentive", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_inspect(sub)
    _add_serve(sub)
    _add_train_vision(sub)
    _add_bench(sub)
    _add_convert(sub)
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)  # bench passes what it does not know on to its script
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    args.given = _given_options(sub.choices[args.command], argv[argv.index(args.command) + 1 :])
    if args.command == "train-vision" and args.out is None:
        args.out = f"runs/{args.model}-{Path(args.data).name}"  # a folder's name, or the dataset's
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except (OSError, ValueError, ModuleNotFoundError, CheckpointError) as e:
        if args.verbose:
            raise
        if int(os.environ.get("RANK", "0")) > 0 and not torch.distributed.is_initialized():
            # Under torchrun every process makes the checks that precede the process group, and fails them alike:
            # process 0 says why, once. The others leave quietly with status 0, else torchrun could stop process 0
            # before it has said it; torchrun still fails, with process 0's status.
            raise SystemExit(0) from e
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    sys.exit(main())
