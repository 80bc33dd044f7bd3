"""Compile every retention kernel for Hopper (sm_90) ahead of time, without a GPU, and report its resources.

    python benchmarks/compile_kernels.py            # bf16, retnet-1.3b head dims (dk 256, dv 512) and dk = 64
    python benchmarks/compile_kernels.py --dims 256x512 --first  # these head dims, the first launch config only
    python benchmarks/compile_kernels.py --chunk 128             # 128-token chunks
    python benchmarks/compile_kernels.py --dtype float32         # float32 inputs: their tiles and products
    python benchmarks/compile_kernels.py --odd-length            # T not a multiple of 16 (a prompt of any length)
    python benchmarks/compile_kernels.py --documents             # rows that pack documents (retention's starts)

For each kernel and each launch configuration it is tuned over (warps, stages): registers per thread,
stack bytes (non-zero means spills to local memory), shared memory, whether the matrix products became
Hopper's ``wgmma``, and how many dot results are transposed (``tt.trans`` of a tensor in a dot's output layout,
``#mma``, in the TTGIR): Triton 3.4 and later on Hopper miscompile such a transpose fed into another dot
(flash-linear-attention issue 640), so every kernel must have none. This is what the compiler says, not a timing:
it catches spills, slow paths and that pattern before any GPU time is spent.

Each kernel is compiled as a launch would compile it: Triton's JIT tells the compiler which arguments are multiples
of 16 (pointers 16-byte aligned, as fresh tensors are; integers divisible by 16), which lets it vectorize loads
and stores. Here every pointer is aligned, and T and CHUNK are multiples of 16 (8,192 tokens in 64-token chunks)
unless ``--odd-length``; H and NT are not assumed to be.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import table_row, table_rule

FLOAT32_POINTERS = {"log_g", "S0", "z0", "S_final", "z_final", "dS_final", "dz_final", "dS0", "dz0", "S", "z", "S_out"}
FLOAT32_POINTERS |= {"z_out", "r", "dr", "hz", "dhz"}
INTEGERS = {"T", "H", "NT", "CHUNK"}
LENGTHS = {"T", "CHUNK"}  # multiples of 16 at the usual lengths, unless --odd-length
DATA_TYPES = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


def signature(kernel, constexprs: dict, data: str) -> dict:
    """Triton types of every argument, from its name: float32 state, int64 offsets, ``data`` (e.g. "*bf16") for
    the rest."""
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in INTEGERS:
            types[name] = "i32"
        elif name == "scale":
            types[name] = "fp32"
        elif name == "offset":
            types[name] = "*i64"
        elif name == "docs":
            types[name] = "*i32"
        else:
            types[name] = "*fp32" if name in FLOAT32_POINTERS else data
    return types


def divisible(kernel, types: dict, lengths: set[str]) -> dict:
    """The arguments a launch would mark ``tt.divisibility`` 16: every pointer, and the integers in ``lengths``."""
    marked = [i for i, name in enumerate(kernel.arg_names) if types[name].startswith("*") or name in lengths]
    return {(i,): [["tt.divisibility", 16]] for i in marked}


def resources(cubin: bytes, triton_dir: Path) -> tuple[int, int]:
    """(registers, stack bytes) that cuobjdump reads from the cubin."""
    path = Path("/tmp") / f"retentive-{os.getpid()}.cubin"
    path.write_bytes(cubin)
    report = subprocess.run(
        [str(triton_dir / "backends/nvidia/bin/cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True
    ).stdout
    path.unlink()
    reg, stack = re.search(r"REG:(\d+) STACK:(\d+)", report).groups()
    return int(reg), int(stack)


def transposed_dot_results(ttgir: str) -> int:
    """How many ``tt.trans`` in the TTGIR take a tensor in a dot's output layout (``#mma``)."""
    return len(re.findall(r"tt\.trans [^\n]*: tensor<[^>]*#mma\d*> ->", ttgir))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", nargs="+", default=["256x512", "64x64"], help="head dims to compile for, DKxDV")
    p.add_argument("--first", action="store_true", help="only the first launch configuration of each kernel")
    p.add_argument("--chunk", type=int, default=64, help="tokens per chunk (a power of two)")
    p.add_argument("--dtype", choices=list(DATA_TYPES), default="bfloat16", help="of q, k, v and the gradients")
    p.add_argument("--odd-length", action="store_true", help="T not a multiple of 16: its loads along T unaligned")
    p.add_argument("--documents", action="store_true", help="rows that pack documents (the kernels read docs)")
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from retentive.ops.triton.chunk_grad import chunk_grad_qk_kernel, chunk_grad_v_kernel
    from retentive.ops.triton.chunk_output import chunk_output_kernel
    from retentive.ops.triton.chunk_state import chunk_state_kernel
    from retentive.ops.triton.chunk_state_grad import chunk_state_grad_kernel
    from retentive.ops.triton.common import LAUNCHES, Tiling
    from retentive.ops.triton.recurrent import STEP_BV, decode_step_kernel

    header = ["kernel", "dk", "dv", "warps", "stages", "registers", "stack (spill) bytes", "shared KB", "wgmma"]
    header.append("dot results transposed")
    print(table_row(header), table_rule(len(header)), sep="\n")
    for Dk, Dv in (map(int, dims.split("x")) for dims in args.dims):
        # the tiles and dot precision the library picks for this dtype, at the chunk asked for
        q, v = (torch.empty(1, args.chunk, D, dtype=getattr(torch, args.dtype), device="meta") for D in (Dk, Dv))
        tiles = {**Tiling.of(q, v, torch.empty(1), args.chunk, args.documents).meta, "BC": args.chunk}
        step = dict(Dk=Dk, Dv=Dv, BK=triton.next_power_of_2(Dk), BV=STEP_BV)
        kernels = [
            (chunk_state_kernel, {**tiles, "HAS_S0": True}),
            (chunk_output_kernel, {**tiles, "WITH_ROWSUM": True}),
            (chunk_state_grad_kernel, {**tiles, "WITH_ROWSUM": True}),
            (chunk_grad_qk_kernel, {**tiles, "WITH_ROWSUM": True}),
            (chunk_grad_v_kernel, tiles),
            (decode_step_kernel, {**step, "NORMALIZE_DECAY": True, "NORMALIZE_RETENTION": True}),
        ]
        for kernel, constexprs in kernels:
            autotuned = isinstance(kernel, triton.runtime.Autotuner)
            fn = kernel.fn if autotuned else kernel  # the jitted function
            launches = LAUNCHES if autotuned else [(4, 1)]  # the decode step is launched as (4, 1)
            launches = launches[:1] if args.first else launches
            for warps, stages in launches:
                types = signature(fn, constexprs, DATA_TYPES[args.dtype])
                attrs = divisible(fn, types, set() if args.odd_length else LENGTHS)
                src = ASTSource(fn=fn, signature=types, constexprs=constexprs, attrs=attrs)
                options = {"num_warps": warps, "num_stages": stages}
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
                reg, stack = resources(compiled.asm["cubin"], Path(triton.__file__).parent)
                wgmma = "wgmma" in compiled.asm["ptx"]
                shared = compiled.metadata.shared // 1024
                transposed = transposed_dot_results(compiled.asm["ttgir"])
                row = (fn.__name__, Dk, Dv, warps, stages, reg, stack, shared, wgmma, transposed)
                print(table_row([str(x) for x in row]))


if __name__ == "__main__":
    main()
