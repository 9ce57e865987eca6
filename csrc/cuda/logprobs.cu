// CUDA token_logprobs: one 256-thread block per row, fp32 math in base 2.
//
// Forward: y = logit * scale with the host-computed scale = log2(e) / temperature (no division per
// element).  Each thread keeps kVec independent online states (one per element of its 16-byte load):
//   m = running max of y,  s = sum 2^(y - m),  w = sum 2^(y - m) (y - m)   (w: entropy only)
// updated with ONE exp2 per element: d = y - m, e = 2^-|d|; a new max (d > 0) gives s = e s + 1,
// w = e w - e d s, anything else s = s + e, w = w + e d.  The states merge once per row (in the thread,
// then warp shuffles, then across warps); lse = ln2 (M + log2 S), H = ln2 (log2 S - W / S).
// exp2 is ex2.approx.ftz.f32 (one MUFU.EX2; PTX ISA: max relative error 2^-22 over the full range;
// results below 2^-126 flush to zero: such terms are under 2^-126 of the row's largest term, below fp32
// resolution of a sum that holds at least 1).  -inf logits give e = 0 and add nothing; NaN propagates.
// The row is read with 16-byte loads from its first 16-byte-aligned element (any V, any row stride);
// the head before it and the tail after the last whole vector are read element by element.
//
// Backward re-reads the row: g = onehot(label) g_lp / T - p (c0 + c1 log2 p), p = 2^(y - lse log2 e),
// c0 = (g_lp + g_ent H) / T, c1 = g_ent ln2 / T; 16-byte loads and stores where the input and output
// rows share their alignment.  Rows whose label is ignore_index read nothing (zeros).
// Row offsets are 64-bit (N x V beyond 2^31 elements).
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

constexpr double kLog2e = 1.4426950408889634;
constexpr float kLn2 = 0.69314718055994531f;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 2^x in one MUFU.EX2 (ftz): 2^-inf = 0, NaN -> NaN.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Online state in base 2, relative to its max m.
struct Lse2 { float m, s, w; };

__device__ __forceinline__ Lse2 lse2_init() { return {-FLT_MAX, 0.0f, 0.0f}; }  // finite m: y - m is never inf - inf

template <bool kEnt>
__device__ __forceinline__ void lse2_add(Lse2& st, float y) {
  const float d = y - st.m;
  const float a = -fabsf(d);
  const float e = fast_exp2(a);  // 0 for -inf logits, NaN for NaN ones
  const bool new_max = d > 0.0f;
  if (kEnt) {
    const float ea = e * fmaxf(a, -256.0f);  // 2^-256 == 0: never 0 * inf
    st.w = new_max ? fmaf(ea, st.s, e * st.w) : st.w + ea;
  }
  st.s = new_max ? fmaf(e, st.s, 1.0f) : st.s + e;
  st.m = fmaxf(st.m, y);
}

// Merge b into a (NaN in s or w propagates: it is multiplied, never compared away).
__device__ __forceinline__ Lse2 lse2_merge(const Lse2& a, const Lse2& b) {
  const float M = fmaxf(a.m, b.m);
  const float da = fmaxf(a.m - M, -256.0f), db = fmaxf(b.m - M, -256.0f);
  const float fa = fast_exp2(da), fb = fast_exp2(db);
  Lse2 o;
  o.m = M;
  o.s = a.s * fa + b.s * fb;
  o.w = fmaf(da, a.s, a.w) * fa + fmaf(db, b.s, b.w) * fb;
  return o;
}

// Every thread returns the state of the whole block.
__device__ Lse2 block_merge(Lse2 st) {
  __shared__ float sm[kThreads / 32], ss[kThreads / 32], sw[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    Lse2 o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, off);
    st = lse2_merge(st, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sm[warp] = st.m; ss[warp] = st.s; sw[warp] = st.w; }
  __syncthreads();
  Lse2 out = {sm[0], ss[0], sw[0]};
  for (int w = 1; w < kThreads / 32; ++w) out = lse2_merge(out, {sm[w], ss[w], sw[w]});
  return out;
}

