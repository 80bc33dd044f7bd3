// One decoding step of the whole RetNet language model on a CPU, in one parallel region: ids (M, 1) and every
// layer's state -> logits (M, 1, V) and the new states.
//
// A step of a small model is a read of its weights plus a little arithmetic per token; what costs more than the
// read, when each op is a call of its own, is dispatch, allocation and a fork and join of the threads per op. Here
// the threads start once per step and meet at a barrier only where a whole vector must be complete before anyone
// reads it: after the projections, the retention, the output projection, the FFN's first product and its second
// (five per layer). Small vector work (the block norms, a norm of the FFN's hidden units) is done by every thread
// for itself, into memory of its own, which costs less than a barrier. Products split each weight's rows evenly
// among the threads (rows.h; past 16 rows, each thread's share is one call of ATen's GEMM); the retention splits
// (row, head) pairs.
//
// The reference is the eager step, retentive.models.decoding.decode_logits; tests/models/test_decoding.py holds the
// two equal for every option of the config. The Python side (retentive/models/native_step.py) lays out the weights
// and options as the enums below say, once per model (a DecodeStep), and calls its step() once per token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "rows.h"

namespace {

using VecF = at::vec::Vectorized<float>;  // exp and erf as PyTorch's own CPU kernels compute them

// the options, as integers: their order in `options`
enum Option { kNormRms, kFfnActivation, kFfnGated, kFfnNorm, kGate, kHeadNorm, kRotary, kRotaryHalves,
              kNormalizeDecay, kNormalizeRetention, kEmbedNorm, kNumOptions };
enum Scalar { kNormEps, kHeadNormEps, kEmbedScale, kNumScalars };
enum Activation { kNone = 0, kGelu, kRelu, kSilu, kSigmoid };
enum Norm { kNoNorm = 0, kLayerNorm, kRmsNorm };

// the weights, as `weights` lists them: a few of the model's, then kPerLayer for each layer
enum Global { kEmbed, kEmbedNormW, kEmbedNormB, kFinalNormW, kFinalNormB, kHeadW, kHeadB, kRotaryAngles, kGlobals };
enum Layer { kNorm1W, kNorm1B, kQW, kQB, kKW, kKB, kVW, kVB, kGW, kGB, kOW, kOB, kHeadNormW, kHeadNormB, kLogGamma,
             kNorm2W, kNorm2B, kUpW, kUpB, kGateW, kGateB, kDownW, kDownB, kFfnNormW, kFfnNormB, kPerLayer };

// p[i] = f(p[i]) for i < n, a vector at a time
template <typename F>
void map(float* p, int64_t n, F f) {
  int64_t i = 0;
  for (; i + VecF::size() <= n; i += VecF::size()) f(VecF::loadu(p + i)).store(p + i);
  if (i < n) f(VecF::loadu(p + i, n - i)).store(p + i, n - i);
}

void activate(float* p, int64_t n, int64_t kind) {
  const VecF one(1.f), half(0.5f), root_half(M_SQRT1_2);
  switch (kind) {  // the formulas of PyTorch's CPU kernels for gelu (exact), relu, silu and sigmoid
    case kGelu: return map(p, n, [&](VecF x) { return x * half * (one + (x * root_half).erf()); });
    case kRelu: return map(p, n, [&](VecF x) { return at::vec::clamp_min(x, VecF(0.f)); });
    case kSilu: return map(p, n, [&](VecF x) { return x / (one + x.neg().exp()); });
    case kSigmoid: return map(p, n, [&](VecF x) { return (one + x.neg().exp()).reciprocal(); });
    default: return;
  }
}

// y = norm(x) * w + b over n features: LayerNorm or RMSNorm; w and b may be null. y may be x.
void normalize(const float* x, float* y, int64_t n, int64_t kind, const float* w, const float* b, float eps) {
  using retentive::kLanes, retentive::load, retentive::sum, retentive::Vec;
  const int64_t whole = n - n % kLanes;  // vectors, then a scalar tail
  float mean = 0;
  if (kind == kLayerNorm) {
    Vec acc = {};
    for (int64_t i = 0; i < whole; i += kLanes) acc += load(x + i);
    float total = sum(acc);
    for (int64_t i = whole; i < n; ++i) total += x[i];
    mean = total / n;
  }
  Vec acc = {};
  for (int64_t i = 0; i < whole; i += kLanes) {
    const Vec c = load(x + i) - mean;
    acc += c * c;
  }
  float square = sum(acc);
  for (int64_t i = whole; i < n; ++i) square += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1 / std::sqrt(square / n + eps);
  for (int64_t i = 0; i < whole; i += kLanes) {
    Vec v = (load(x + i) - mean) * rstd;
    if (w) v *= load(w + i);
    if (b) v += load(b + i);
    retentive::store(y + i, v);
  }
  for (int64_t i = whole; i < n; ++i) {
    const float v = (x[i] - mean) * rstd;
    y[i] = (w ? v * w[i] : v) + (b ? b[i] : 0.f);
  }
}

// a store around the caches: a new state is read again only at the next token, after the weights of the whole step
// have gone through the caches; written past them, it neither evicts weights nor reads its lines first. p: aligned
inline void store_around(float* p, retentive::Vec v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  _mm256_stream_ps(p, __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_stream_ps(p + 8, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
#else
  retentive::store(p, v);
#endif
}

// after a thread's stores around the caches, before others may read them
inline void fence_stores() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// [n0, n1): thread t's share of n rows among nt threads
inline void share(int64_t n, int t, int nt, int64_t& n0, int64_t& n1) {
  n0 = n * t / nt;
  n1 = n * (t + 1) / nt;
}

// the first largest of p[0, n), NaN above all (as torch.argmax takes it): its index, or -1 where n == 0. The largest
// value is found a vector at a time (at::vec::maximum carries a NaN through), then the first place that holds it: a
// comparison per element in a chain of branches took 8 µs over 4,096 logits, this takes 1.4-1.7
inline int64_t first_max(const float* p, int64_t n) {
  if (n <= 0) return -1;
  VecF lanes(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + VecF::size() <= n; i += VecF::size()) lanes = at::vec::maximum(lanes, VecF::loadu(p + i));
  float top = -std::numeric_limits<float>::infinity(), lane[VecF::size()];
  const auto take = [&top](float v) {
    if (!std::isnan(top) && (std::isnan(v) || v > top)) top = v;
  };
  lanes.store(lane);
  for (float v : lane) take(v);
  for (; i < n; ++i) take(p[i]);
  int64_t first = 0;
  if (std::isnan(top)) {
    while (!std::isnan(p[first])) ++first;
  } else {
    while (p[first] != top) ++first;
  }
  return first;
}

// from this many rows of x on (three passes of rows.h over each weight tile), ATen's GEMM, blocked for registers and
// caches, is faster (batch 24 and up, measured in docs/benchmarks.md)
constexpr int64_t kGemmRows = 2 * retentive::kRows + 1;

// y[m, n] = x[m] . w[n] (+ b[n]) for every row m and thread t's share of w's rows. x: (M, K); y: (M, N)
void product(const float* x, int64_t M, const float* w, const float* b, int64_t N, int64_t K, float* y, int t,
             int nt) {
  int64_t n0, n1;
  share(N, t, nt, n0, n1);
  if (M >= kGemmRows && n1 > n0) {  // y[:, n0:n1] = x W[n0:n1]^T: the CPU's mm, past the dispatcher, on this thread
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    at::Tensor out = at::from_blob(y + n0, {M, n1 - n0}, {N, 1}, f32);
    at::cpu::mm_out(out, at::from_blob(const_cast<float*>(x), {M, K}, f32),
                    at::from_blob(const_cast<float*>(w + n0 * K), {K, n1 - n0}, {1, K}, f32));  // W[n0:n1]^T
  } else {
    retentive::products(x, M, K, w, K, y, N, n0, n1);
  }
  if (b) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) y[m * N + n] += b[n];
  }
}

// one (row, head): rotate q and k, S' = gamma S + k^T v, z' = gamma z + k, o = scale q S' with the normalizations,
// then the head's norm and the gate: y = gate(g) * norm(o). Writes S' and z' to the new state and o to y.
void retain(int64_t dk, int64_t dv, const float* q_in, const float* k_in, const float* v, const float* g,
            const float* S, const float* z, float* S_out, float* z_out, float* y, const float* phase, float gamma,
            float c_sqrt, const int64_t* opt, const float* scalar, const float* norm_w, const float* norm_b,
            float scale, float* work) {
  const int64_t half = dk / 2;
  float* q = work;
  float* k = work + dk;
  std::copy(q_in, q_in + dk, q);
  std::copy(k_in, k_in + dk, k);
  if (opt[kRotary]) {  // (a, b) -> (a cos - b sin, a sin + b cos), a complex product per pair
    const int64_t step = opt[kRotaryHalves] ? 1 : 2, other = opt[kRotaryHalves] ? half : 1;
    for (float* t : {q, k}) {
      for (int64_t i = 0; i < half; ++i) {
        float* a = t + i * step;
        const float re = a[0], im = a[other], c = phase[2 * i], s = phase[2 * i + 1];
        a[0] = re * c - im * s;
        a[other] = re * s + im * c;
      }
    }
  }
  float* o = work + 2 * dk;
  std::fill(o, o + dv, 0.f);
  float r = 0;
  // in place (S_out == S), plain stores: a streaming store to the line just read costs more than a write-back
  const bool around = S_out != S && dv % retentive::kLanes == 0 &&
                      reinterpret_cast<uintptr_t>(S_out) % sizeof(retentive::Vec) == 0;
  for (int64_t i = 0; i < dk; ++i) {
    const float ki = k[i], qi = q[i];
    const float* s_in = S + i * dv;
    float* s_out = S_out + i * dv;
    int64_t j = 0;
    for (; around && j < dv; j += retentive::kLanes) {
      const retentive::Vec s = ki * retentive::load(v + j) + gamma * retentive::load(s_in + j);
      store_around(s_out + j, s);
      retentive::store(o + j, retentive::load(o + j) + qi * s);
    }
    for (; j < dv; ++j) {
      const float s = ki * v[j] + gamma * s_in[j];
      s_out[j] = s;
      o[j] += qi * s;
    }
    z_out[i] = ki + gamma * z[i];
    r += qi * z_out[i];
  }
  float divide = c_sqrt;  // o = scale q S' / sqrt(c_n), then / max(|r|, 1) with r = scale q . z' / sqrt(c_n)
  if (opt[kNormalizeRetention]) divide *= std::max(std::abs(r * scale / c_sqrt), 1.f);
  for (int64_t j = 0; j < dv; ++j) o[j] = o[j] * scale / divide;
  if (opt[kHeadNorm] != kNoNorm) normalize(o, o, dv, opt[kHeadNorm], norm_w, norm_b, scalar[kHeadNormEps]);
  if (g) {
    std::copy(g, g + dv, y);
    activate(y, dv, opt[kGate]);
    for (int64_t j = 0; j < dv; ++j) y[j] *= o[j];
  } else {
    std::copy(o, o + dv, y);
  }
}

// One model's step: its weights (the tensors themselves, so that a change in place or through .data is seen),
// options and dimensions, checked once; step() runs it for M rows.
struct DecodeStep {
  std::vector<std::optional<at::Tensor>> weights;
  std::vector<int64_t> opt;
  float scalar[kNumScalars];
  int64_t d, V, H, dk, dv, F, L;

