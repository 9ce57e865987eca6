// CUDA linear_token_logprobs: the per-tile kernels of the LM head fused with the log-softmax.  The
// GEMMs that make each fp32 logits tile (and the gradient GEMMs) are cuBLAS calls made by the glue
// (csrc/cuda/linear_logprobs_glue.cpp); the kernels here work on one tile y [rows, cols] (fp32, row
// stride cols) for the vocabulary entries [v0, v0 + cols), one 256-thread block per row of the tile.
//
// The logit transform (as the reference, in fp32): v = y + bias, z = v * scale / T without a
// soft-cap; with a soft-cap c, z = (c / T) tanh(v * scale / c) and dz/dy = (scale / T) (1 - tanh^2).
//
// Forward (linear_token_logprobs_forward, once per vocabulary tile, tiles in increasing v0): folds the
// tile into per-row running statistics kept in device memory between tiles, fp32 [kStats, rows]:
//   m = running max of z (starts at -FLT_MAX: z - m is never inf - inf), s = sum exp(z - m),
//   u = sum exp(z - m) (z - m) (entropy), z_sum = sum z, z_label = z at the label, best = max z,
// and int64 [rows] best_index (the first index of the max: only a strictly larger value of a later
// tile moves it).  Each thread folds its columns with one expf per element (a new max rescales its
// sums), the block merges the threads' states in a fixed order, and thread 0 merges the block's state
// into the row's.  The first tile (first = true) starts the state instead of reading it; z_label starts
// as NaN, so a label outside [0, V) (never matched by a column, never used as an index) gives a NaN
// log-prob, as the CUDA token_logprobs kernel does.  -inf logits add no mass (exp = 0, and z - m is
// clamped before it multiplies 0); a NaN logit makes s NaN, hence lse and the log-prob NaN.
// linear_token_logprobs_forward_finish turns the statistics into the outputs, scattered to the
// original rows: lse = m + log s, logprob = z_label - lse, entropy = log s - u / s, mean_logit =
// z_sum / V, is_top1 = (best_index == label).  Ignored rows are never in the tile (the glue gathers
// the valid rows); their outputs are the zeros the glue allocated.
//
// Backward (linear_token_logprobs_backward, per tile): recomputes z from the tile y in place and writes
//   dL/dy = (g_lp (onehot(label) - p) - g_ent p (log p + H)) dz/dy,   p = exp(z - lse)
// into the fp32 tile (when asked) and/or a copy in bf16/fp16 (the operand of the tensor-core gradient
// GEMMs).  The label column is formed in fp32 from y itself.  Where z = -inf, p = 0 and log p is
// clamped before the product (no 0 * inf); NaN propagates.
// Offsets are 64-bit (rows x cols may exceed 2^31).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>

#include "rlhf_kernels/cuda_launch.h"
#include "rlhf_kernels/cuda_utils.cuh"

