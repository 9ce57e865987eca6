// CUDA glue of ppo_policy_loss and ppo_value_loss: checks the tensors (device, dtype, shape), guards their device, calls the raw-pointer launchers of
// csrc/cuda/ppo.cu and registers the CUDA implementations.  Compiled only in CUDA builds.
#include "glue.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace rlhf_kernels {
namespace cuda_launch {

// Defined in csrc/cuda/ppo.cu.
// PPO losses: inputs [B, T]; workspace holds B * 5 floats; loss [1], stats [3] (value: [1]),
// row_weight [B] (the per-token weight of each row in the aggregated loss, saved for backward).
// The backward reads the upstream gradient from device memory: no host sync anywhere.
int ppo_policy_loss_forward(const float* logprobs, const float* old_logprobs, const float* adv, const bool* mask, int64_t B,
                            int64_t T, float clip_low, float clip_high, bool has_dual, float dual_clip, int agg,
                            float* workspace, float* loss, float* stats, float* row_weight, void* stream);
int ppo_policy_loss_backward(const float* g_loss, const float* logprobs, const float* old_logprobs, const float* adv,
                   const bool* mask, const float* row_weight, int64_t B, int64_t T, float clip_low, float clip_high,
                   bool has_dual, float dual_clip, float* g_logprobs, float* g_old, float* g_adv, void* stream);
int ppo_value_loss_forward(const float* values, const float* old_values, const float* returns, const bool* mask, int64_t B,
                  int64_t T, bool has_clip, float clip, int agg, float* workspace, float* loss, float* clipfrac,
                           float* row_weight, void* stream);
int ppo_value_loss_backward(const float* g_loss, const float* values, const float* old_values, const float* returns,
                            const bool* mask, const float* row_weight, int64_t B, int64_t T, bool has_clip, float clip,
                            float* g_values, float* g_old, float* g_returns, void* stream);

}  // namespace cuda_launch