  DecodeStep(std::vector<std::optional<at::Tensor>> weights_, std::vector<int64_t> options, std::vector<double> scalars)
      : weights(std::move(weights_)), opt(std::move(options)) {
    TORCH_CHECK(opt.size() == kNumOptions && scalars.size() == kNumScalars,
                "DecodeStep: ", kNumOptions, " options and ", kNumScalars, " scalars expected");
    TORCH_CHECK(weights.size() >= kGlobals + kPerLayer && (weights.size() - kGlobals) % kPerLayer == 0,
                "DecodeStep: weights must hold ", kGlobals, " tensors and ", kPerLayer, " per layer");
    const int required[] = {kEmbed, kFinalNormW, kHeadW, kGlobals + kQW, kGlobals + kVW, kGlobals + kLogGamma,
                            kGlobals + kUpW};
    for (int i : required)
      TORCH_CHECK(weights[i].has_value(), "DecodeStep: weights[", i, "] is required");
    for (int i = 0; i < kNumScalars; ++i) scalar[i] = static_cast<float>(scalars[i]);
    L = (weights.size() - kGlobals) / kPerLayer;
    d = weights[kEmbed]->size(1);
    V = weights[kHeadW]->size(0);
    H = weights[kGlobals + kLogGamma]->numel();
    dk = d / H;
    dv = weights[kGlobals + kVW]->size(0) / H;
    F = weights[kGlobals + kUpW]->size(0);
    TORCH_CHECK(H * dk == d && (!opt[kRotary] || dk % 2 == 0), "DecodeStep: dim_model must be a multiple of heads");
    pointers();
  }

