// Helpers shared by the CUDA glue files (csrc/cuda/<family>_glue.cpp): the current stream, raw
// fp32 pointers, launch error checks, dtype codes.  Small inputs are made fp32 contiguous (see
// csrc/tensor_utils.h); logits keep their dtype and row stride.  Nothing here syncs with the host.
#pragma once

#include "../tensor_utils.h"
#include "rlhf_kernels/cuda_launch.h"

#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace rlhf_kernels {
namespace cuda {

namespace L = rlhf_kernels::cuda_launch;

inline void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
template <typename T>
const float* fp(const T& t) { return t.template data_ptr<float>(); }
inline float* fp(Tensor& t) { return t.data_ptr<float>(); }

inline void check(int err, const char* op) {
  TORCH_CHECK(err == 0, "rlhf_kernels::", op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

inline int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return L::kF32;
    case at::kBFloat16: return L::kBF16;
    case at::kHalf: return L::kF16;
    default: TORCH_CHECK(false, "rlhf_kernels (cuda): logits must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

}  // namespace cuda
}  // namespace rlhf_kernels
