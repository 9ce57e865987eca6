// Conventions of the host launchers of the CUDA kernels (namespace rlhf_kernels::cuda_launch).
// Each op family defines its launchers in csrc/cuda/<family>.cu, named <op>_forward / <op>_backward,
// and declares them in its glue, csrc/cuda/<family>_glue.cpp (a mismatch fails to link).  Plain C++
// types only (raw pointers, sizes, strides, the stream as void*), so this header compiles without
// CUDA or PyTorch and the .cu files compile with nvcc alone.  Each launcher returns 0 on success,
// else a cudaError_t value.  Inputs are contiguous unless a stride is passed; floats are fp32
// unless a dtype code is passed.
#pragma once

#include <stdint.h>

namespace rlhf_kernels {
namespace cuda_launch {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

}  // namespace cuda_launch
}  // namespace rlhf_kernels