  // each weight's data, null where absent; each checked against the model's dimensions, at every step (a change
  // through .data may have replaced it)
  std::vector<const float*> pointers() const {
    const int64_t dvall = H * dv;
    const int64_t global[kGlobals] = {-1, d, d, d, d, V * d, V, dk / 2};  // elements; -1: any
    const int64_t layer[kPerLayer] = {d, d, d * d, d, d * d, d, dvall * d, dvall, dvall * d, dvall, d * dvall, d,
                                      dvall, dvall, H, d, d, F * d, F, F * d, F, d * F, d, F, F};
    std::vector<const float*> out(weights.size());
    for (size_t i = 0; i < weights.size(); ++i) {
      const std::optional<at::Tensor>& t = weights[i];
      if (!t.has_value()) continue;
      const int64_t want = i < kGlobals ? global[i] : layer[(i - kGlobals) % kPerLayer];
      const at::ScalarType dtype = i == kRotaryAngles ? at::kDouble : at::kFloat;
      TORCH_CHECK(t->is_cpu() && t->is_contiguous() && t->scalar_type() == dtype && (want < 0 || t->numel() == want),
                  "DecodeStep: weights[", i, "] must be a contiguous CPU ", dtype, " tensor of ", want,
                  " elements, got ", t->scalar_type(), " ", t->sizes());
      out[i] = static_cast<const float*>(t->const_data_ptr());
    }
    return out;
  }