// Elements before the first 16-byte boundary of p (at most 16 / sizeof(T) - 1), capped at n.
template <typename T>
__device__ __forceinline__ int64_t head_of(const T* p, int64_t n) {
  const int64_t h = static_cast<int64_t>(((16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15) / sizeof(T));
  return h < n ? h : n;
}

template <typename T, bool kEnt>
__global__ void __launch_bounds__(kThreads) token_logprobs_fwd_kernel(
    // pointers
    const T* __restrict__ logits, const int64_t* __restrict__ labels, float* __restrict__ out_lp,
    float* __restrict__ out_lse, float* __restrict__ out_ent,
    // shapes and strides
    int64_t vocab, int64_t row_stride,
    // constants: scale = log2(e) / temperature
    float scale, int64_t ignore_index) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  if (label == ignore_index) {  // ignored rows read nothing
    if (threadIdx.x == 0) { out_lp[row] = 0.0f; out_lse[row] = 0.0f; out_ent[row] = 0.0f; }
    return;
  }
  const T* x = logits + row * row_stride;
  const int64_t head = head_of(x, vocab);
  const int64_t n_vec = (vocab - head) / kVec;
  Lse2 st[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) st[k] = lse2_init();
  // Main loop: aligned 16-byte loads, kVec independent states per thread.
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
#pragma unroll 2
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    const uint4 raw = __ldg(xv + i);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kVec; ++k) lse2_add<kEnt>(st[k], to_f32(e[k]) * scale);
  }
  // Head and tail, one element per thread.
  const int64_t tail = head + n_vec * kVec;
  const int64_t i = threadIdx.x < head ? threadIdx.x : tail + threadIdx.x - head;
  if (i < vocab && threadIdx.x < head + (vocab - tail)) lse2_add<kEnt>(st[0], to_f32(x[i]) * scale);
#pragma unroll
  for (int k = 1; k < kVec; ++k) st[0] = lse2_merge(st[0], st[k]);
  const Lse2 tot = block_merge(st[0]);
  if (threadIdx.x == 0) {
    const float log2_s = log2f(tot.s);
    const float lse2 = tot.m + log2_s;
    const bool in_range = label >= 0 && label < vocab;  // out of range: NaN, never an OOB read
    out_lse[row] = lse2 * kLn2;
    out_lp[row] = in_range ? (to_f32(x[label]) * scale - lse2) * kLn2 : NAN;
    out_ent[row] = kEnt ? (log2_s - tot.w / tot.s) * kLn2 : 0.0f;
  }
}

template <typename T, bool kEnt>
__device__ __forceinline__ float grad_at(float xv, float scale, float lse2, float c0, float c1) {
  const float d = fmaf(xv, scale, -lse2);  // log2 p
  const float p = fast_exp2(d);
  const float q = kEnt ? fmaf(c1, fmaxf(d, -256.0f), c0) : c0;  // -inf logits: p = 0, q finite
  return -p * q;
}

template <typename T, bool kEnt>
__global__ void __launch_bounds__(kThreads) token_logprobs_bwd_kernel(
    // pointers
    const T* __restrict__ logits, const int64_t* __restrict__ labels, const float* __restrict__ lse,
    const float* __restrict__ entropy, const float* __restrict__ g_lp, const float* __restrict__ g_ent,
    T* __restrict__ grad,
    // shapes and strides
    int64_t vocab, int64_t row_stride,
    // constants: scale = log2(e) / temperature, inv_t = 1 / temperature
    float scale, float inv_t, int64_t ignore_index) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  T* g = grad + row * vocab;
  const int64_t label = labels[row];
  const int64_t head = head_of(g, vocab);
  const int64_t n_vec = (vocab - head) / kVec;
  const int64_t tail = head + n_vec * kVec;
  uint4* gv = reinterpret_cast<uint4*>(g + head);
  if (label == ignore_index) {  // zeros, nothing read
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) gv[i] = z;
    for (int64_t i = threadIdx.x; i < head; i += kThreads) g[i] = from_f32<T>(0.0f);
    for (int64_t i = tail + threadIdx.x; i < vocab; i += kThreads) g[i] = from_f32<T>(0.0f);
    return;
  }
  const float lse2 = lse[row] * static_cast<float>(kLog2e);
  const float gl = g_lp[row];
  const float ge = kEnt ? g_ent[row] : 0.0f, h = kEnt ? entropy[row] : 0.0f;
  const float c_lab = gl * inv_t, c0 = (gl + ge * h) * inv_t, c1 = ge * kLn2 * inv_t;
  // The label column is formed in fp32 (c_lab - p q), never from a rounded value.
  if (head_of(x, vocab) == head) {  // input and output rows share their alignment: 16-byte loads and stores
    const uint4* xv = reinterpret_cast<const uint4*>(x + head);
#pragma unroll 2
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      const uint4 raw = __ldg(xv + i);
      const T* e = reinterpret_cast<const T*>(&raw);
      uint4 out;
      T* o = reinterpret_cast<T*>(&out);
      const int64_t col0 = head + i * kVec;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        float v = grad_at<T, kEnt>(to_f32(e[k]), scale, lse2, c0, c1);
        if (col0 + k == label) v += c_lab;
        o[k] = from_f32<T>(v);
      }
      gv[i] = out;
    }
    for (int64_t i = threadIdx.x; i < head; i += kThreads) {
      float v = grad_at<T, kEnt>(to_f32(x[i]), scale, lse2, c0, c1);
      g[i] = from_f32<T>(i == label ? v + c_lab : v);
    }
    for (int64_t i = tail + threadIdx.x; i < vocab; i += kThreads) {
      float v = grad_at<T, kEnt>(to_f32(x[i]), scale, lse2, c0, c1);
      g[i] = from_f32<T>(i == label ? v + c_lab : v);
    }
  } else {
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      float v = grad_at<T, kEnt>(to_f32(x[i]), scale, lse2, c0, c1);
      g[i] = from_f32<T>(i == label ? v + c_lab : v);
    }
  }
}

