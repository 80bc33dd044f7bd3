// y = x W^T for a few rows of x: the products of a decoding step at batch 2 to 16 on a CPU.
//
// At so few rows a product is a read of the weights, and BLAS libraries handle it as a GEMM for large M (MKL's
// generic path on AMD costs several times the read). Here each weight row is loaded once for up to kRows rows of
// x, with one vector accumulator per row of x; larger batches go to at::mm. The reference is x @ W.t()
// (retentive/ops/linear_rows.py), and tests/ops/test_linear_rows.py holds the two equal.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace {

constexpr int64_t kLanes = 16;  // floats per vector: one AVX-512 register, two AVX2 ones, four SSE ones
constexpr int64_t kRows = 8;    // rows of x per pass over the weights: kRows accumulators stay in registers
constexpr int64_t kMaxRows = 16;  // beyond it, the product is compute-bound enough for a GEMM

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));  // an unaligned load
  return v;
}

typedef float Half __attribute__((vector_size(kLanes / 2 * sizeof(float))));
typedef float Quarter __attribute__((vector_size(kLanes / 4 * sizeof(float))));

inline float sum(Vec v) {  // by halves: a tree of vector additions, not 16 scalar ones in a chain
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// y[r, n] = sum_k x[r, k] w[n, k] for R rows of x and the weight rows n0 <= n < n1. x: (R, K); w: (N, K); y: (R, N)
template <int R>
void rows(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = w + n * K;
    Vec acc[R] = {};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      const Vec wk = load(wn + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] += wk * load(x + r * K + k);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float s = sum(acc[r]);
      for (int64_t tail = k; tail < K; ++tail) s += wn[tail] * x[r * K + tail];
      y[r * N + n] = s;
    }
  }
}

using Rows = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr Rows kByRows[kRows] = {rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>, rows<7>, rows<8>};

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear_rows: x must be (M, K) and weight (N, K), got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "linear_rows: float32 tensors only, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_rows: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  if (M > kMaxRows) {
    return at::mm(x, weight.t());
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* wp = wc.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m += kRows) {
      kByRows[std::min(kRows, M - m) - 1](xp + m * K, wp, yp + m * N, K, N, n0, n1);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(retentive, m) { m.def("linear_rows(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(retentive, CPU, m) { m.impl("linear_rows", linear_rows); }