  // ids (M, 1) of an integer type; S_, z_, offset_: each layer's state (M, H, dk, dv), (M, H, dk), (M,); new_S:
  // where each layer's new S goes, contiguous; or none, to write the new states over the given ones (each element
  // is read before it is written), which needs every one of them contiguous (else the new S goes into new tensors).
  // Returns the logits (M, 1, V), or with greedy each row's greedy choice (M, 1) int64 (the argmax of its logits,
  // each thread's share taken where it wrote it), and each layer's new S (a view of new_S), z and offset; in place,
  // the given tensors themselves, and nothing is allocated for them.
  std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> step(
      const at::Tensor& ids_, const std::vector<at::Tensor>& S_, const std::vector<at::Tensor>& z_,
      const std::vector<at::Tensor>& offset_, const std::optional<std::vector<at::Tensor>>& new_S,
      bool greedy) const {
    const int64_t M = ids_.size(0), dvall = H * dv;
    TORCH_CHECK(ids_.dim() == 2 && ids_.size(1) == 1 && ids_.is_cpu(), "DecodeStep: ids must be (M, 1) on the CPU");
    // the token ids are checked here, as RetNetModel._check_input_ids words it, rather than in Python
    TORCH_CHECK_TYPE(at::isIntegralType(ids_.scalar_type(), /*includeBool=*/false),
                     "input_ids must hold integer token ids, got ", ids_.scalar_type());
    TORCH_CHECK(S_.size() == static_cast<size_t>(L) && z_.size() == S_.size() && offset_.size() == S_.size() &&
                    (!new_S || new_S->size() == S_.size()),
                "DecodeStep: one S, z, offset and new S per layer (", L, ")");
    bool in_place = !new_S;
    for (int64_t l = 0; l < L && in_place; ++l)
      in_place = S_[l].is_contiguous() && z_[l].is_contiguous() && offset_[l].is_contiguous();
    const at::Tensor ids = ids_.to(at::kLong).contiguous();
    std::vector<at::Tensor> S, z, offset;
    for (int64_t l = 0; l < L; ++l) {
      S.push_back(S_[l].contiguous());
      z.push_back(z_[l].contiguous());
      offset.push_back(offset_[l].contiguous());
      const at::Tensor& dest = new_S ? (*new_S)[l] : S[l];
      TORCH_CHECK(S[l].scalar_type() == at::kFloat && z[l].scalar_type() == at::kFloat &&
                      dest.scalar_type() == at::kFloat && offset[l].scalar_type() == at::kLong,
                  "DecodeStep: float32 states and int64 offsets");
      TORCH_CHECK(S[l].numel() == M * H * dk * dv && dest.numel() == S[l].numel() && z[l].numel() == M * H * dk &&
                      offset[l].numel() == M && dest.is_contiguous() && S[l].is_cpu() && dest.is_cpu(),
                  "DecodeStep: layer ", l, "'s state must be S (M, H, dk, dv), z (M, H, dk), offset (M,)");
    }
    const std::vector<const float*> ptr = pointers();
    const int64_t* id = ids.const_data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) {
      TORCH_CHECK_VALUE(0 <= id[m] && id[m] < weights[kEmbed]->size(0), "input_ids holds token id ", id[m],
                        ", outside the vocabulary [0, ", weights[kEmbed]->size(0),
                        "): encode with the tokenizer the model was trained with, or raise config.vocab_size");
    }
    const at::TensorOptions floats = weights[kEmbed]->options();
    at::Tensor out = greedy ? at::empty({M, 1}, ids.options()) : at::empty({M, 1, V}, floats);
    std::vector<at::Tensor> S_out = S, z_out = z, offset_out = offset;  // in place
    for (int64_t l = 0; l < L && !in_place; ++l) {
      // a view of new_S: its buffer counts as taken while the state lives
      S_out[l] = new_S ? (*new_S)[l].view(S[l].sizes()) : at::empty_like(S[l]);
      z_out[l] = at::empty({M, H, dk}, floats);
      offset_out[l] = at::empty({M}, offset[l].options());
    }

