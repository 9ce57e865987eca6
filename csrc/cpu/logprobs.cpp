// C++ CPU token_logprobs: one pass per row with an online log-sum-exp and entropy in fp32, rows in
// parallel (at::parallel_for).  Extra memory is O(N): the per-row lse and entropy; backward re-reads
// the logits instead of saving an [N, V] softmax.  Also the schemas of the logprobs family.
//
// The row loops work on fp32 chunks that stay in L1, with a branch-free polynomial exp on 8-lane
// vectors (GCC/Clang vector extensions, so no per-ISA copies or -ffast-math are needed).
#include "common.h"
#include "rlhf_kernels/math.h"
#include "vec.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rlhf_kernels {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1024;  // fp32 elements per chunk: 4 KB, L1 resident

template <typename T>
inline void load_chunk(const T* x, int64_t n, float inv_t, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]) * inv_t;
}

template <typename VF>
RK_INLINE float chunk_max(const float* buf, int64_t n) {
  int64_t i = 0;
  float m = -INFINITY;
#ifdef RK_VEC
  constexpr int64_t W = lanes<VF>();
  VF vm = vbroadcast<VF>(-INFINITY);
  for (; i + W <= n; i += W) vm = vmax(vm, vload<VF>(buf + i));
  m = hmax(vm);
#endif
  for (; i < n; ++i) m = std::max(m, buf[i]);
  return m;
}

// Adds sum exp(z - m) and sum exp(z - m)(z - m) of a chunk to s and u (m finite).  -inf entries
// give e = 0 and, with d clamped to -88, e * d = 0 rather than NaN.
template <typename VF>
RK_INLINE void chunk_sums(const float* buf, int64_t n, float m, bool with_entropy, float& s, float& u) {
  int64_t i = 0;
  float cs = 0.0f, cu = 0.0f;
#ifdef RK_VEC
  constexpr int64_t W = lanes<VF>();
  const VF vm = vbroadcast<VF>(m), floor88 = vbroadcast<VF>(-88.0f);
  VF vs0 = vbroadcast<VF>(0.0f), vs1 = vs0, vu0 = vs0, vu1 = vs0;  // two chains hide latency
  if (with_entropy) {
    for (; i + 2 * W <= n; i += 2 * W) {
      const VF d0 = vload<VF>(buf + i) - vm, d1 = vload<VF>(buf + i + W) - vm;
      const VF e0 = vexp_nonpos(d0), e1 = vexp_nonpos(d1);
      vs0 += e0;
      vs1 += e1;
      vu0 += e0 * vmax(d0, floor88);
      vu1 += e1 * vmax(d1, floor88);
    }
  } else {
    for (; i + 2 * W <= n; i += 2 * W) {
      vs0 += vexp_nonpos(vload<VF>(buf + i) - vm);
      vs1 += vexp_nonpos(vload<VF>(buf + i + W) - vm);
    }
  }
  cs = hsum(vs0 + vs1);
  cu = hsum(vu0 + vu1);
#endif
  for (; i < n; ++i) {
    const float d = buf[i] - m;
    const float e = exp_nonpos(d);
    cs += e;
    cu += e * std::max(d, -88.0f);
  }
  s += cs;
  u += with_entropy ? cu : 0.0f;
}

// g[i] = -p (gl + ge (log p + H)) * inv_t over a chunk of scaled logits z (in place).
template <typename VF>
RK_INLINE void chunk_grad(float* z, int64_t n, float lse, float gl, float ge, float h, float inv_t) {
  int64_t i = 0;
#ifdef RK_VEC
  constexpr int64_t W = lanes<VF>();
  const VF vl = vbroadcast<VF>(lse), zero = vbroadcast<VF>(0.0f), floor88 = vbroadcast<VF>(-88.0f);
  for (; i + W <= n; i += W) {
    VF logp = vload<VF>(z + i) - vl;
    logp = logp > zero ? zero : logp;
    const VF p = vexp_nonpos(logp);
    vstore(z + i, -p * (gl + ge * (vmax(logp, floor88) + h)) * inv_t);
  }
#endif
  for (; i < n; ++i) {
    const float logp = std::min(z[i] - lse, 0.0f);
    const float p = exp_nonpos(logp);
    z[i] = -p * (gl + ge * (std::max(logp, -88.0f) + h)) * inv_t;
  }
}

// Arguments of the row loops: pointers, shapes and strides, constants.
template <typename T>
struct RowArgs {
  const T* logits;        // [N, V], row stride row_stride, unit column stride
  const int64_t* labels;  // [N]
  float* lp;              // forward outputs [N]
  float* lse;             // [N] (backward: input)
  float* ent;             // [N] (backward: input)
  const float* g_lp;      // backward: upstream gradients [N] (g_ent may be null)
  const float* g_ent;
  T* grad;                // backward output [N, V], contiguous
  int64_t row_stride, vocab;
  float inv_t;
  int64_t ignore_index;
  bool with_entropy;
};

