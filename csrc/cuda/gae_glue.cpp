// CUDA glue of gae: checks the tensors (device, dtype, shape), guards their device, calls the raw-pointer launchers of
// csrc/cuda/gae.cu and registers the CUDA implementations.  Compiled only in CUDA builds.
#include "glue.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace rlhf_kernels {
namespace cuda_launch {

// Defined in csrc/cuda/gae.cu.
int gae_forward(const float* rewards, const float* values, const bool* mask, int64_t B, int64_t T, float gamma,
                float gamma_lam, float* advantages, float* returns, void* stream);
int gae_backward(const float* g_adv, const float* g_ret, const bool* mask, int64_t B, int64_t T, float gamma,
                 float gamma_lam, float* g_rewards, float* g_values, void* stream);

}  // namespace cuda_launch

namespace cuda {

Tensor2 gae_fwd(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma, double lam) {
  Args g("gae_fwd", {{"rewards", &rewards}, {"values", &values}, {"mask", &mask}});
  g.dims("rewards", rewards, 2);
  g.floating("rewards", rewards);
  g.floating("values", values);
  g.mask("mask", mask);
  g.same_shape("values", values, "rewards", rewards);
  g.same_shape("mask", mask, "rewards", rewards);
  const Tensor r = f32(rewards), v = f32(values), m = as_bool(mask);
  const int64_t B = r.size(0), T = r.size(1);
  Tensor adv = at::empty({B, T}, r.options()), ret = at::empty({B, T}, r.options());
  check(L::gae_forward(fp(r), fp(v), m.data_ptr<bool>(), B, T, static_cast<float>(gamma), static_cast<float>(gamma * lam),
                       fp(adv), fp(ret), g.stream()),
        "gae_fwd");
  return {adv, ret};
}

Tensor2 gae_bwd(const Tensor& grad_advantages, const Tensor& grad_returns, const Tensor& mask, double gamma,
                double lam) {
  Args g("gae_bwd", {{"mask", &mask}, {"grad_advantages", &grad_advantages}, {"grad_returns", &grad_returns}});
  g.dims("mask", mask, 2);
  g.mask("mask", mask);
  g.floating("grad_advantages", grad_advantages);
  g.floating("grad_returns", grad_returns);
  g.same_shape("grad_advantages", grad_advantages, "mask", mask);
  g.same_shape("grad_returns", grad_returns, "mask", mask);
  const Tensor gA = f32(grad_advantages), gR = f32(grad_returns), m = as_bool(mask);
  const int64_t B = m.size(0), T = m.size(1);
  Tensor dr = at::empty({B, T}, gA.options()), dv = at::empty({B, T}, gA.options());
  check(L::gae_backward(fp(gA), fp(gR), m.data_ptr<bool>(), B, T, static_cast<float>(gamma),
                        static_cast<float>(gamma * lam), fp(dr), fp(dv), g.stream()),
        "gae_bwd");
  return {dr, dv};
}

}  // namespace cuda
}  // namespace rlhf_kernels

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("gae_fwd", &rlhf_kernels::cuda::gae_fwd);
  m.impl("gae_bwd", &rlhf_kernels::cuda::gae_bwd);
}