    // one block of memory, not initialized: shared (the residual stream x, the projections, the retention's
    // output, the FFN's hidden units, a product's result, the rotary phases), then each thread's own (a normalized
    // copy of x or of the hidden units, and the retention's q, k and o of one head)
    const int threads = at::get_num_threads();
    const int64_t shared = M * (4 * d + 3 * dvall + 2 * F + dk + (greedy ? V : 0));
    const int64_t own = M * std::max(d, F) + 2 * dk + dv;
    std::unique_ptr<float[]> memory(new float[shared + threads * own]);
    float* x = memory.get();
    float *q = x + M * d, *k = q + M * d, *t = k + M * d, *v = t + M * d, *g = v + M * dvall, *y = g + M * dvall;
    float *u = y + M * dvall, *gu = u + M * F, *phase = gu + M * F;
    float* logits = greedy ? phase + M * dk : out.mutable_data_ptr<float>();
    std::vector<int64_t> choice(greedy ? threads * M : 0, -1);  // each thread's greedy choice in its share of a row

    for (int64_t m = 0; m < M; ++m) {  // the embedding, scaled and normalized as the config says
      float* xm = x + m * d;
      const float* row = ptr[kEmbed] + id[m] * d;
      for (int64_t i = 0; i < d; ++i) xm[i] = row[i] * scalar[kEmbedScale];
      if (opt[kEmbedNorm]) {
        normalize(xm, xm, d, opt[kNormRms] ? kRmsNorm : kLayerNorm, ptr[kEmbedNormW], ptr[kEmbedNormB],
                  scalar[kNormEps]);
      }
    }
    if (opt[kRotary]) {  // e^(i n theta) at each row's position (the first layer's), in float64 as rotary_phase
      const double* theta = reinterpret_cast<const double*>(ptr[kRotaryAngles]);
      const int64_t* position = offset[0].const_data_ptr<int64_t>();
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t i = 0; i < dk / 2; ++i) {
          const double angle = static_cast<double>(position[m]) * theta[i];
          phase[m * dk + 2 * i] = static_cast<float>(std::cos(angle));
          phase[m * dk + 2 * i + 1] = static_cast<float>(std::sin(angle));
        }
      }
    }

    const int64_t norm = opt[kNormRms] ? kRmsNorm : kLayerNorm;
    const float eps = scalar[kNormEps];
    const float scale = static_cast<float>(1 / std::sqrt(static_cast<double>(dk)));  // dk^-1/2 as Python rounds it
    const bool gated = opt[kFfnGated];
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      float* h = memory.get() + shared + tid * own;
      float* work = h + M * std::max(d, F);
      int64_t n0, n1, f0, f1;
      share(d, tid, nt, n0, n1);
      share(F, tid, nt, f0, f1);
      for (int64_t l = 0; l < L; ++l) {
        const float* const* w = ptr.data() + kGlobals + l * kPerLayer;
        for (int64_t m = 0; m < M; ++m) normalize(x + m * d, h + m * d, d, norm, w[kNorm1W], w[kNorm1B], eps);
        product(h, M, w[kQW], w[kQB], d, d, q, tid, nt);
        product(h, M, w[kKW], w[kKB], d, d, k, tid, nt);
        product(h, M, w[kVW], w[kVB], dvall, d, v, tid, nt);
        if (w[kGW]) product(h, M, w[kGW], w[kGB], dvall, d, g, tid, nt);
#pragma omp barrier
        const float* S_in = S[l].const_data_ptr<float>();
        const float* z_in = z[l].const_data_ptr<float>();
        const int64_t* position = offset[l].const_data_ptr<int64_t>();
        float* S_new = S_out[l].mutable_data_ptr<float>();
        float* z_new = z_out[l].mutable_data_ptr<float>();
        for (int64_t unit = tid; unit < M * H; unit += nt) {
          const int64_t m = unit / H, hd = unit % H;
          const float log_gamma = w[kLogGamma][hd];
          float c_sqrt = 1.f;  // sqrt(c_n), c_n = (1 - gamma^(n+1)) / (1 - gamma), as decay_sum computes it
          if (opt[kNormalizeDecay]) {
            const float n1 = static_cast<float>(std::max<int64_t>(position[m], 0)) + 1.f;
            c_sqrt = std::sqrt(std::expm1(n1 * log_gamma) / std::expm1(log_gamma));
          }
          retain(dk, dv, q + m * d + hd * dk, k + m * d + hd * dk, v + m * dvall + hd * dv,
                 w[kGW] ? g + m * dvall + hd * dv : nullptr, S_in + unit * dk * dv, z_in + unit * dk,
                 S_new + unit * dk * dv, z_new + unit * dk, y + m * dvall + hd * dv, phase + m * dk,
                 std::exp(log_gamma), c_sqrt, opt.data(), scalar, w[kHeadNormW] ? w[kHeadNormW] + hd * dv : nullptr,
                 w[kHeadNormB] ? w[kHeadNormB] + hd * dv : nullptr, scale, work);
        }
        fence_stores();
#pragma omp barrier
        product(y, M, w[kOW], w[kOB], d, dvall, t, tid, nt);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n) x[m * d + n] += t[m * d + n];
