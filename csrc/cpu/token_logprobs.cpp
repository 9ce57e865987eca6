// C++ CPU token_logprobs: one pass per row with an online log-sum-exp and entropy in fp32, rows in
// parallel (at::parallel_for).  Extra memory is O(N): the per-row lse and entropy; backward re-reads
// the logits instead of saving an [N, V] softmax.
//
// The row loops work on fp32 chunks that stay in L1.  exp is a branch-free polynomial (below) so
// the compiler vectorizes the inner loops with the baseline ISA; lane-wise accumulators let it do
// so without -ffast-math.
#include "../ops/ops.h"
#include "rlhf_kernels/math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rlhf_kernels {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1024;  // fp32 elements per chunk: 4 KB, L1 resident
constexpr int kLanes = 16;

// exp(x) for x <= 0 (all our arguments are shifted by the row max), 0 below -87.3.
// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 split in two parts (Cody-Waite),
// exp(r) by a degree-6 polynomial on |r| <= ln2 / 2 (relative error ~1e-7).  Rounding uses the
// 1.5 * 2^23 trick so it vectorizes without SSE4.1's roundps.
inline float exp_nonpos(float x) {
  const float xc = std::max(x, -87.3f);
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

template <typename T>
inline void load_chunk(const T* x, int64_t n, float inv_t, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]) * inv_t;
}

inline float chunk_max(const float* buf, int64_t n) {
  float lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = -INFINITY;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] = lanes[j] > buf[i + j] ? lanes[j] : buf[i + j];
  float m = -INFINITY;
  for (int j = 0; j < kLanes; ++j) m = std::max(m, lanes[j]);
  for (; i < n; ++i) m = std::max(m, buf[i]);
  return m;
}

// Adds sum exp(z - m) and sum exp(z - m)(z - m) of a chunk to s and u (m finite).
inline void chunk_sums(const float* buf, int64_t n, float m, bool with_entropy, float& s, float& u) {
  float ls[kLanes] = {0}, lu[kLanes] = {0};
  int64_t i = 0;
  if (with_entropy) {
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float d = std::max(buf[i + j] - m, -88.0f);  // -inf entries: e = 0, e * d = 0
        const float e = exp_nonpos(buf[i + j] - m);
        ls[j] += e;
        lu[j] += e * d;
      }
  } else {
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j) ls[j] += exp_nonpos(buf[i + j] - m);
  }
  for (; i < n; ++i) {
    const float d = std::max(buf[i] - m, -88.0f);
    const float e = exp_nonpos(buf[i] - m);
    ls[0] += e;
    lu[0] += e * d;
  }
  float cs = 0.0f, cu = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    cs += ls[j];
    cu += lu[j];
  }
  s += cs;
  u += cu;
}

template <typename T>
void forward_rows(const T* logits, int64_t row_stride, int64_t n_rows, int64_t vocab, const int64_t* labels,
                  float inv_t, int64_t ignore_index, bool with_entropy, float* out_lp, float* out_lse,
                  float* out_ent) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    float buf[kChunk];
    for (int64_t row = begin; row < end; ++row) {
      const T* x = logits + row * row_stride;
      LseState st = lse_init();
      for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
        const int64_t n = std::min(kChunk, vocab - c0);
        load_chunk(x + c0, n, inv_t, buf);
        const float cm = chunk_max(buf, n);
        if (cm > st.m) lse_rescale(st, cm);
        if (st.m == -INFINITY) continue;
        chunk_sums(buf, n, st.m, with_entropy, st.s, st.u);
      }
      const float lse = lse_value(st);
      const int64_t label = labels[row];
      const bool valid = label != ignore_index;
      out_lse[row] = lse;
      out_lp[row] = valid ? static_cast<float>(x[label]) * inv_t - lse : 0.0f;
      out_ent[row] = (valid && with_entropy) ? lse_entropy(st) : 0.0f;
    }
  });
}

