"""What every retention kernel shares: where a program works, its tiles, decay powers inside a chunk, tile sizes,
launch checks.

Kernel arguments follow one layout: token-major tensors (BH, T, D) with the batch and heads flattened (q, k, v,
do, ...), stacks of states (BH, NT, Dk, Dv) and of key sums (BH, NT, Dk), one entry per chunk. After the tensors,
every chunk kernel takes the documents ``docs`` (B, T) int32 of packed rows (read when HAS_DOCS: each token's count
of document starts at or before it in its row), then the sizes of :class:`Tiling` in one order: T tokens, H heads, NT
chunks, CHUNK tokens per chunk (the last chunk may be shorter), then at compile time Dk, Dv, BC (a power-of-two tile
>= CHUNK), BK and BV (tiles of Dk and Dv), the kernel's flags, PRECISION (of tl.dot: see :func:`dot_precision`) and
HAS_DOCS.

A tile is a pair (pointers, mask) made by :func:`tile` or :func:`vector` from index ranges, each a pair (indices,
mask), and read or written by :func:`load` and :func:`store`: no kernel computes an offset itself.

Decay powers are always exp(delta * log gamma) with delta >= 0 (docs/math.md, Why nothing overflows), and every
power that would belong to a row past the end of a short chunk is set to 0 before use, so no inf ever meets a
masked 0.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_CHUNK = 64  # tokens per chunk the kernels use at most: 64 x 64 score tiles suit the tensor cores
MAX_TILE = 64  # head-dim tile (Dk or Dv) one program holds; larger heads are looped over or split
# float32 tiles hold twice the bytes and their products run on the CUDA cores ("ieee", see dot_precision), whose
# operands sit in registers: compiled for sm_90 at 8 warps, 64-wide tiles spill up to 1.5 KB a thread, 32-wide
# none (benchmarks/compile_kernels.py --dtype float32)
MAX_TILE_FLOAT32 = 32
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (warps, pipelining stages) the chunk kernels are tuned over on a GPU. Compiled for sm_90, none spills at 8 warps;
# in float32 some spill at 4 (benchmarks/compile_kernels.py), so 8 comes first: the interpreter takes it.
DEFAULT_LAUNCHES = ((8, 2), (8, 3), (4, 2), (8, 1))
LAUNCHES_ENV = "RETENTIVE_TRITON_LAUNCHES"


def launches_from(text: str | None) -> tuple[tuple[int, int], ...]:
    """The launches the chunk kernels are tuned over: DEFAULT_LAUNCHES, or ``text`` (the environment's
    RETENTIVE_TRITON_LAUNCHES) as WARPSxSTAGES items separated by commas, e.g. "8x2,8x3": a way round a launch
    that a compiler gets wrong on some GPU, as Triton has done on Hopper for other kernels."""
    if not text:
        return DEFAULT_LAUNCHES
    try:
        parsed = tuple((int(w), int(s)) for w, s in (item.strip().split("x") for item in text.split(",")))
    except ValueError:
        parsed = ()
    if not parsed or any(w not in (1, 2, 4, 8, 16, 32) or s < 1 for w, s in parsed):
        raise ValueError(
            f"{LAUNCHES_ENV}={text!r}: expected launches as WARPSxSTAGES separated by commas, warps a power of two "
            "from 1 to 32 and stages at least 1, e.g. 8x2,8x3; unset it for the defaults"
        )
    return parsed


LAUNCHES = launches_from(os.environ.get(LAUNCHES_ENV))


def tuned(kernel):
    """Autotune a chunk kernel over LAUNCHES, once per head-dim and tile shape. The chunk kernels only write
    their outputs, so trial runs are harmless. In the interpreter, where timing means nothing, no trials."""
    launches = LAUNCHES[:1] if interpreted() else LAUNCHES
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in launches]
    return triton.autotune(configs=configs, key=["Dk", "Dv", "BC", "BK", "BV", "PRECISION", "HAS_DOCS"])(kernel)


@triton.jit
def program_head(log_g, H, AXIS: tl.constexpr):
    """The flattened batch-head this program works on, grid axis AXIS (int64: offsets pass 2^31 elements at long
    sequences), and its log gamma."""
    i_bh = tl.program_id(AXIS).to(tl.int64)
    return i_bh, tl.load(log_g + i_bh % H)


@triton.jit
def features(i, BD: tl.constexpr, D):
    """Tile i of a head dim of D features: (indices (BD,), mask)."""
    r = i * BD + tl.arange(0, BD)
    return r, r < D


@triton.jit
def chunk_rows(i_c, CHUNK, T, BC: tl.constexpr):
    """Chunk i_c's tokens as (absolute rows (BC,), mask), and its length. The mask drops the rows of the BC-row
    tile past the chunk's end: BC >= CHUNK, and the last chunk may be shorter."""
    j = tl.arange(0, BC)
    start = i_c * CHUNK
    length = tl.minimum(CHUNK, T - start)
    return (start + j, j < length), length


