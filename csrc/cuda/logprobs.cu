// CUDA token_logprobs: one 256-thread block per row.  Forward: each thread keeps an online
// log-sum-exp / entropy state (rlhf_kernels/math.h) over a strided slice of the row, read with
// 16-byte loads where the row is aligned; states merge by warp shuffles, then across warps.
// Backward re-reads the row and writes (onehot - p) g_lp - p (log p + H) g_ent, / temperature.
// Row offsets are 64-bit (N x V beyond 2^31 elements).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "rlhf_kernels/cuda_launch.h"
#include "rlhf_kernels/cuda_utils.cuh"
#include "rlhf_kernels/math.h"

namespace rlhf_kernels {
namespace {

using cuda_utils::kThreads;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ LseState shfl_state(const LseState& s, int offset) {
  LseState o;
  o.m = __shfl_xor_sync(0xffffffffu, s.m, offset);
  o.s = __shfl_xor_sync(0xffffffffu, s.s, offset);
  o.u = __shfl_xor_sync(0xffffffffu, s.u, offset);
  return o;
}

// Every thread returns the state of the whole block.
__device__ LseState block_merge(LseState st) {
  __shared__ float sm[kThreads / 32], ss[kThreads / 32], su[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) st = lse_merge(st, shfl_state(st, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sm[warp] = st.m; ss[warp] = st.s; su[warp] = st.u; }
  __syncthreads();
  LseState out = lse_init();
  for (int w = 0; w < kThreads / 32; ++w) {
    LseState o; o.m = sm[w]; o.s = ss[w]; o.u = su[w];
    out = lse_merge(out, o);
  }
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) token_logprobs_fwd_kernel(
    // pointers
    const T* __restrict__ logits, const int64_t* __restrict__ labels, float* __restrict__ out_lp,
    float* __restrict__ out_lse, float* __restrict__ out_ent,
    // shapes and strides
    int64_t vocab, int64_t row_stride, bool vec_ok,
    // constants
    float inv_t, int64_t ignore_index, bool with_entropy) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  LseState st = lse_init();
  int64_t start = 0;
  if (vec_ok) {  // 16-byte loads: 4 fp32 or 8 bf16/fp16 per load
    constexpr int kVec = 16 / sizeof(T);
    const int64_t n_vec = vocab / kVec;
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      uint4 raw = __ldg(xv + i);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) lse_add(st, to_f32(e[k]) * inv_t);
    }
    start = n_vec * kVec;
  }
  for (int64_t i = start + threadIdx.x; i < vocab; i += kThreads) lse_add(st, to_f32(x[i]) * inv_t);
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const float lse = lse_value(st);
    const int64_t label = labels[row];
    const bool valid = label != ignore_index;
    const bool in_range = label >= 0 && label < vocab;  // out of range: NaN, never an OOB read
    out_lse[row] = lse;
    out_lp[row] = !valid ? 0.0f : (in_range ? to_f32(x[label]) * inv_t - lse : NAN);
    out_ent[row] = (valid && with_entropy) ? lse_entropy(st) : 0.0f;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) token_logprobs_bwd_kernel(
    // pointers
    const T* __restrict__ logits, const int64_t* __restrict__ labels, const float* __restrict__ lse,
    const float* __restrict__ entropy, const float* __restrict__ g_lp, const float* __restrict__ g_ent,
    T* __restrict__ grad,
    // shapes and strides
    int64_t vocab, int64_t row_stride,
    // constants
    float inv_t, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  T* g = grad + row * vocab;
  const int64_t label = labels[row];
  if (label == ignore_index) {
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) g[i] = from_f32<T>(0.0f);
    return;
  }
  const float l = lse[row], gl = g_lp[row];
  const float ge = g_ent ? g_ent[row] : 0.0f, h = g_ent ? entropy[row] : 0.0f;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    // The label column is formed in fp32 (gl - p gl), never from a rounded value.
    float v = token_logprobs_grad(to_f32(x[i]) * inv_t, l, h, gl, ge);
    if (i == label) v += gl;
    g[i] = from_f32<T>(v * inv_t);
  }
}

template <typename T>
int launch_fwd(const void* logits, int64_t row_stride, int64_t n, int64_t vocab, const int64_t* labels, float inv_t,
               int64_t ignore_index, bool with_entropy, float* lp, float* lse, float* ent, cudaStream_t stream) {
  const bool vec_ok = (reinterpret_cast<uintptr_t>(logits) % 16 == 0) && ((row_stride * sizeof(T)) % 16 == 0);
  token_logprobs_fwd_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), labels, lp, lse, ent, vocab, row_stride, vec_ok, inv_t, ignore_index,
      with_entropy);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bwd(const void* logits, int64_t row_stride, int64_t n, int64_t vocab, const int64_t* labels,
               const float* lse, const float* ent, const float* g_lp, const float* g_ent, float inv_t,
               int64_t ignore_index, void* grad, cudaStream_t stream) {
  token_logprobs_bwd_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), labels, lse, ent, g_lp, g_ent, static_cast<T*>(grad), vocab, row_stride, inv_t,
      ignore_index);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

namespace cuda_launch {

int token_logprobs_forward(const void* logits, int dtype, int64_t row_stride, int64_t n, int64_t vocab,
                           const int64_t* labels, float inv_t, int64_t ignore_index, bool with_entropy, float* logprobs,
                           float* lse, float* entropy, void* stream) {
  if (n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kBF16: return launch_fwd<__nv_bfloat16>(logits, row_stride, n, vocab, labels, inv_t, ignore_index, with_entropy, logprobs, lse, entropy, s);
    case kF16: return launch_fwd<__half>(logits, row_stride, n, vocab, labels, inv_t, ignore_index, with_entropy, logprobs, lse, entropy, s);
    default: return launch_fwd<float>(logits, row_stride, n, vocab, labels, inv_t, ignore_index, with_entropy, logprobs, lse, entropy, s);
  }
}

int token_logprobs_backward(const void* logits, int dtype, int64_t row_stride, int64_t n, int64_t vocab,
                            const int64_t* labels, const float* lse, const float* entropy, const float* g_logprobs,
                            const float* g_entropy, float inv_t, int64_t ignore_index, void* grad, void* stream) {
  if (n == 0 || vocab == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kBF16: return launch_bwd<__nv_bfloat16>(logits, row_stride, n, vocab, labels, lse, entropy, g_logprobs, g_entropy, inv_t, ignore_index, grad, s);
    case kF16: return launch_bwd<__half>(logits, row_stride, n, vocab, labels, lse, entropy, g_logprobs, g_entropy, inv_t, ignore_index, grad, s);
    default: return launch_bwd<float>(logits, row_stride, n, vocab, labels, lse, entropy, g_logprobs, g_entropy, inv_t, ignore_index, grad, s);
  }
}

}  // namespace cuda_launch
}  // namespace rlhf_kernels
