// kl_penalty on CPU: the estimators of rlhf_kernels/math.h, one vectorized pass (vec.h) over
// chunks of the inputs, in their own dtype (bf16 / fp16 converted in a stack buffer).  Also the
// schemas of the kl family (this file is compiled in every build; csrc/cuda/kl_glue.cpp adds CUDA).
#include "common.h"
#include "rlhf_kernels/math.h"
#include "vec.h"

#include <torch/library.h>

namespace rlhf_kernels {
namespace cpu {
namespace {

struct KlArgs {
  SrcF a, b, g;  // logprobs, ref_logprobs, upstream gradient (backward)
  DstF out, out2;  // forward: kl and (when dx) d kl / d logprobs; backward: d logprobs, d ref_logprobs
  int est;
  bool dx;
};

template <typename VF>
RK_INLINE VF kl_value_v(VF d, int est) {
  switch (est) {
    case kK1: return d;
    case kK2: return 0.5f * d * d;
    case kK3: return vexp(-d) - 1.0f + d;
    default: return vabs(d);
  }
}

template <typename VF>
RK_INLINE VF kl_grad_v(VF d, int est) {
  const VF one = vbroadcast<VF>(1.0f), zero = vbroadcast<VF>(0.0f);
  switch (est) {
    case kK1: return one;
    case kK2: return d;
    case kK3: return 1.0f - vexp(-d);
    default: return d > zero ? one : (d < zero ? -one : zero);
  }
}

// The value and the derivative in one evaluation (k3: one exp for both).
template <typename VF>
RK_INLINE void kl_value_grad_v(VF d, int est, VF& v, VF& g) {
  if (est == kK3) {
    const VF e = vexp(-d);
    v = e - 1.0f + d;
    g = 1.0f - e;
  } else {
    v = kl_value_v(d, est);
    g = kl_grad_v(d, est);
  }
}

template <typename VF>
RK_INLINE void kl_fwd_range(const KlArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t W = lanes<VF>();
  float ba[kVecChunk], bb[kVecChunk], bo[kVecChunk], bo2[kVecChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kVecChunk) {
    const int64_t n = std::min(kVecChunk, end - c0);
    const float *pa = a.a.chunk(c0, n, ba), *pb = a.b.chunk(c0, n, bb);
    float* po = a.out.at(c0, bo);
    int64_t i = 0;
    if (a.dx) {
      float* pd = a.out2.at(c0, bo2);
      for (; i + W <= n; i += W) {
        VF v, g;
        kl_value_grad_v(vload<VF>(pa + i) - vload<VF>(pb + i), a.est, v, g);
        vstore(po + i, v);
        vstore(pd + i, g);
      }
      for (; i < n; ++i) {
        po[i] = kl_value(pa[i] - pb[i], a.est);
        pd[i] = kl_grad(pa[i] - pb[i], a.est);
      }
      a.out2.flush(c0, n, bo2);
    } else {
      for (; i + W <= n; i += W) vstore(po + i, kl_value_v(vload<VF>(pa + i) - vload<VF>(pb + i), a.est));
      for (; i < n; ++i) po[i] = kl_value(pa[i] - pb[i], a.est);
    }
    a.out.flush(c0, n, bo);
  }
}

template <typename VF>
RK_INLINE void kl_bwd_range(const KlArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t W = lanes<VF>();
  float ba[kVecChunk], bb[kVecChunk], bg[kVecChunk], bo[kVecChunk], bo2[kVecChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kVecChunk) {
    const int64_t n = std::min(kVecChunk, end - c0);
    const float *pa = a.a.chunk(c0, n, ba), *pb = a.b.chunk(c0, n, bb), *pg = a.g.chunk(c0, n, bg);
    float *po = a.out.at(c0, bo), *po2 = a.out2.at(c0, bo2);
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      const VF g = vload<VF>(pg + i) * kl_grad_v(vload<VF>(pa + i) - vload<VF>(pb + i), a.est);
      vstore(po + i, g);
      vstore(po2 + i, -g);
    }
    for (; i < n; ++i) {
      const float g = pg[i] * kl_grad(pa[i] - pb[i], a.est);
      po[i] = g;
      po2[i] = -g;
    }
    a.out.flush(c0, n, bo);
    a.out2.flush(c0, n, bo2);
  }
}

RK_ISA_DISPATCH_AVX512(kl_fwd, KlArgs)
RK_ISA_DISPATCH_AVX512(kl_bwd, KlArgs)

void check_estimator(int64_t estimator, const char* op) {
  TORCH_CHECK(estimator >= 0 && estimator <= kAbs, "rlhf_kernels::", op, ": estimator must be in [0, ", int(kAbs),
              "], got ", estimator);
}

}  // namespace

namespace {

// The forward; with dx (the training forward) also d kl / d logprobs (fp32).
Tensor kl_forward(const char* op, const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator, Tensor* dx) {
  check_float_cpu(logprobs, op, "logprobs");
  check_float_like(ref_logprobs, logprobs, op, "ref_logprobs", "logprobs");
  check_estimator(estimator, op);
  const Tensor a = contig(logprobs), b = contig(ref_logprobs);
  Tensor out = at::empty(a.sizes(), a.options().dtype(at::kFloat));
  if (dx) *dx = at::empty(a.sizes(), a.options().dtype(at::kFloat));
  const KlArgs args{SrcF(a), SrcF(b), SrcF(a), DstF(out), DstF(dx ? *dx : out), static_cast<int>(estimator),
                    dx != nullptr};
  parallel_blocks(a.numel(), kElemGrain, [&](int64_t begin, int64_t end) { kl_fwd(args, begin, end); });
  return out;
}

}  // namespace

Tensor kl_penalty_fwd(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  return kl_forward("kl_penalty_fwd", logprobs, ref_logprobs, estimator, nullptr);
}

// The forward for training on CPU: also d kl / d logprobs (fp32), so the backward is one multiply
// (grad * dx) instead of re-evaluating the estimator (k3's exp) from both inputs.
Tensor2 kl_penalty_fwd_dx(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  Tensor dx;
  Tensor out = kl_forward("kl_penalty_fwd_dx", logprobs, ref_logprobs, estimator, &dx);
  return {out, dx};
}

Tensor2 kl_penalty_bwd(const Tensor& grad, const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  const char* op = "kl_penalty_bwd";
  check_float_cpu(logprobs, op, "logprobs");
  check_float_like(ref_logprobs, logprobs, op, "ref_logprobs", "logprobs");
  check_float_like(grad, logprobs, op, "grad", "logprobs");
  check_estimator(estimator, op);
  const Tensor a = contig(logprobs), b = contig(ref_logprobs), g = contig(grad);
  Tensor ga = at::empty(a.sizes(), logprobs.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor gb = at::empty(a.sizes(), ref_logprobs.options().memory_format(at::MemoryFormat::Contiguous));
  const KlArgs args{SrcF(a), SrcF(b), SrcF(g), DstF(ga), DstF(gb), static_cast<int>(estimator), false};
  parallel_blocks(a.numel(), kElemGrain, [&](int64_t begin, int64_t end) { kl_bwd(args, begin, end); });
  return {ga, gb};
}

}  // namespace cpu
}  // namespace rlhf_kernels

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("kl_penalty_fwd(Tensor logprobs, Tensor ref_logprobs, int estimator) -> Tensor");
  m.def("kl_penalty_bwd(Tensor grad, Tensor logprobs, Tensor ref_logprobs, int estimator) -> (Tensor, Tensor)");
  // CPU only: the training forward of the cpu backend (see _extension_ops/kl.py).
  m.def("kl_penalty_fwd_dx(Tensor logprobs, Tensor ref_logprobs, int estimator) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("kl_penalty_fwd", &rlhf_kernels::cpu::kl_penalty_fwd);
  m.impl("kl_penalty_bwd", &rlhf_kernels::cpu::kl_penalty_bwd);
  m.impl("kl_penalty_fwd_dx", &rlhf_kernels::cpu::kl_penalty_fwd_dx);
}
