// Device helpers shared by the CUDA kernel files (csrc/cuda/<family>.cu): launch geometry,
// grid-stride loops, block reductions.  CUDA headers only, so the .cu files still compile with nvcc
// alone.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace rlhf_kernels {
namespace cuda_utils {

constexpr int kThreads = 256;

// Blocks for an elementwise grid-stride loop over n elements.
inline unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

inline int last_error() { return static_cast<int>(cudaGetLastError()); }

// Sum of K floats over a block of kThreads; the result is valid in every thread.
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

}  // namespace cuda_utils
}  // namespace rlhf_kernels

#define RK_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

// The launchers take the stream as void* (no CUDA types in their signatures).
#define RK_STREAM static_cast<cudaStream_t>(stream)