@triton.jit
def chunk_program(log_g, H, T, CHUNK, BC: tl.constexpr, D, BD: tl.constexpr):
    """Where a program of a kernel parallel over chunks works; grid (tiles of a head dim D, chunks, batch-heads).

    Returns its batch-head i_bh, log gamma, chunk index i_c, the chunk's rows and length, and its tile of D.
    """
    i_bh, lg = program_head(log_g, H, 2)
    i_c = tl.program_id(1)
    rows, length = chunk_rows(i_c, CHUNK, T, BC)
    return i_bh, lg, i_c, rows, length, features(tl.program_id(0), BD, D)


@triton.jit
def scan_program(log_g, H, Dk, Dv, BK: tl.constexpr, BV: tl.constexpr):
    """Where a program of a scan over chunks works; grid (tiles of Dk, tiles of Dv, batch-heads).

    Returns its batch-head i_bh, log gamma, its (BK, BV) tile of the state as key and value features, and the keys
    of the key sum it writes: the programs of the first Dv tile carry the key sum beside the state.
    """
    i_bh, lg = program_head(log_g, H, 2)
    keys = features(tl.program_id(0), BK, Dk)
    return i_bh, lg, keys, features(tl.program_id(1), BV, Dv), written_once(keys, 1)


@triton.jit
def written_once(indices, AXIS: tl.constexpr):
    """``indices`` masked off in every program but the first along grid axis AXIS: what the programs along that
    axis compute alike (z, r) is written by one of them."""
    r, mask = indices
    return r, mask & (tl.full(r.shape, tl.program_id(AXIS), tl.int32) == 0)


@triton.jit
def tile(x, i, R, C, rows, cols, TRANSPOSED: tl.constexpr = False):
    """The tile rows x cols of matrix i in x, a stack of row-major R x C matrices: a (BR, BC) tile, or (BC, BR)
    when TRANSPOSED. ``rows`` and ``cols`` are (indices, mask) pairs. Returns (pointers, mask)."""
    r, r_mask = rows
    c, c_mask = cols
    x += i * R * C
    if TRANSPOSED:  # if/else: after an early return, Triton would require both returns to have one shape
        return x + r[None, :] * C + c[:, None], r_mask[None, :] & c_mask[:, None]
    else:
        return x + r[:, None] * C + c[None, :], r_mask[:, None] & c_mask[None, :]


@triton.jit
def vector(x, i, C, cols):
    """The entries ``cols`` (indices, mask) of vector i in x, a stack of C-vectors. Returns (pointers, mask)."""
    c, c_mask = cols
    return x + i * C + c, c_mask


@triton.jit
def load(t):
    """The values of tile ``t`` (pointers, mask), 0 where masked."""
    pointers, mask = t
    return tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def store(t, value):
    """Write ``value`` to tile ``t`` (pointers, mask), cast to the tensor's dtype."""
    pointers, mask = t
    tl.store(pointers, value.to(pointers.dtype.element_ty), mask=mask)


