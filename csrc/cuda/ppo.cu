// CUDA PPO losses: per-row reductions (one block per row), then one block forms the row weights,
// the loss and the stats on the device, so no step syncs with the host; backward is one elementwise
// kernel reading the upstream gradient from device memory.  Per-token math: rlhf_kernels/math.h.
#include <cuda_runtime.h>

#include "rlhf_kernels/cuda_launch.h"
#include "rlhf_kernels/cuda_utils.cuh"
#include "rlhf_kernels/math.h"

namespace rlhf_kernels {
namespace {

using namespace cuda_utils;

// PPO: per-row sums -> (row weights, loss, stats) on the device -> elementwise backward.
// Workspace row layout: [valid tokens, sum of loss terms, clipped, lower, sum(old - lp)].

__global__ void ppo_policy_rows_kernel(const float* __restrict__ lp, const float* __restrict__ old,
                                       const float* __restrict__ adv, const bool* __restrict__ m,
                                       float* __restrict__ ws, int64_t T, float cl, float ch, bool has_dual,
                                       float dc) {
  const int64_t o = blockIdx.x * T;
  float v[5] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t t = threadIdx.x; t < T; t += kThreads) {
    if (!m[o + t]) continue;
    const PolicyToken tok = ppo_policy_token(lp[o + t], old[o + t], adv[o + t], cl, ch, has_dual, dc);
    v[0] += 1.0f; v[1] += tok.pg; v[2] += tok.clipped; v[3] += tok.lower; v[4] += old[o + t] - lp[o + t];
  }
  block_sum<5>(v);
  if (threadIdx.x == 0)
    for (int k = 0; k < 5; ++k) ws[blockIdx.x * 5 + k] = v[k];
}

__global__ void ppo_value_rows_kernel(const float* __restrict__ val, const float* __restrict__ old,
                                      const float* __restrict__ ret, const bool* __restrict__ m,
                                      float* __restrict__ ws, int64_t T, bool has_clip, float clip) {
  const int64_t o = blockIdx.x * T;
  float v[5] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t t = threadIdx.x; t < T; t += kThreads) {
    if (!m[o + t]) continue;
    const ValueToken tok = ppo_value_token(val[o + t], old[o + t], ret[o + t], has_clip, clip);
    v[0] += 1.0f; v[1] += tok.vf; v[2] += tok.clipped;
  }
  block_sum<5>(v);
  if (threadIdx.x == 0)
    for (int k = 0; k < 5; ++k) ws[blockIdx.x * 5 + k] = v[k];
}

// One block: totals over rows, the per-row weights, the loss (times scale) and n_stats token means.
__global__ void ppo_finalize_kernel(const float* __restrict__ ws, int64_t B, int agg, float scale, int n_stats,
                                    float* __restrict__ loss, float* __restrict__ stats,
                                    float* __restrict__ row_weight) {
  float tot[5] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // tokens, rows with tokens, stat sums
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    tot[0] += ws[b * 5];
    tot[1] += ws[b * 5] > 0.0f ? 1.0f : 0.0f;
    for (int k = 0; k < n_stats; ++k) tot[2 + k] += ws[b * 5 + 2 + k];
  }
  block_sum<5>(tot);
  float acc[1] = {0.0f};
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    const float w = agg_row_weight(agg, ws[b * 5], tot[0], tot[1], static_cast<float>(B));
    row_weight[b] = w;
    acc[0] += ws[b * 5 + 1] * w;
  }
  block_sum<1>(acc);
  if (threadIdx.x == 0) {
    loss[0] = scale * acc[0];
    const float denom = fmaxf(tot[0], 1.0f);
    for (int k = 0; k < n_stats; ++k) stats[k] = tot[2 + k] / denom;
  }
}

