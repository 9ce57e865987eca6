// gae on CPU: rows (sequences) in parallel, each the scan of rlhf_kernels/math.h (gae_row_forward /
// gae_row_backward, shared with the CUDA kernel).  Also the schemas of the gae family.
#include "common.h"
#include "rlhf_kernels/math.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace rlhf_kernels {
namespace cpu {

Tensor2 gae_fwd(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma, double lam) {
  check_float_cpu(rewards, "gae_fwd", "rewards");
  TORCH_CHECK(rewards.dim() == 2, "rlhf_kernels::gae_fwd: rewards must be 2-D [B, T], got shape ", rewards.sizes());
  check_float_like(values, rewards, "gae_fwd", "values", "rewards");
  check_mask(mask, rewards, "gae_fwd", "rewards");
  const Tensor r = f32(rewards), v = f32(values), m = as_bool(mask);
  const int64_t B = r.size(0), T = r.size(1);
  Tensor adv = at::empty({B, T}, r.options()), ret = at::empty({B, T}, r.options());
  const float *pr = r.data_ptr<float>(), *pv = v.data_ptr<float>();
  const bool* pm = m.data_ptr<bool>();
  float *pa = adv.data_ptr<float>(), *pR = ret.data_ptr<float>();
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * T;
      gae_row_forward(pr + o, pv + o, pm + o, T, g, gl, pa + o, pR + o);
    }
  });
  return {adv, ret};
}

Tensor2 gae_bwd(const Tensor& grad_advantages, const Tensor& grad_returns, const Tensor& mask, double gamma,
                double lam) {
  check_float_cpu(grad_advantages, "gae_bwd", "grad_advantages");
  TORCH_CHECK(grad_advantages.dim() == 2, "rlhf_kernels::gae_bwd: grad_advantages must be 2-D [B, T], got shape ",
              grad_advantages.sizes());
  check_float_like(grad_returns, grad_advantages, "gae_bwd", "grad_returns", "grad_advantages");
  check_mask(mask, grad_advantages, "gae_bwd", "grad_advantages");
  const Tensor gA = f32(grad_advantages), gR = f32(grad_returns), m = as_bool(mask);
  const int64_t B = m.size(0), T = m.size(1);
  Tensor dr = at::empty({B, T}, gA.options()), dv = at::empty({B, T}, gA.options());
  const float *pgA = gA.data_ptr<float>(), *pgR = gR.data_ptr<float>();
  const bool* pm = m.data_ptr<bool>();
  float *pdr = dr.data_ptr<float>(), *pdv = dv.data_ptr<float>();
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = b * T;
      gae_row_backward(pgA + o, pgR + o, pm + o, T, g, gl, pdr + o, pdv + o);
    }
  });
  return {dr, dv};
}

}  // namespace cpu
}  // namespace rlhf_kernels

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("gae_bwd(Tensor grad_advantages, Tensor grad_returns, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("gae_fwd", &rlhf_kernels::cpu::gae_fwd);
  m.impl("gae_bwd", &rlhf_kernels::cpu::gae_bwd);
}