@triton.jit
def chunk_documents(docs, i_bh, H, T, i_c, CHUNK, BC: tl.constexpr, HAS_DOCS: tl.constexpr):
    """The documents of chunk i_c's tokens, counted from the one open where the chunk starts (the document of the
    incoming state): (BC,) int32, and the same count for the chunk's last token. Without HAS_DOCS, 0 and 0, which
    nothing reads: no work, not even in the interpreter, where every op costs."""
    if HAS_DOCS:  # if/else: the two returns differ in shape, and only the one compiled is kept
        rows, length = chunk_rows(i_c, CHUNK, T, BC)
        i_b = i_bh // H  # the batch row of this batch-head
        start = i_c * CHUNK
        row = docs + i_b * T
        before = tl.load(row + start - 1, mask=start > 0, other=0)  # the document open before the chunk
        doc = load(vector(docs, i_b, T, rows)) - before
        return doc, tl.load(row + start + length - 1) - before
    else:
        return 0, 0


@triton.jit
def chunk_decays(log_g, length, BC: tl.constexpr, doc, last, HAS_DOCS: tl.constexpr):
    """For the local indices j of a chunk tile with ``length`` valid tokens (j past the end give 0), and the
    documents ``doc``, ``last`` of its tokens (:func:`chunk_documents`, read when HAS_DOCS).

    Returns gamma^(j+1) (state -> token j), gamma^(length-1-j) (token j -> chunk end), and
    the causal decay matrix D_jl = gamma^(j-l) for j >= l, else 0; each 0 where it would cross a document's start.
    """
    j = tl.arange(0, BC)
    valid = j < length
    jf = j.to(tl.float32)
    g_in = tl.where(valid, tl.exp((jf + 1) * log_g), 0.0)
    g_out = tl.where(valid, tl.exp((length - 1 - jf) * log_g), 0.0)
    delta = jf[:, None] - jf[None, :]
    causal = (delta >= 0) & valid[:, None] & valid[None, :]
    if HAS_DOCS:
        g_in = tl.where(doc == 0, g_in, 0.0)  # tokens after a start in the chunk read nothing of the state
        g_out = tl.where(doc == last, g_out, 0.0)  # only the document open at the chunk's end enters the state
        causal = causal & (doc[:, None] == doc[None, :])
    D = tl.where(causal, tl.exp(tl.where(causal, delta, 0.0) * log_g), 0.0)
    return g_in, g_out, D