#pragma omp barrier
        for (int64_t m = 0; m < M; ++m) normalize(x + m * d, h + m * d, d, norm, w[kNorm2W], w[kNorm2B], eps);
        product(h, M, w[kUpW], w[kUpB], F, d, u, tid, nt);
        if (gated) product(h, M, w[kGateW], w[kGateB], F, d, gu, tid, nt);
        for (int64_t m = 0; m < M; ++m) {  // act(up), or act(gate) * up, on this thread's share of the units
          float* a = (gated ? gu : u) + m * F + f0;
          activate(a, f1 - f0, opt[kFfnActivation]);
          if (gated) {
            for (int64_t n = 0; n < f1 - f0; ++n) u[m * F + f0 + n] *= a[n];
          }
        }
#pragma omp barrier
        const float* hidden = u;
        if (opt[kFfnNorm] != kNoNorm) {
          for (int64_t m = 0; m < M; ++m) {
            normalize(u + m * F, h + m * F, F, opt[kFfnNorm], w[kFfnNormW], w[kFfnNormB], eps);
          }
          hidden = h;
        }
        product(hidden, M, w[kDownW], w[kDownB], d, F, t, tid, nt);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n) x[m * d + n] += t[m * d + n];
#pragma omp barrier
      }
      for (int64_t m = 0; m < M; ++m) {
        normalize(x + m * d, h + m * d, d, norm, ptr[kFinalNormW], ptr[kFinalNormB], eps);
      }
      product(h, M, ptr[kHeadW], ptr[kHeadB], V, d, logits, tid, nt);
      if (greedy) {
        int64_t v0, v1;
        share(V, tid, nt, v0, v1);
        for (int64_t m = 0; m < M; ++m) {
          const int64_t best = first_max(logits + m * V + v0, v1 - v0);
          choice[tid * M + m] = best < 0 ? -1 : v0 + best;
        }
      }
    }
    if (greedy) {  // the threads' choices in the order of their shares: a later one wins only by a larger value
      int64_t* best = out.mutable_data_ptr<int64_t>();
      for (int64_t m = 0; m < M; ++m) {
        best[m] = 0;
        for (int th = 0; th < threads; ++th) {
          const int64_t c = choice[th * M + m];
          const float* row = logits + m * V;
          if (c >= 0 && !std::isnan(row[best[m]]) && (row[c] > row[best[m]] || std::isnan(row[c]))) best[m] = c;
        }
      }
    }
    for (int64_t l = 0; l < L; ++l) {  // after the step, which reads the positions (in place, these are the same)
      const int64_t* before = offset[l].const_data_ptr<int64_t>();
      int64_t* after = offset_out[l].mutable_data_ptr<int64_t>();
      for (int64_t m = 0; m < M; ++m) after[m] = before[m] + 1;
    }
    return {out, S_out, z_out, offset_out};
  }
};

}  // namespace

