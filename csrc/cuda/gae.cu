// CUDA gae: one thread per row runs the scan of rlhf_kernels/math.h (gae_row_forward /
// gae_row_backward, shared with the CPU kernel) in registers.
#include <cuda_runtime.h>

#include "rlhf_kernels/cuda_launch.h"
#include "rlhf_kernels/cuda_utils.cuh"
#include "rlhf_kernels/math.h"

namespace rlhf_kernels {
namespace {

using namespace cuda_utils;

__global__ void gae_fwd_kernel(const float* __restrict__ r, const float* __restrict__ v, const bool* __restrict__ m,
                               float* __restrict__ adv, float* __restrict__ ret, int64_t B, int64_t T, float gamma,
                               float gl) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t o = b * T;
  gae_row_forward(r + o, v + o, m + o, T, gamma, gl, adv + o, ret + o);
}

__global__ void gae_bwd_kernel(const float* __restrict__ gA, const float* __restrict__ gR, const bool* __restrict__ m,
                               float* __restrict__ dr, float* __restrict__ dv, int64_t B, int64_t T, float gamma,
                               float gl) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t o = b * T;
  gae_row_backward(gA + o, gR + o, m + o, T, gamma, gl, dr + o, dv + o);
}

}  // namespace

namespace cuda_launch {

int gae_forward(const float* r, const float* v, const bool* m, int64_t B, int64_t T, float gamma, float gl, float* adv,
                float* ret, void* stream) {
  if (B * T == 0) return 0;
  gae_fwd_kernel<<<static_cast<unsigned>((B + 127) / 128), 128, 0, RK_STREAM>>>(r, v, m, adv, ret, B, T, gamma, gl);
  return last_error();
}

int gae_backward(const float* gA, const float* gR, const bool* m, int64_t B, int64_t T, float gamma, float gl, float* dr,
                 float* dv, void* stream) {
  if (B * T == 0) return 0;
  gae_bwd_kernel<<<static_cast<unsigned>((B + 127) / 128), 128, 0, RK_STREAM>>>(gA, gR, m, dr, dv, B, T, gamma, gl);
  return last_error();
}

}  // namespace cuda_launch
}  // namespace rlhf_kernels