namespace rlhf_kernels {
namespace {

using cuda_utils::kThreads;
constexpr int kWarps = kThreads / 32;

// Statistics of a row in the fp32 stats array [kStats, rows] (see the header comment).
enum Stat : int { kM = 0, kS = 1, kU = 2, kZSum = 3, kZLabel = 4, kBest = 5, kStats = 6 };

// exp(-x) is 0 in fp32 for x beyond ~104; clamping z - m here keeps e * (z - m) at 0 where e == 0.
constexpr float kLogFloor = -256.0f;

// The logit transform (host-computed constants, as the CPU kernel's Transform).
struct Transform {
  bool capped;
  float a;      // scale / T (no cap) or scale / c (cap)
  float cap_t;  // c / T
  float slope;  // scale / T
};

Transform make_transform(double logit_scale, double softcap, double temperature) {
  Transform tf;
  tf.capped = softcap != 0.0;
  tf.slope = static_cast<float>(logit_scale / temperature);
  tf.a = tf.capped ? static_cast<float>(logit_scale / softcap) : tf.slope;
  tf.cap_t = static_cast<float>(softcap / temperature);
  return tf;
}

__device__ __forceinline__ float transform_z(float v, const Transform& tf) {
  return tf.capped ? tf.cap_t * tanhf(v * tf.a) : v * tf.a;
}

// z and dz/dy together (the backward).
__device__ __forceinline__ float transform_z_dz(float v, const Transform& tf, float& dz) {
  if (tf.capped) {
    const float t = tanhf(v * tf.a);
    dz = tf.slope * (1.0f - t * t);
    return tf.cap_t * t;
  }
  dz = tf.slope;
  return v * tf.a;
}

// Online log-sum-exp with the entropy sum, natural base, relative to the running max m.
struct Lse { float m, s, u; };

__device__ __forceinline__ Lse lse_start() { return {-FLT_MAX, 0.0f, 0.0f}; }

// Fold one value: d = z - m; a new max (d > 0) rescales the sums by e = exp(-d) and adds 1 (its own
// term, at d = 0); otherwise e = exp(d) is added.  One expf per element.  NaN: d > 0 is false and
// e = NaN, so s becomes NaN (m keeps its value: fmaxf drops NaN).
__device__ __forceinline__ void lse_add(Lse& st, float z) {
  const float d = z - st.m;
  const float a = -fabsf(d);
  const float e = expf(a);
  const float ea = e * fmaxf(a, kLogFloor);
  if (d > 0.0f) {
    st.u = fmaf(ea, st.s, e * st.u);
    st.s = fmaf(e, st.s, 1.0f);
  } else {
    st.u += ea;
    st.s += e;
  }
  st.m = fmaxf(st.m, z);
}

// Merge two states (NaN in s or u propagates: it is multiplied, never compared away).
__device__ __forceinline__ Lse lse_merge(const Lse& x, const Lse& y) {
  const float m = fmaxf(x.m, y.m);
  const float dx = fmaxf(x.m - m, kLogFloor), dy = fmaxf(y.m - m, kLogFloor);
  const float fx = expf(dx), fy = expf(dy);
  Lse o;
  o.m = m;
  o.s = x.s * fx + y.s * fy;
  o.u = fmaf(dx, x.s, x.u) * fx + fmaf(dy, y.s, y.u) * fy;
  return o;
}

// Running maximum with the first index of it: a later (larger-index) candidate wins only when strictly
// larger; between candidates of unknown order, the smaller index wins a tie.  NaN never wins.
struct Best { float v; int64_t i; };

__device__ __forceinline__ Best best_merge(const Best& x, const Best& y) {
  if (y.v > x.v || (y.v == x.v && y.i < x.i)) return y;
  return x;
}

// Everything one thread (then the block) knows about the row within this tile.
struct Fold {
  Lse lse;
  float z_sum;
  Best best;
};

__device__ __forceinline__ Fold fold_merge(const Fold& x, const Fold& y) {
  return {lse_merge(x.lse, y.lse), x.z_sum + y.z_sum, best_merge(x.best, y.best)};
}

__device__ __forceinline__ Fold fold_shfl(const Fold& f, int off) {
  Fold o;
  o.lse.m = __shfl_xor_sync(0xffffffffu, f.lse.m, off);
  o.lse.s = __shfl_xor_sync(0xffffffffu, f.lse.s, off);
  o.lse.u = __shfl_xor_sync(0xffffffffu, f.lse.u, off);
  o.z_sum = __shfl_xor_sync(0xffffffffu, f.z_sum, off);
  o.best.v = __shfl_xor_sync(0xffffffffu, f.best.v, off);
  o.best.i = __shfl_xor_sync(0xffffffffu, f.best.i, off);
  return o;
}

// The state of the whole block, valid in thread 0.  A fixed merge order: the same bits every run.
__device__ Fold block_fold(Fold f) {
  __shared__ Fold part[kWarps];
  for (int off = 16; off > 0; off >>= 1) f = fold_merge(f, fold_shfl(f, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) part[warp] = f;
  __syncthreads();
  Fold out = part[0];
  if (threadIdx.x == 0)
    for (int w = 1; w < kWarps; ++w) out = fold_merge(out, part[w]);
  return out;
}

__global__ void __launch_bounds__(kThreads) linear_logprobs_fold_kernel(
    // pointers
    const float* __restrict__ tile, const float* __restrict__ bias, const int64_t* __restrict__ labels,
    float* __restrict__ stats, int64_t* __restrict__ best_index,
    // shapes
    int64_t rows, int64_t cols, int64_t v0,
    // constants
    Transform tf, bool first) {
  const int64_t r = blockIdx.x;
  const float* y = tile + r * cols;
  Fold f;
  f.lse = lse_start();
  f.z_sum = 0.0f;
  f.best = {-INFINITY, INT64_MAX};
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const float z = transform_z(y[j] + (bias ? bias[j] : 0.0f), tf);
    lse_add(f.lse, z);
    f.z_sum += z;
    if (z > f.best.v) f.best = {z, v0 + j};  // columns in increasing order: the first index stays
  }
  const Fold tot = block_fold(f);
  if (threadIdx.x != 0) return;
  const int64_t col = labels[r] - v0;  // compared, never used as an index unless inside the tile
  float* st = stats + r;
  if (col >= 0 && col < cols)
    st[kZLabel * rows] = transform_z(y[col] + (bias ? bias[col] : 0.0f), tf);
  else if (first)
    st[kZLabel * rows] = NAN;  // a label outside [0, V) is never matched: NaN log-prob
  Lse lse = tot.lse;
  float z_sum = tot.z_sum;
  Best best = {-INFINITY, 0};  // nothing seen: index 0, as the reference
  if (!first) {
    lse = lse_merge({st[kM * rows], st[kS * rows], st[kU * rows]}, tot.lse);
    z_sum += st[kZSum * rows];
    best = {st[kBest * rows], best_index[r]};
  }
  if (tot.best.v > best.v) best = tot.best;  // strictly larger: an earlier tile keeps a tie
  st[kM * rows] = lse.m;
  st[kS * rows] = lse.s;
  st[kU * rows] = lse.u;
  st[kZSum * rows] = z_sum;
  st[kBest * rows] = best.v;
  best_index[r] = best.i;
}

__global__ void linear_logprobs_finish_kernel(
    // pointers
    const float* __restrict__ stats, const int64_t* __restrict__ best_index, const int64_t* __restrict__ labels,
    const int64_t* __restrict__ row_index, float* __restrict__ out_lp, float* __restrict__ out_lse,
    float* __restrict__ out_ent, float* __restrict__ out_mean, bool* __restrict__ out_top1,
    // shapes and constants
    int64_t rows, float inv_vocab) {
  RK_GRID_STRIDE(i, rows) {
    const float m = stats[kM * rows + i], s = stats[kS * rows + i], u = stats[kU * rows + i];
    const float log_s = logf(s);
    const float lse = m + log_s;  // every z = -inf: -FLT_MAX + -inf = -inf
    const int64_t row = row_index ? row_index[i] : i;
    out_lse[row] = lse;
    out_lp[row] = stats[kZLabel * rows + i] - lse;
    if (out_ent) out_ent[row] = log_s - u / s;
    if (out_mean) {
      out_mean[row] = stats[kZSum * rows + i] * inv_vocab;
      out_top1[row] = best_index[i] == labels[i];
    }
  }
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// dL/dy of one element, without the onehot term (added by the caller at the label column, before
// the factor dz/dy: see grad_kernel).
template <bool kEnt>
__device__ __forceinline__ float grad_soft(float z, float lse, float g_lp, float g_ent, float h) {
  const float logp = z - lse;
  const float p = expf(logp);
  return kEnt ? -p * fmaf(g_ent, fmaxf(logp, kLogFloor) + h, g_lp) : -p * g_lp;
}

// T: the dtype of the low-precision copy (ignored when `low` is null).
template <typename T, bool kEnt>
__global__ void __launch_bounds__(kThreads) linear_logprobs_grad_kernel(
    // pointers
    float* __restrict__ tile, T* __restrict__ low, const float* __restrict__ bias,
    const int64_t* __restrict__ labels, const float* __restrict__ lse, const float* __restrict__ entropy,
    const float* __restrict__ g_lp, const float* __restrict__ g_ent,
    // shapes
    int64_t cols, int64_t v0,
    // constants
    Transform tf, bool keep_f32) {
  const int64_t r = blockIdx.x;
  float* y = tile + r * cols;
  T* yl = low ? low + r * cols : nullptr;
  const int64_t col = labels[r] - v0;
  const float row_lse = lse[r], gl = g_lp[r];
  const float ge = kEnt ? g_ent[r] : 0.0f, h = kEnt ? entropy[r] : 0.0f;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    float dz;
    const float z = transform_z_dz(y[j] + (bias ? bias[j] : 0.0f), tf, dz);
    float g = grad_soft<kEnt>(z, row_lse, gl, ge, h);
    if (j == col) g += gl;  // onehot(label) g_lp
    g *= dz;
    if (keep_f32) y[j] = g;
    if (yl) yl[j] = from_f32<T>(g);
  }
}

template <typename T>
int launch_grad(float* tile, void* low, int64_t rows, int64_t cols, int64_t v0, const float* bias,
                const int64_t* labels, const float* lse, const float* entropy, const float* g_lp, const float* g_ent,
                const Transform& tf, bool keep_f32, cudaStream_t stream) {
  T* lo = static_cast<T*>(low);
  const unsigned grid = static_cast<unsigned>(rows);
  if (g_ent)
    linear_logprobs_grad_kernel<T, true><<<grid, kThreads, 0, stream>>>(tile, lo, bias, labels, lse, entropy, g_lp,
                                                                         g_ent, cols, v0, tf, keep_f32);
  else
    linear_logprobs_grad_kernel<T, false><<<grid, kThreads, 0, stream>>>(tile, lo, bias, labels, lse, entropy, g_lp,
                                                                          g_ent, cols, v0, tf, keep_f32);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

namespace cuda_launch {

int linear_token_logprobs_forward(const float* tile, int64_t rows, int64_t cols, int64_t v0, const float* bias,
                                  const int64_t* labels, double logit_scale, double softcap, double temperature,
                                  bool first, float* stats, int64_t* best_index, void* stream) {
  if (rows == 0 || cols == 0) return 0;
  linear_logprobs_fold_kernel<<<static_cast<unsigned>(rows), kThreads, 0, RK_STREAM>>>(
      tile, bias, labels, stats, best_index, rows, cols, v0, make_transform(logit_scale, softcap, temperature), first);
  return static_cast<int>(cudaGetLastError());
}

int linear_token_logprobs_forward_finish(const float* stats, const int64_t* best_index, int64_t rows, int64_t vocab,
                                         const int64_t* labels, const int64_t* row_index, float* logprobs, float* lse,
                                         float* entropy, float* mean_logit, bool* is_top1, void* stream) {
  if (rows == 0) return 0;
  linear_logprobs_finish_kernel<<<cuda_utils::grid_for(rows), kThreads, 0, RK_STREAM>>>(
      stats, best_index, labels, row_index, logprobs, lse, entropy, mean_logit, is_top1, rows,
      1.0f / static_cast<float>(vocab));
  return static_cast<int>(cudaGetLastError());
}

int linear_token_logprobs_backward(float* tile, void* low, int low_dtype, int64_t rows, int64_t cols, int64_t v0,
                                   const float* bias, const int64_t* labels, const float* lse, const float* entropy,
                                   const float* g_logprobs, const float* g_entropy, double logit_scale, double softcap,
                                   double temperature, bool keep_f32, void* stream) {
  if (rows == 0 || cols == 0) return 0;
  const Transform tf = make_transform(logit_scale, softcap, temperature);
  auto s = RK_STREAM;
  if (low_dtype == kF16)
    return launch_grad<__half>(tile, low, rows, cols, v0, bias, labels, lse, entropy, g_logprobs, g_entropy, tf,
                               keep_f32, s);
  // bf16, or no copy at all (low is null: the type is unused)
  return launch_grad<__nv_bfloat16>(tile, low, rows, cols, v0, bias, labels, lse, entropy, g_logprobs, g_entropy, tf,
                                    keep_f32, s);
}

}  // namespace cuda_launch
}  // namespace rlhf_kernels