template <typename T, typename VF>
RK_INLINE void forward_range(const RowArgs<T>& a, int64_t begin, int64_t end) {
  float buf[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const T* x = a.logits + row * a.row_stride;
    LseState st = lse_init();
    for (int64_t c0 = 0; c0 < a.vocab; c0 += kChunk) {
      const int64_t n = std::min(kChunk, a.vocab - c0);
      load_chunk(x + c0, n, a.inv_t, buf);
      const float cm = chunk_max<VF>(buf, n);
      if (cm > st.m) lse_rescale(st, cm);
      if (st.m == -INFINITY) continue;
      chunk_sums<VF>(buf, n, st.m, a.with_entropy, st.s, st.u);
    }
    const float lse = lse_value(st);
    const int64_t label = a.labels[row];
    const bool valid = label != a.ignore_index;
    a.lse[row] = lse;
    a.lp[row] = valid ? static_cast<float>(x[label]) * a.inv_t - lse : 0.0f;
    a.ent[row] = (valid && a.with_entropy) ? lse_entropy(st) : 0.0f;
  }
}

template <typename T, typename VF>
RK_INLINE void backward_range(const RowArgs<T>& a, int64_t begin, int64_t end) {
  float buf[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const T* x = a.logits + row * a.row_stride;
    T* g = a.grad + row * a.vocab;
    const int64_t label = a.labels[row];
    if (label == a.ignore_index) {
      std::fill(g, g + a.vocab, static_cast<T>(0.0f));
      continue;
    }
    const float l = a.lse[row];
    const float gl = a.g_lp[row];
    const float ge = a.g_ent ? a.g_ent[row] : 0.0f;
    const float h = a.g_ent ? a.ent[row] : 0.0f;
    // d/dz (gl * logprob + ge * H) = gl (onehot - p) - ge p (log p + H); times 1 / temperature.
    for (int64_t c0 = 0; c0 < a.vocab; c0 += kChunk) {
      const int64_t n = std::min(kChunk, a.vocab - c0);
      load_chunk(x + c0, n, a.inv_t, buf);
      chunk_grad<VF>(buf, n, l, gl, ge, h, a.inv_t);
      for (int64_t i = 0; i < n; ++i) g[c0 + i] = static_cast<T>(buf[i]);
    }
    // The label column in fp32 (not from the rounded g[label]): p -> 1 cancels in bf16.
    const float logp = std::min(static_cast<float>(x[label]) * a.inv_t - l, 0.0f);
    const float p = exp_nonpos(logp);
    g[label] = static_cast<T>((gl - p * (gl + ge * (std::max(logp, -88.0f) + h))) * a.inv_t);
  }
}

// The two ISA copies of the row loops.
template <typename T>
void forward_base(const RowArgs<T>& a, int64_t b, int64_t e) { forward_range<T, vf4>(a, b, e); }
template <typename T>
void backward_base(const RowArgs<T>& a, int64_t b, int64_t e) { backward_range<T, vf4>(a, b, e); }
#ifdef RK_AVX2
template <typename T>
__attribute__((target("avx2,fma"))) void forward_avx2(const RowArgs<T>& a, int64_t b, int64_t e) {
  forward_range<T, vf8>(a, b, e);
}
template <typename T>
__attribute__((target("avx2,fma"))) void backward_avx2(const RowArgs<T>& a, int64_t b, int64_t e) {
  backward_range<T, vf8>(a, b, e);
}
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