template <typename T>
int launch_fwd(const void* logits, int64_t row_stride, int64_t n, int64_t vocab, const int64_t* labels,
               double temperature, int64_t ignore_index, bool with_entropy, float* lp, float* lse, float* ent,
               cudaStream_t stream) {
  const float scale = static_cast<float>(kLog2e / temperature);
  const T* x = static_cast<const T*>(logits);
  if (with_entropy)
    token_logprobs_fwd_kernel<T, true><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        x, labels, lp, lse, ent, vocab, row_stride, scale, ignore_index);
  else
    token_logprobs_fwd_kernel<T, false><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        x, labels, lp, lse, ent, vocab, row_stride, scale, ignore_index);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bwd(const void* logits, int64_t row_stride, int64_t n, int64_t vocab, const int64_t* labels,
               const float* lse, const float* ent, const float* g_lp, const float* g_ent, double temperature,
               int64_t ignore_index, void* grad, cudaStream_t stream) {
  const float scale = static_cast<float>(kLog2e / temperature), inv_t = static_cast<float>(1.0 / temperature);
  const T* x = static_cast<const T*>(logits);
  T* gr = static_cast<T*>(grad);
  if (g_ent)
    token_logprobs_bwd_kernel<T, true><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        x, labels, lse, ent, g_lp, g_ent, gr, vocab, row_stride, scale, inv_t, ignore_index);
  else
    token_logprobs_bwd_kernel<T, false><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        x, labels, lse, ent, g_lp, g_ent, gr, vocab, row_stride, scale, inv_t, ignore_index);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

namespace cuda_launch {

int token_logprobs_forward(const void* logits, int dtype, int64_t row_stride, int64_t n, int64_t vocab,
                           const int64_t* labels, double temperature, int64_t ignore_index, bool with_entropy,
                           float* logprobs, float* lse, float* entropy, void* stream) {
  if (n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kBF16: return launch_fwd<__nv_bfloat16>(logits, row_stride, n, vocab, labels, temperature, ignore_index, with_entropy, logprobs, lse, entropy, s);
    case kF16: return launch_fwd<__half>(logits, row_stride, n, vocab, labels, temperature, ignore_index, with_entropy, logprobs, lse, entropy, s);
    default: return launch_fwd<float>(logits, row_stride, n, vocab, labels, temperature, ignore_index, with_entropy, logprobs, lse, entropy, s);
  }
}

int token_logprobs_backward(const void* logits, int dtype, int64_t row_stride, int64_t n, int64_t vocab,
                            const int64_t* labels, const float* lse, const float* entropy, const float* g_logprobs,
                            const float* g_entropy, double temperature, int64_t ignore_index, void* grad, void* stream) {
  if (n == 0 || vocab == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kBF16: return launch_bwd<__nv_bfloat16>(logits, row_stride, n, vocab, labels, lse, entropy, g_logprobs, g_entropy, temperature, ignore_index, grad, s);
    case kF16: return launch_bwd<__half>(logits, row_stride, n, vocab, labels, lse, entropy, g_logprobs, g_entropy, temperature, ignore_index, grad, s);
    default: return launch_bwd<float>(logits, row_stride, n, vocab, labels, lse, entropy, g_logprobs, g_entropy, temperature, ignore_index, grad, s);
  }
}

}  // namespace cuda_launch
}  // namespace rlhf_kernels