__global__ void ppo_policy_bwd_kernel(const float* __restrict__ g_loss, const float* __restrict__ lp,
                                      const float* __restrict__ old, const float* __restrict__ adv,
                                      const bool* __restrict__ m, const float* __restrict__ w, int64_t n, int64_t T,
                                      float cl, float ch, bool has_dual, float dc, float* __restrict__ dlp,
                                      float* __restrict__ dold, float* __restrict__ dadv) {
  const float gl = g_loss[0];
  RK_GRID_STRIDE(i, n) {
    if (!m[i]) { dlp[i] = 0.0f; dold[i] = 0.0f; dadv[i] = 0.0f; continue; }
    const PolicyToken tok = ppo_policy_token(lp[i], old[i], adv[i], cl, ch, has_dual, dc);
    const float g = gl * w[i / T];
    dlp[i] = g * tok.d_logratio;
    dold[i] = -g * tok.d_logratio;
    dadv[i] = g * tok.d_adv;
  }
}

__global__ void ppo_value_bwd_kernel(const float* __restrict__ g_loss, const float* __restrict__ val,
                                     const float* __restrict__ old, const float* __restrict__ ret,
                                     const bool* __restrict__ m, const float* __restrict__ w, int64_t n, int64_t T,
                                     bool has_clip, float clip, float* __restrict__ dv, float* __restrict__ dold,
                                     float* __restrict__ dret) {
  const float gl = 0.5f * g_loss[0];
  RK_GRID_STRIDE(i, n) {
    if (!m[i]) { dv[i] = 0.0f; dold[i] = 0.0f; dret[i] = 0.0f; continue; }
    const ValueToken tok = ppo_value_token(val[i], old[i], ret[i], has_clip, clip);
    const float g = gl * w[i / T];
    dv[i] = g * tok.d_v;
    dold[i] = g * tok.d_old;
    dret[i] = g * tok.d_ret;
  }
}

}  // namespace

namespace cuda_launch {

int ppo_policy_loss_forward(const float* lp, const float* old, const float* adv, const bool* m, int64_t B, int64_t T, float cl,
                            float ch, bool has_dual, float dc, int agg, float* ws, float* loss, float* stats, float* w,
                            void* stream) {
  if (B > 0) ppo_policy_rows_kernel<<<static_cast<unsigned>(B), kThreads, 0, RK_STREAM>>>(lp, old, adv, m, ws, T, cl, ch, has_dual, dc);
  ppo_finalize_kernel<<<1, kThreads, 0, RK_STREAM>>>(ws, B, agg, 1.0f, 3, loss, stats, w);
  return last_error();
}

int ppo_policy_loss_backward(const float* g_loss, const float* lp, const float* old, const float* adv, const bool* m,
                   const float* w, int64_t B, int64_t T, float cl, float ch, bool has_dual, float dc, float* dlp,
                             float* dold, float* dadv, void* stream) {
  const int64_t n = B * T;
  if (n == 0) return 0;
  ppo_policy_bwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(g_loss, lp, old, adv, m, w, n, T, cl, ch, has_dual,
                                                                  dc, dlp, dold, dadv);
  return last_error();
}

int ppo_value_loss_forward(const float* v, const float* old, const float* ret, const bool* m, int64_t B, int64_t T,
                           bool has_clip, float clip, int agg, float* ws, float* loss, float* clipfrac, float* w,
                           void* stream) {
  if (B > 0) ppo_value_rows_kernel<<<static_cast<unsigned>(B), kThreads, 0, RK_STREAM>>>(v, old, ret, m, ws, T, has_clip, clip);
  ppo_finalize_kernel<<<1, kThreads, 0, RK_STREAM>>>(ws, B, agg, 0.5f, 1, loss, clipfrac, w);
  return last_error();
}

int ppo_value_loss_backward(const float* g_loss, const float* v, const float* old, const float* ret, const bool* m,
                            const float* w, int64_t B, int64_t T, bool has_clip, float clip, float* dv, float* dold,
                            float* dret, void* stream) {
  const int64_t n = B * T;
  if (n == 0) return 0;
  ppo_value_bwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(g_loss, v, old, ret, m, w, n, T, has_clip, clip, dv,
                                                                 dold, dret);
  return last_error();
}

}  // namespace cuda_launch
}  // namespace rlhf_kernels
