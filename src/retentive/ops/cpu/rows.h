// y = x W^T for a few rows of x, over a range of W's rows: the products of a decoding step on a CPU.
//
// At a few rows a product is a read of the weights. Each weight row is loaded once for up to kRows rows of x, with
// one vector accumulator per (row of x, row of W); at one or two rows of x, several rows of W share each load of x,
// so that independent accumulators hide the latency of the fused multiply-adds. Shared by linear_rows.cpp (one
// product per call) and decode_step.cpp (every product of a decoding step in one call).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace retentive {

constexpr int64_t kLanes = 16;  // floats per vector: one AVX-512 register, two AVX2 ones, four SSE ones
constexpr int64_t kRows = 8;    // rows of x per pass over a weight row: their accumulators stay in registers
constexpr int64_t kTile = 8;    // weight rows (at most 16 KiB at K = 512) re-used from L1 by every pass of kRows

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float Half __attribute__((vector_size(kLanes / 2 * sizeof(float))));
typedef float Quarter __attribute__((vector_size(kLanes / 4 * sizeof(float))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));  // an unaligned load
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }  // an unaligned store

inline float sum(Vec v) {  // by halves: a tree of vector additions, not 16 scalar ones in a chain
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// y[r * ldy + j] = sum_k x[r * ldx + k] w[j * K + k] for R rows of x and W weight rows
template <int R, int W>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
  Vec acc[R][W] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vec wk[W];
#pragma GCC unroll 4
    for (int j = 0; j < W; ++j) wk[j] = load(w + j * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec xr = load(x + r * ldx + k);
#pragma GCC unroll 4
      for (int j = 0; j < W; ++j) acc[r][j] += wk[j] * xr;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < W; ++j) {
      float s = sum(acc[r][j]);
      for (int64_t tail = k; tail < K; ++tail) s += w[j * K + tail] * x[r * ldx + tail];
      y[r * ldy + j] = s;
    }
  }
}

// weight rows sharing each load of x: enough independent accumulators at one or two rows of x
template <int R>
constexpr int kShare = R == 1 ? 4 : R == 2 ? 2 : 1;

// y[r * ldy + n] = x[r] . w[n] for R rows of x and n0 <= n < n1
template <int R>
void rows(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kShare<R> <= n1; n += kShare<R>) tile<R, kShare<R>>(x, ldx, w + n * K, K, y + n, ldy);
  for (; n < n1; ++n) tile<R, 1>(x, ldx, w + n * K, K, y + n, ldy);
}

using Rows = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t);
constexpr Rows kByRows[kRows] = {rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>, rows<7>, rows<8>};

// y[m * ldy + n] = x[m] . w[n] for every m < M and n0 <= n < n1. x: (M, K) rows ldx apart; w: (N, K) contiguous.
// Tiles of weight rows outside, passes of kRows rows of x inside: the weights are read from memory once.
inline void products(const float* x, int64_t M, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                     int64_t n0, int64_t n1) {
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t t1 = std::min(t0 + kTile, n1);
    for (int64_t m = 0; m < M; m += kRows) {
      kByRows[std::min(kRows, M - m) - 1](x + m * ldx, ldx, w, K, y + m * ldy, ldy, t0, t1);
    }
  }
}

}  // namespace retentive
