// Tensor-level entry points of the compiled extension.  The CPU versions live in csrc/cpu, the
// CUDA versions (glue around the raw-pointer launchers of csrc/cuda) in csrc/ops/cuda_glue.cpp;
// csrc/ops/registration.cpp binds both to the schemas of TORCH_LIBRARY(rlhf_kernels, ...).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlhf_kernels {
using at::Tensor;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

namespace cpu {
// logits [N, V] (any row stride, unit column stride), labels [N] int64.
// Returns logprobs [N], lse [N], entropy [N] (zeros unless with_entropy), all fp32.
Tensor3 token_logprobs_fwd(const Tensor& logits, const Tensor& labels, double temperature,
                           int64_t ignore_index, bool with_entropy);
// Gradient w.r.t. logits [N, V] in logits' dtype.
Tensor token_logprobs_bwd(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                          const Tensor& logits, const Tensor& labels, const Tensor& lse,
                          const Tensor& entropy, double temperature, int64_t ignore_index);
Tensor kl_penalty_fwd(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator);
Tensor2 kl_penalty_bwd(const Tensor& grad, const Tensor& logprobs, const Tensor& ref_logprobs,
                       int64_t estimator);
Tensor2 gae_fwd(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma, double lam);
Tensor2 gae_bwd(const Tensor& grad_advantages, const Tensor& grad_returns, const Tensor& mask,
                double gamma, double lam);
Tensor3 ppo_policy_loss_fwd(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                            const Tensor& mask, double clip_low, double clip_high,
                            std::optional<double> dual_clip, int64_t agg);
Tensor3 ppo_policy_loss_bwd(const Tensor& grad_loss, const Tensor& logprobs, const Tensor& old_logprobs,
                            const Tensor& advantages, const Tensor& mask, const Tensor& row_weight,
                            double clip_low, double clip_high, std::optional<double> dual_clip);
Tensor3 ppo_value_loss_fwd(const Tensor& values, const Tensor& old_values, const Tensor& returns,
                           const Tensor& mask, std::optional<double> clip, int64_t agg);
Tensor3 ppo_value_loss_bwd(const Tensor& grad_loss, const Tensor& values, const Tensor& old_values,
                           const Tensor& returns, const Tensor& mask, const Tensor& row_weight,
                           std::optional<double> clip);
Tensor3 dpo_loss_fwd(const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr, double beta,
                     int64_t loss_type, double label_smoothing);
Tensor4 dpo_loss_bwd(const Tensor& grad_losses, const Tensor& pc, const Tensor& pr, const Tensor& rc,
                     const Tensor& rr, double beta, int64_t loss_type, double label_smoothing);
}  // namespace cpu

namespace cuda {
Tensor3 token_logprobs_fwd(const Tensor& logits, const Tensor& labels, double temperature,
                           int64_t ignore_index, bool with_entropy);
Tensor token_logprobs_bwd(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                          const Tensor& logits, const Tensor& labels, const Tensor& lse,
                          const Tensor& entropy, double temperature, int64_t ignore_index);
Tensor kl_penalty_fwd(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator);
Tensor2 kl_penalty_bwd(const Tensor& grad, const Tensor& logprobs, const Tensor& ref_logprobs,
                       int64_t estimator);
Tensor2 gae_fwd(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma, double lam);
Tensor2 gae_bwd(const Tensor& grad_advantages, const Tensor& grad_returns, const Tensor& mask,
                double gamma, double lam);
Tensor3 ppo_policy_loss_fwd(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                            const Tensor& mask, double clip_low, double clip_high,
                            std::optional<double> dual_clip, int64_t agg);
Tensor3 ppo_policy_loss_bwd(const Tensor& grad_loss, const Tensor& logprobs, const Tensor& old_logprobs,
                            const Tensor& advantages, const Tensor& mask, const Tensor& row_weight,
                            double clip_low, double clip_high, std::optional<double> dual_clip);
Tensor3 ppo_value_loss_fwd(const Tensor& values, const Tensor& old_values, const Tensor& returns,
                           const Tensor& mask, std::optional<double> clip, int64_t agg);
Tensor3 ppo_value_loss_bwd(const Tensor& grad_loss, const Tensor& values, const Tensor& old_values,
                           const Tensor& returns, const Tensor& mask, const Tensor& row_weight,
                           std::optional<double> clip);
Tensor3 dpo_loss_fwd(const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr, double beta,
                     int64_t loss_type, double label_smoothing);
Tensor4 dpo_loss_bwd(const Tensor& grad_losses, const Tensor& pc, const Tensor& pr, const Tensor& rc,
                     const Tensor& rr, double beta, int64_t loss_type, double label_smoothing);
}  // namespace cuda
}  // namespace rlhf_kernels
