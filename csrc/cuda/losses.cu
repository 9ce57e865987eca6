// CUDA kernels for kl_penalty, gae, the PPO losses and dpo_loss.  Per-token math is shared with the
// CPU backend (rlhf_kernels/math.h).  Elementwise ops use grid-stride loops; the PPO losses reduce
// per row (one block per row), then one block forms the row weights, the loss and the stats on the
// device, so no step syncs with the host; backward is one elementwise kernel reading the upstream
// gradient from device memory.  gae runs one thread per row, the reverse scan in registers.
#include <cuda_runtime.h>

#include "rlhf_kernels/cuda_launch.h"
#include "rlhf_kernels/math.h"

namespace rlhf_kernels {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

#define RK_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

// Sum of K floats over the block; the result is valid in every thread.
template <int K>
__device__ void block_sum(float (&v)[K]) {
  __shared__ float buf[K][kThreads / 32];
#pragma unroll
  for (int k = 0; k < K; ++k)
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0)
    for (int k = 0; k < K; ++k) buf[k][warp] = v[k];
  __syncthreads();
  for (int k = 0; k < K; ++k) {
    float s = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) s += buf[k][w];
    v[k] = s;
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------

__global__ void kl_fwd_kernel(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                              int64_t n, int est) {
  RK_GRID_STRIDE(i, n) out[i] = kl_value(a[i] - b[i], est);
}

__global__ void kl_bwd_kernel(const float* __restrict__ g, const float* __restrict__ a, const float* __restrict__ b,
                              float* __restrict__ ga, float* __restrict__ gb, int64_t n, int est) {
  RK_GRID_STRIDE(i, n) {
    const float v = g[i] * kl_grad(a[i] - b[i], est);
    ga[i] = v;
    gb[i] = -v;
  }
}

__global__ void gae_fwd_kernel(const float* __restrict__ r, const float* __restrict__ v, const bool* __restrict__ m,
                               float* __restrict__ adv, float* __restrict__ ret, int64_t B, int64_t T, float gamma,
                               float gl) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
  float a_next = 0.0f, v_next = 0.0f;
  const int64_t o = b * T;
  for (int64_t t = T - 1; t >= 0; --t) {
    if (!m[o + t]) {
      adv[o + t] = 0.0f;
      ret[o + t] = 0.0f;
      continue;
    }
    const float vt = v[o + t];
    const float at = r[o + t] + gamma * v_next - vt + gl * a_next;
    adv[o + t] = at;
    ret[o + t] = at + vt;
    a_next = at;
    v_next = vt;
  }
}

// Adjoint scan forward in time (see csrc/cpu/losses.cpp).
__global__ void gae_bwd_kernel(const float* __restrict__ gA, const float* __restrict__ gR, const bool* __restrict__ m,
                               float* __restrict__ dr, float* __restrict__ dv, int64_t B, int64_t T, float gamma,
                               float gl) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
  float carry = 0.0f;
  const int64_t o = b * T;
  for (int64_t t = 0; t < T; ++t) {
    if (!m[o + t]) {
      dr[o + t] = 0.0f;
      dv[o + t] = 0.0f;
      continue;
    }
    const float G = gA[o + t] + gR[o + t] + gl * carry;
    dr[o + t] = G;
    dv[o + t] = -G + gR[o + t] + gamma * carry;
    carry = G;
  }
}

// ------------------------------------------------------------------------------------------------
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

// ------------------------------------------------------------------------------------------------

__global__ void dpo_fwd_kernel(const float* __restrict__ pc, const float* __restrict__ pr, const float* __restrict__ rc,
                               const float* __restrict__ rr, int64_t n, float beta, int type, float ls,
                               float* __restrict__ losses, float* __restrict__ cr, float* __restrict__ rj) {
  RK_GRID_STRIDE(i, n) {
    const float chosen = pc[i] - rc[i], rejected = pr[i] - rr[i];
    losses[i] = dpo_pair(chosen - rejected, beta, type, ls).loss;
    cr[i] = beta * chosen;
    rj[i] = beta * rejected;
  }
}

__global__ void dpo_bwd_kernel(const float* __restrict__ g, const float* __restrict__ pc, const float* __restrict__ pr,
                               const float* __restrict__ rc, const float* __restrict__ rr, int64_t n, float beta,
                               int type, float ls, float* __restrict__ gpc, float* __restrict__ gpr,
                               float* __restrict__ grc, float* __restrict__ grr) {
  RK_GRID_STRIDE(i, n) {
    const float d = g[i] * dpo_pair((pc[i] - rc[i]) - (pr[i] - rr[i]), beta, type, ls).d_h;
    gpc[i] = d; gpr[i] = -d; grc[i] = -d; grr[i] = d;
  }
}