// The greedy choice of each row: the index of its first largest value, NaN above all (as torch.argmax takes it).
// logits (..., V) float32 -> (...) int64: torch.argmax without its dispatch and reduction machinery. Right after a
// step, with 4,096 logits a row: 16 µs a call at one row and 31 at 16, against torch's 37 and 82.
at::Tensor argmax(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0 && logits.scalar_type() == at::kFloat && logits.is_cpu(),
              "argmax: logits must be a float32 CPU tensor with a last dimension, got ", logits.scalar_type(), " ",
              logits.sizes(), " on ", logits.device());
  const at::Tensor x = logits.contiguous();
  const int64_t V = x.size(-1), rows = x.numel() / V;
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  const float* p = x.const_data_ptr<float>();
  int64_t* best = out.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r, p += V) best[r] = first_max(p, V);
  return out;
}

// a Python class, through pybind11: a call costs ~40 µs less than a TorchScript class's method (its arguments and
// results boxed and checked against the schema), an eighth of a step of a small model
PYBIND11_MODULE(_retentive_cpu, m) {
  pybind11::class_<DecodeStep>(m, "DecodeStep", "One model's decoding step (decode_step.cpp)")
      .def(pybind11::init<std::vector<std::optional<at::Tensor>>, std::vector<int64_t>, std::vector<double>>(),
           pybind11::arg("weights"), pybind11::arg("options"), pybind11::arg("scalars"))
      .def("step", &DecodeStep::step, pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("ids"),
           pybind11::arg("S"), pybind11::arg("z"), pybind11::arg("offset"), pybind11::arg("new_S") = pybind11::none(),
           pybind11::arg("greedy") = false);
  m.def("argmax", &argmax, pybind11::arg("logits"));
}
