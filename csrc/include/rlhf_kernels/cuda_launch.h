// Host launchers of the CUDA kernels in csrc/cuda/*.cu.  Plain C++ types only (raw pointers,
// sizes, strides, the stream as void*), so this header compiles without CUDA or PyTorch and the
// .cu files compile with nvcc alone.  Each returns 0 on success, else a cudaError_t value.
// Inputs are contiguous unless a stride is passed; floats are fp32 unless a dtype code is passed.
#pragma once

#include <stdint.h>

namespace rlhf_kernels {
namespace cuda_launch {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// token_logprobs: logits [n, vocab] of dtype, row stride in elements, unit column stride.
int token_logprobs_fwd(const void* logits, int dtype, int64_t row_stride, int64_t n, int64_t vocab,
                       const int64_t* labels, float inv_t, int64_t ignore_index, bool with_entropy,
                       float* logprobs, float* lse, float* entropy, void* stream);
// grad [n, vocab] contiguous, same dtype as logits; g_entropy may be null.
int token_logprobs_bwd(const void* logits, int dtype, int64_t row_stride, int64_t n, int64_t vocab,
                       const int64_t* labels, const float* lse, const float* entropy, const float* g_logprobs,
                       const float* g_entropy, float inv_t, int64_t ignore_index, void* grad, void* stream);

int kl_penalty_fwd(const float* logprobs, const float* ref, int64_t n, int estimator, float* out, void* stream);
int kl_penalty_bwd(const float* grad, const float* logprobs, const float* ref, int64_t n, int estimator,
                   float* g_logprobs, float* g_ref, void* stream);

int gae_fwd(const float* rewards, const float* values, const bool* mask, int64_t B, int64_t T, float gamma,
            float gamma_lam, float* advantages, float* returns, void* stream);
int gae_bwd(const float* g_adv, const float* g_ret, const bool* mask, int64_t B, int64_t T, float gamma,
            float gamma_lam, float* g_rewards, float* g_values, void* stream);

// PPO losses: inputs [B, T]; workspace holds B * 5 floats; loss [1], stats [3] (value: [1]),
// row_weight [B] (the per-token weight of each row in the aggregated loss, saved for backward).
// The backward reads the upstream gradient from device memory: no host sync anywhere.
int ppo_policy_fwd(const float* logprobs, const float* old_logprobs, const float* adv, const bool* mask, int64_t B,
                   int64_t T, float clip_low, float clip_high, bool has_dual, float dual_clip, int agg,
                   float* workspace, float* loss, float* stats, float* row_weight, void* stream);
int ppo_policy_bwd(const float* g_loss, const float* logprobs, const float* old_logprobs, const float* adv,
                   const bool* mask, const float* row_weight, int64_t B, int64_t T, float clip_low, float clip_high,
                   bool has_dual, float dual_clip, float* g_logprobs, float* g_old, float* g_adv, void* stream);
int ppo_value_fwd(const float* values, const float* old_values, const float* returns, const bool* mask, int64_t B,
                  int64_t T, bool has_clip, float clip, int agg, float* workspace, float* loss, float* clipfrac,
                  float* row_weight, void* stream);
int ppo_value_bwd(const float* g_loss, const float* values, const float* old_values, const float* returns,
                  const bool* mask, const float* row_weight, int64_t B, int64_t T, bool has_clip, float clip,
                  float* g_values, float* g_old, float* g_returns, void* stream);

int dpo_fwd(const float* pc, const float* pr, const float* rc, const float* rr, int64_t n, float beta, int loss_type,
            float label_smoothing, float* losses, float* chosen_rewards, float* rejected_rewards, void* stream);
int dpo_bwd(const float* g_losses, const float* pc, const float* pr, const float* rc, const float* rr, int64_t n,
            float beta, int loss_type, float label_smoothing, float* g_pc, float* g_pr, float* g_rc, float* g_rr,
            void* stream);

}  // namespace cuda_launch
}  // namespace rlhf_kernels