int last_error() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

namespace cuda_launch {

#define RK_STREAM static_cast<cudaStream_t>(stream)

int kl_penalty_fwd(const float* a, const float* b, int64_t n, int est, float* out, void* stream) {
  if (n == 0) return 0;
  kl_fwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(a, b, out, n, est);
  return last_error();
}

int kl_penalty_bwd(const float* g, const float* a, const float* b, int64_t n, int est, float* ga, float* gb,
                   void* stream) {
  if (n == 0) return 0;
  kl_bwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(g, a, b, ga, gb, n, est);
  return last_error();
}

int gae_fwd(const float* r, const float* v, const bool* m, int64_t B, int64_t T, float gamma, float gl, float* adv,
            float* ret, void* stream) {
  if (B * T == 0) return 0;
  gae_fwd_kernel<<<static_cast<unsigned>((B + 127) / 128), 128, 0, RK_STREAM>>>(r, v, m, adv, ret, B, T, gamma, gl);
  return last_error();
}

int gae_bwd(const float* gA, const float* gR, const bool* m, int64_t B, int64_t T, float gamma, float gl, float* dr,
            float* dv, void* stream) {
  if (B * T == 0) return 0;
  gae_bwd_kernel<<<static_cast<unsigned>((B + 127) / 128), 128, 0, RK_STREAM>>>(gA, gR, m, dr, dv, B, T, gamma, gl);
  return last_error();
}

int ppo_policy_fwd(const float* lp, const float* old, const float* adv, const bool* m, int64_t B, int64_t T, float cl,
                   float ch, bool has_dual, float dc, int agg, float* ws, float* loss, float* stats, float* w,
                   void* stream) {
  if (B > 0) ppo_policy_rows_kernel<<<static_cast<unsigned>(B), kThreads, 0, RK_STREAM>>>(lp, old, adv, m, ws, T, cl, ch, has_dual, dc);
  ppo_finalize_kernel<<<1, kThreads, 0, RK_STREAM>>>(ws, B, agg, 1.0f, 3, loss, stats, w);
  return last_error();
}

int ppo_policy_bwd(const float* g_loss, const float* lp, const float* old, const float* adv, const bool* m,
                   const float* w, int64_t B, int64_t T, float cl, float ch, bool has_dual, float dc, float* dlp,
                   float* dold, float* dadv, void* stream) {
  const int64_t n = B * T;
  if (n == 0) return 0;
  ppo_policy_bwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(g_loss, lp, old, adv, m, w, n, T, cl, ch, has_dual,
                                                                  dc, dlp, dold, dadv);
  return last_error();
}

int ppo_value_fwd(const float* v, const float* old, const float* ret, const bool* m, int64_t B, int64_t T,
                  bool has_clip, float clip, int agg, float* ws, float* loss, float* clipfrac, float* w,
                  void* stream) {
  if (B > 0) ppo_value_rows_kernel<<<static_cast<unsigned>(B), kThreads, 0, RK_STREAM>>>(v, old, ret, m, ws, T, has_clip, clip);
  ppo_finalize_kernel<<<1, kThreads, 0, RK_STREAM>>>(ws, B, agg, 0.5f, 1, loss, clipfrac, w);
  return last_error();
}

int ppo_value_bwd(const float* g_loss, const float* v, const float* old, const float* ret, const bool* m,
                  const float* w, int64_t B, int64_t T, bool has_clip, float clip, float* dv, float* dold,
                  float* dret, void* stream) {
  const int64_t n = B * T;
  if (n == 0) return 0;
  ppo_value_bwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(g_loss, v, old, ret, m, w, n, T, has_clip, clip, dv,
                                                                 dold, dret);
  return last_error();
}

int dpo_fwd(const float* pc, const float* pr, const float* rc, const float* rr, int64_t n, float beta, int type,
            float ls, float* losses, float* cr, float* rj, void* stream) {
  if (n == 0) return 0;
  dpo_fwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(pc, pr, rc, rr, n, beta, type, ls, losses, cr, rj);
  return last_error();
}

int dpo_bwd(const float* g, const float* pc, const float* pr, const float* rc, const float* rr, int64_t n, float beta,
            int type, float ls, float* gpc, float* gpr, float* grc, float* grr, void* stream) {
  if (n == 0) return 0;
  dpo_bwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(g, pc, pr, rc, rr, n, beta, type, ls, gpc, gpr, grc, grr);
  return last_error();
}

}  // namespace cuda_launch
}  // namespace rlhf_kernels