@triton.jit
def scan_step(
    S, xT, y, log_g, length, doc, last,
    BC: tl.constexpr, TO_END: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    """One chunk of a scan over chunks: gamma^length S + (xT ⊙ g) y, with xT (BK, BC), y (BC, BV) and g the decay of
    each token to the chunk's end, gamma^(length-1-j) (TO_END: the state scan), or from its start, gamma^(j+1) (the
    gradient scan); with documents (``doc``, ``last``: :func:`chunk_documents`), 0 across a start.

    Returns the new S (BK, BV) float32, xT ⊙ g in float32 and gamma^length (0 if a document starts in the chunk).
    """
    g_in, g_out, _ = chunk_decays(log_g, length, BC, doc, last, HAS_DOCS)
    x_g = xT.to(tl.float32) * (g_out if TO_END else g_in)[None, :]
    g_chunk = tl.exp(length.to(tl.float32) * log_g)
    if HAS_DOCS:
        g_chunk = tl.where(last == 0, g_chunk, 0.0)
    return S * g_chunk + mma(x_g.to(y.dtype), y, PRECISION), x_g, g_chunk


@triton.jit
def store_state(S_ptr, z_ptr, i, S, z, Dk, Dv, keys, values, z_keys):
    """Write a state tile S (BK, BV) at (keys, values) and its key sum z (BK,) at ``z_keys`` as entry i of the
    stacks S_ptr (..., Dk, Dv) and z_ptr (..., Dk)."""
    store(tile(S_ptr, i, Dk, Dv, keys, values), S)
    store(vector(z_ptr, i, Dk, z_keys), z)


@triton.jit
def mma(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in float32; PRECISION "upcast" works around Triton 3.9's interpreter, whose
    dot multiplies the raw bits of bfloat16 operands as integers."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PRECISION)


def block_size(dim: int, limit: int = MAX_TILE) -> int:
    """A power-of-two tile >= 16 (the smallest tl.dot operand) covering ``dim`` up to ``limit``."""
    return min(limit, max(16, triton.next_power_of_2(dim)))


class Tiling(NamedTuple):
    """The sizes every chunk kernel takes, derived once per call."""

    BH: int  # batch x heads
    T: int  # tokens
    H: int  # heads: the batch-head i_bh has log gamma number i_bh % H
    NT: int  # chunks
    chunk: int  # tokens per chunk, at most MAX_CHUNK (the last chunk may be shorter)
    Dk: int
    Dv: int
    BC: int  # power-of-two tile >= chunk
    BK: int  # tile of Dk
    BV: int  # tile of Dv
    precision: str  # of tl.dot: see dot_precision
    has_docs: bool  # rows pack documents: the kernels read docs

    @classmethod
    def of(cls, q: Tensor, v: Tensor, log_g: Tensor, chunk_size: int, has_docs: bool = False) -> Tiling:
        """Tiles for q (BH, T, Dk), v (BH, T, Dv) and log_g (H,); chunks longer than MAX_CHUNK are cut to MAX_CHUNK.

        Any chunking gives the same retention up to rounding, so the cut changes no result.
        """
        BH, T, Dk = q.shape
        Dv = v.shape[-1]
        chunk = min(chunk_size, MAX_CHUNK)
        BC = max(16, triton.next_power_of_2(chunk))
        NT = triton.cdiv(T, chunk)
        limit = MAX_TILE_FLOAT32 if q.dtype == torch.float32 else MAX_TILE
        BK, BV = block_size(Dk, limit), block_size(Dv, limit)
        return cls(BH, T, log_g.numel(), NT, chunk, Dk, Dv, BC, BK, BV, dot_precision(q.dtype), has_docs)

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """The kernels' arguments T, H, NT, CHUNK."""
        return self.T, self.H, self.NT, self.chunk

    @property
    def meta(self) -> dict[str, int | str]:
        """The kernels' compile-time arguments Dk, Dv, BC, BK, BV, PRECISION, HAS_DOCS."""
        meta = dict(Dk=self.Dk, Dv=self.Dv, BC=self.BC, BK=self.BK, BV=self.BV, PRECISION=self.precision)
        return meta | dict(HAS_DOCS=self.has_docs)

    def scan_grid(self) -> tuple[int, int, int]:
        """The grid of a scan over chunks: (tiles of Dk, tiles of Dv, batch-heads), see :func:`scan_program`."""
        return triton.cdiv(self.Dk, self.BK), triton.cdiv(self.Dv, self.BV), self.BH

    def chunk_grid(self, D: int, BD: int) -> tuple[int, int, int]:
        """The grid of a kernel parallel over chunks: (tiles of D, chunks, batch-heads), see :func:`chunk_program`."""
        return triton.cdiv(D, BD), self.NT, self.BH


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs are multiplied in full float32 ("ieee"), not tf32, to keep the 1e-5 tolerance."""
    if dtype == torch.bfloat16 and interpreted():
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreted() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_runnable(*tensors: Tensor) -> None:
    """Raise if these tensors cannot go through a Triton kernel here."""
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the Triton kernels take {KERNEL_DTYPES}, got {t.dtype}: use backend='torch'")
        if not t.is_cuda and not interpreted():
            raise ValueError(
                f"the Triton kernels need CUDA tensors, got a tensor on {t.device}: move it to a GPU, use "
                "backend='torch', or set TRITON_INTERPRET=1 before importing triton to run them on the CPU"
            )
