// y = x W^T for a few rows of x: one product of a decoding step at batch 2 to 16 on a CPU (rows.h says how).
//
// At so few rows a product is a read of the weights, and BLAS libraries handle it as a GEMM for large M (MKL's
// generic path on AMD costs several times the read); larger batches go to at::mm. The reference is x @ W.t()
// (retentive/ops/linear_rows.py), and tests/ops/test_linear_rows.py holds the two equal.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "rows.h"

namespace {

constexpr int64_t kMaxRows = 16;  // beyond it, the product is compute-bound enough for a GEMM

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
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { retentive::products(xp, M, K, wp, K, yp, N, n0, n1); });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(retentive, m) { m.def("linear_rows(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(retentive, CPU, m) { m.impl("linear_rows", linear_rows); }
