// CUDA kl_penalty: elementwise grid-stride kernels over the estimators of rlhf_kernels/math.h.
#include <cuda_runtime.h>

#include "rlhf_kernels/cuda_launch.h"
#include "rlhf_kernels/cuda_utils.cuh"
#include "rlhf_kernels/math.h"

namespace rlhf_kernels {
namespace {

using namespace cuda_utils;

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

}  // namespace

namespace cuda_launch {

int kl_penalty_forward(const float* a, const float* b, int64_t n, int est, float* out, void* stream) {
  if (n == 0) return 0;
  kl_fwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(a, b, out, n, est);
  return last_error();
}

int kl_penalty_backward(const float* g, const float* a, const float* b, int64_t n, int est, float* ga, float* gb,
                        void* stream) {
  if (n == 0) return 0;
  kl_bwd_kernel<<<grid_for(n), kThreads, 0, RK_STREAM>>>(g, a, b, ga, gb, n, est);
  return last_error();
}

}  // namespace cuda_launch
}  // namespace rlhf_kernels