namespace cuda {

Tensor3 ppo_policy_loss_fwd(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                            const Tensor& mask, double clip_low, double clip_high, std::optional<double> dual_clip,
                            int64_t agg) {
  Args g("ppo_policy_loss_fwd", {{"logprobs", &logprobs}, {"old_logprobs", &old_logprobs}, {"advantages", &advantages}, {"mask", &mask}});
  g.dims("logprobs", logprobs, 2);
  g.floating("logprobs", logprobs);
  g.floating("old_logprobs", old_logprobs);
  g.same_shape("old_logprobs", old_logprobs, "logprobs", logprobs);
  g.floating("advantages", advantages);
  g.same_shape("advantages", advantages, "logprobs", logprobs);
  g.mask("mask", mask);
  g.same_shape("mask", mask, "logprobs", logprobs);
  const Tensor lp = f32(logprobs), old = f32(old_logprobs), adv = f32(advantages), m = as_bool(mask);
  const int64_t B = lp.size(0), T = lp.size(1);
  Tensor ws = at::empty({B * 5}, lp.options()), loss = at::empty({}, lp.options()), stats = at::empty({3}, lp.options()),
         w = at::empty({B}, lp.options());
  check(L::ppo_policy_loss_forward(fp(lp), fp(old), fp(adv), m.data_ptr<bool>(), B, T, static_cast<float>(clip_low),
                                   static_cast<float>(clip_high), dual_clip.has_value(),
                          static_cast<float>(dual_clip.value_or(0.0)), static_cast<int>(agg), fp(ws), fp(loss),
                          fp(stats), fp(w), g.stream()),
        "ppo_policy_loss_fwd");
  return {loss, stats, w};
}

Tensor3 ppo_policy_loss_bwd(const Tensor& grad_loss, const Tensor& logprobs, const Tensor& old_logprobs,
                            const Tensor& advantages, const Tensor& mask, const Tensor& row_weight, double clip_low,
                            double clip_high, std::optional<double> dual_clip) {
  Args g("ppo_policy_loss_bwd", {{"logprobs", &logprobs}, {"old_logprobs", &old_logprobs}, {"advantages", &advantages}, {"mask", &mask}, {"row_weight", &row_weight}, {"grad_loss", &grad_loss}});
  g.dims("logprobs", logprobs, 2);
  g.floating("logprobs", logprobs);
  g.floating("old_logprobs", old_logprobs);
  g.same_shape("old_logprobs", old_logprobs, "logprobs", logprobs);
  g.floating("advantages", advantages);
  g.same_shape("advantages", advantages, "logprobs", logprobs);
  g.mask("mask", mask);
  g.same_shape("mask", mask, "logprobs", logprobs);
  g.floating("row_weight", row_weight);
  g.numel("row_weight", row_weight, logprobs.size(0));
  g.floating("grad_loss", grad_loss);
  g.numel("grad_loss", grad_loss.reshape(-1), 1);
  const Tensor lp = f32(logprobs), old = f32(old_logprobs), adv = f32(advantages), m = as_bool(mask);
  const Tensor w = f32(row_weight), gl = f32(grad_loss);
  const int64_t B = lp.size(0), T = lp.size(1);
  Tensor dlp = at::empty({B, T}, lp.options()), dold = at::empty({B, T}, lp.options()),
         dadv = at::empty({B, T}, lp.options());
  check(L::ppo_policy_loss_backward(fp(gl), fp(lp), fp(old), fp(adv), m.data_ptr<bool>(), fp(w), B, T,
                                    static_cast<float>(clip_low), static_cast<float>(clip_high), dual_clip.has_value(),
                          static_cast<float>(dual_clip.value_or(0.0)), fp(dlp), fp(dold), fp(dadv), g.stream()),
        "ppo_policy_loss_bwd");
  return {dlp.to(logprobs.scalar_type()), dold.to(old_logprobs.scalar_type()), dadv.to(advantages.scalar_type())};
}

Tensor3 ppo_value_loss_fwd(const Tensor& values, const Tensor& old_values, const Tensor& returns, const Tensor& mask,
                           std::optional<double> clip, int64_t agg) {
  Args g("ppo_value_loss_fwd", {{"values", &values}, {"old_values", &old_values}, {"returns", &returns}, {"mask", &mask}});
  g.dims("values", values, 2);
  g.floating("values", values);
  g.floating("old_values", old_values);
  g.same_shape("old_values", old_values, "values", values);
  g.floating("returns", returns);
  g.same_shape("returns", returns, "values", values);
  g.mask("mask", mask);
  g.same_shape("mask", mask, "values", values);
  const Tensor v = f32(values), old = f32(old_values), ret = f32(returns), m = as_bool(mask);
  const int64_t B = v.size(0), T = v.size(1);
  Tensor ws = at::empty({B * 5}, v.options()), loss = at::empty({}, v.options()), cf = at::empty({}, v.options()),
         w = at::empty({B}, v.options());
  check(L::ppo_value_loss_forward(fp(v), fp(old), fp(ret), m.data_ptr<bool>(), B, T, clip.has_value(),
                         static_cast<float>(clip.value_or(0.0)), static_cast<int>(agg), fp(ws), fp(loss), fp(cf),
                         fp(w), g.stream()),
        "ppo_value_loss_fwd");
  return {loss, cf, w};
}

Tensor3 ppo_value_loss_bwd(const Tensor& grad_loss, const Tensor& values, const Tensor& old_values,
                           const Tensor& returns, const Tensor& mask, const Tensor& row_weight,
                           std::optional<double> clip) {
  Args g("ppo_value_loss_bwd", {{"values", &values}, {"old_values", &old_values}, {"returns", &returns}, {"mask", &mask}, {"row_weight", &row_weight}, {"grad_loss", &grad_loss}});
  g.dims("values", values, 2);
  g.floating("values", values);
  g.floating("old_values", old_values);
  g.same_shape("old_values", old_values, "values", values);
  g.floating("returns", returns);
  g.same_shape("returns", returns, "values", values);
  g.mask("mask", mask);
  g.same_shape("mask", mask, "values", values);
  g.floating("row_weight", row_weight);
  g.numel("row_weight", row_weight, values.size(0));
  g.floating("grad_loss", grad_loss);
  g.numel("grad_loss", grad_loss.reshape(-1), 1);
  const Tensor v = f32(values), old = f32(old_values), ret = f32(returns), m = as_bool(mask);
  const Tensor w = f32(row_weight), gl = f32(grad_loss);
  const int64_t B = v.size(0), T = v.size(1);
  Tensor dv = at::empty({B, T}, v.options()), dold = at::empty({B, T}, v.options()),
         dret = at::empty({B, T}, v.options());
  check(L::ppo_value_loss_backward(fp(gl), fp(v), fp(old), fp(ret), m.data_ptr<bool>(), fp(w), B, T, clip.has_value(),
                                   static_cast<float>(clip.value_or(0.0)), fp(dv), fp(dold), fp(dret), g.stream()),
        "ppo_value_loss_bwd");
  return {dv.to(values.scalar_type()), dold.to(old_values.scalar_type()), dret.to(returns.scalar_type())};
}

}  // namespace cuda
}  // namespace rlhf_kernels

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("ppo_policy_loss_fwd", &rlhf_kernels::cuda::ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &rlhf_kernels::cuda::ppo_policy_loss_bwd);
  m.impl("ppo_value_loss_fwd", &rlhf_kernels::cuda::ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &rlhf_kernels::cuda::ppo_value_loss_bwd);
}