template <typename T>
void backward_rows(const T* logits, int64_t row_stride, int64_t n_rows, int64_t vocab, const int64_t* labels,
                   const float* lse, const float* ent, const float* g_lp, const float* g_ent, float inv_t,
                   int64_t ignore_index, T* grad) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* x = logits + row * row_stride;
      T* g = grad + row * vocab;
      const int64_t label = labels[row];
      if (label == ignore_index) {
        std::fill(g, g + vocab, static_cast<T>(0.0f));
        continue;
      }
      const float l = lse[row];
      const float gl = g_lp ? g_lp[row] : 0.0f;
      const float ge = g_ent ? g_ent[row] : 0.0f;
      const float h = g_ent ? ent[row] : 0.0f;
      // d/dz (gl * logprob + ge * H) = gl (onehot - p) - ge p (log p + H); times 1 / temperature.
      for (int64_t i = 0; i < vocab; ++i) {
        const float logp = static_cast<float>(x[i]) * inv_t - l;
        const float p = exp_nonpos(std::min(logp, 0.0f));
        const float logp_c = std::max(logp, -88.0f);  // p == 0 there: no NaN from -inf
        g[i] = static_cast<T>(-p * (gl + ge * (logp_c + h)) * inv_t);
      }
      // The label column in fp32 (not from the rounded g[label]): p -> 1 cancels in bf16.
      const float logp = static_cast<float>(x[label]) * inv_t - l;
      const float p = exp_nonpos(std::min(logp, 0.0f));
      g[label] = static_cast<T>((gl - p * (gl + ge * (std::max(logp, -88.0f) + h))) * inv_t);
    }
  });
}

void check_logits(const Tensor& logits, const Tensor& labels) {
  TORCH_CHECK(logits.dim() == 2, "rlhf_kernels::token_logprobs: logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong,
              "rlhf_kernels::token_logprobs: labels must be int64 [N]");
}

}  // namespace

Tensor3 token_logprobs_fwd(const Tensor& logits_in, const Tensor& labels_in, double temperature,
                           int64_t ignore_index, bool with_entropy) {
  check_logits(logits_in, labels_in);
  const Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const Tensor labels = labels_in.contiguous();
  const int64_t n = logits.size(0), vocab = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  Tensor lp = at::empty({n}, opts), lse = at::empty({n}, opts), ent = at::empty({n}, opts);
  if (n == 0) return {lp, lse, ent};
  const float inv_t = static_cast<float>(1.0 / temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_fwd", [&] {
    forward_rows<scalar_t>(logits.data_ptr<scalar_t>(), logits.stride(0), n, vocab, labels.data_ptr<int64_t>(),
                           inv_t, ignore_index, with_entropy, lp.data_ptr<float>(), lse.data_ptr<float>(),
                           ent.data_ptr<float>());
  });
  return {lp, lse, ent};
}

Tensor token_logprobs_bwd(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                          const Tensor& logits_in, const Tensor& labels_in, const Tensor& lse,
                          const Tensor& entropy, double temperature, int64_t ignore_index) {
  check_logits(logits_in, labels_in);
  const Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const Tensor labels = labels_in.contiguous();
  const int64_t n = logits.size(0), vocab = logits.size(1);
  Tensor grad = at::empty({n, vocab}, logits.options());
  if (grad.numel() == 0) return grad;
  const Tensor g_lp = grad_logprobs.to(at::kFloat).contiguous();
  Tensor g_ent;
  if (grad_entropy.has_value() && grad_entropy->defined()) g_ent = grad_entropy->to(at::kFloat).contiguous();
  const Tensor lse_c = lse.contiguous(), ent_c = entropy.contiguous();
  const float inv_t = static_cast<float>(1.0 / temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_bwd", [&] {
    backward_rows<scalar_t>(logits.data_ptr<scalar_t>(), logits.stride(0), n, vocab, labels.data_ptr<int64_t>(),
                            lse_c.data_ptr<float>(), ent_c.data_ptr<float>(), g_lp.data_ptr<float>(),
                            g_ent.defined() ? g_ent.data_ptr<float>() : nullptr, inv_t, ignore_index,
                            grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace cpu
}  // namespace rlhf_kernels
