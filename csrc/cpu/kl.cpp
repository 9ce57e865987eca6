// kl_penalty on CPU: the estimators of rlhf_kernels/math.h, elementwise in parallel.  Also the
// schemas of the kl family (this file is compiled in every build; csrc/cuda/kl_glue.cpp adds CUDA).
#include "common.h"
#include "rlhf_kernels/math.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace rlhf_kernels {
namespace cpu {

Tensor kl_penalty_fwd(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  const Tensor a = f32(logprobs), b = f32(ref_logprobs);
  Tensor out = at::empty(a.sizes(), a.options());
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int est = static_cast<int>(estimator);
  at::parallel_for(0, a.numel(), kElemGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) po[i] = kl_value(pa[i] - pb[i], est);
  });
  return out;
}

Tensor2 kl_penalty_bwd(const Tensor& grad, const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  const Tensor a = f32(logprobs), b = f32(ref_logprobs), g = f32(grad);
  Tensor ga = at::empty(a.sizes(), a.options());
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>(), *pg = g.data_ptr<float>();
  float* pga = ga.data_ptr<float>();
  const int est = static_cast<int>(estimator);
  at::parallel_for(0, a.numel(), kElemGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) pga[i] = pg[i] * kl_grad(pa[i] - pb[i], est);
  });
  return {ga.to(logprobs.scalar_type()), ga.neg().to(ref_logprobs.scalar_type())};
}

}  // namespace cpu
}  // namespace rlhf_kernels

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("kl_penalty_fwd(Tensor logprobs, Tensor ref_logprobs, int estimator) -> Tensor");
  m.def("kl_penalty_bwd(Tensor grad, Tensor logprobs, Tensor ref_logprobs, int estimator) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("kl_penalty_fwd", &rlhf_kernels::cpu::kl_penalty_fwd);
  m.impl("kl_penalty_bwd", &rlhf_kernels::cpu::kl_penalty_bwd);
}