template <typename T>
void run_rows(const RowArgs<T>& a, int64_t n_rows, bool backward) {
  using Fn = void (*)(const RowArgs<T>&, int64_t, int64_t);
  Fn fn = backward ? &backward_base<T> : &forward_base<T>;
#ifdef RK_AVX2
  if (has_avx2()) fn = backward ? &backward_avx2<T> : &forward_avx2<T>;
#endif
  // Blocks of about 32K logits (one row at V >= 32K) handed out dynamically (parallel_blocks).
  const int64_t block = std::max<int64_t>(1, 32768 / std::max<int64_t>(a.vocab, 1));
  parallel_blocks(n_rows, block, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

void check_logits(const Tensor& logits, const Tensor& labels, int64_t ignore_index, const char* op) {
  check_float_cpu(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2, "rlhf_kernels::", op, ": logits must be 2-D [N, V], got shape ", logits.sizes());
  TORCH_CHECK(labels.device().is_cpu(), "rlhf_kernels::", op, ": labels must be a CPU tensor, got ", labels.device());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "rlhf_kernels::", op, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "rlhf_kernels::", op,
              ": labels must be [N] with N = logits.size(0) = ", logits.size(0), ", got shape ", labels.sizes());
  // The public API validates labels; the op checks again (O(N)) since it indexes with them.
  const Tensor l = contig(labels);
  const int64_t* p = l.data_ptr<int64_t>();
  const int64_t vocab = logits.size(1);
  for (int64_t i = 0; i < l.numel(); ++i)
    TORCH_CHECK(p[i] == ignore_index || (p[i] >= 0 && p[i] < vocab), "rlhf_kernels::", op, ": labels[", i,
                "] = ", p[i], " is outside [0, ", vocab, ") and is not ignore_index=", ignore_index);
}

// A per-row fp32 [N] input of the backward (lse, entropy, grad_logprobs, grad_entropy).
void check_row_vector(const Tensor& t, int64_t n, const char* op, const char* name) {
  check_float_cpu(t, op, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "rlhf_kernels::", op, ": ", name, " must be [N] with N = ", n,
              ", got shape ", t.sizes());
}

// The logits as the kernels read them: in place when each row is contiguous (any row stride,
// e.g. a slice of a wider or padded tensor); a copy only when the vocabulary stride is not 1.
Tensor rows_view(const Tensor& logits) {
  return (logits.stride(1) == 1 || logits.size(1) <= 1) && logits.stride(0) >= 0 ? logits : logits.contiguous();
}

}  // namespace

Tensor3 token_logprobs_fwd(const Tensor& logits_in, const Tensor& labels_in, double temperature,
                           int64_t ignore_index, bool with_entropy) {
  check_logits(logits_in, labels_in, ignore_index, "token_logprobs_fwd");
  TORCH_CHECK(temperature > 0.0, "rlhf_kernels::token_logprobs_fwd: temperature must be > 0, got ", temperature);
  const Tensor logits = rows_view(logits_in);
  const Tensor labels = contig(labels_in);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  Tensor lp = at::empty({n}, opts), lse = at::empty({n}, opts), ent = at::empty({n}, opts);
  if (n == 0) return {lp, lse, ent};
  const float inv_t = static_cast<float>(1.0 / temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_fwd", [&] {
    RowArgs<scalar_t> a{logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), lp.data_ptr<float>(),
                        lse.data_ptr<float>(), ent.data_ptr<float>(), nullptr, nullptr, nullptr,
                        logits.stride(0), vocab, inv_t, ignore_index, with_entropy};
    run_rows(a, n, /*backward=*/false);
  });
  return {lp, lse, ent};
}

Tensor token_logprobs_bwd(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                          const Tensor& logits_in, const Tensor& labels_in, const Tensor& lse,
                          const Tensor& entropy, double temperature, int64_t ignore_index) {
  const char* op = "token_logprobs_bwd";
  check_logits(logits_in, labels_in, ignore_index, op);
  TORCH_CHECK(temperature > 0.0, "rlhf_kernels::", op, ": temperature must be > 0, got ", temperature);
  const Tensor logits = rows_view(logits_in);
  const Tensor labels = contig(labels_in);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  check_row_vector(grad_logprobs, n, op, "grad_logprobs");
  if (grad_entropy.has_value() && grad_entropy->defined()) check_row_vector(*grad_entropy, n, op, "grad_entropy");
  check_row_vector(lse, n, op, "lse");
  check_row_vector(entropy, n, op, "entropy");
  // A fresh [N, V] output written in full: huge pages make its first touch cheap (empty_large).
  Tensor grad = empty_large({n, vocab}, logits.options());
  if (grad.numel() == 0) return grad;
  const Tensor g_lp = grad_logprobs.to(at::kFloat).contiguous();
  Tensor g_ent;
  if (grad_entropy.has_value() && grad_entropy->defined()) g_ent = grad_entropy->to(at::kFloat).contiguous();
  const Tensor lse_c = lse.to(at::kFloat).contiguous(), ent_c = entropy.to(at::kFloat).contiguous();
  const float inv_t = static_cast<float>(1.0 / temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_bwd", [&] {
    RowArgs<scalar_t> a{logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), nullptr,
                        const_cast<float*>(lse_c.data_ptr<float>()), const_cast<float*>(ent_c.data_ptr<float>()),
                        g_lp.data_ptr<float>(), g_ent.defined() ? g_ent.data_ptr<float>() : nullptr,
                        grad.data_ptr<scalar_t>(), logits.stride(0), vocab, inv_t, ignore_index, false};
    run_rows(a, n, /*backward=*/true);
  });
  return grad;
}

}  // namespace cpu
}  // namespace rlhf_kernels

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, "
        "bool with_entropy) -> (Tensor, Tensor, Tensor)");
  m.def("token_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, "
        "Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("token_logprobs_fwd", &rlhf_kernels::cpu::token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &rlhf_kernels::cpu::token_logprobs_bwd);
}
