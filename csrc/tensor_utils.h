// Tensor-level helpers shared by the CPU kernels (csrc/cpu) and the CUDA glue (csrc/cuda/*_glue.cpp):
// the result tuple types of the ops and how small inputs are read (fp32 contiguous, bool masks).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

namespace rlhf_kernels {
using at::Tensor;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

inline Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }
inline Tensor as_bool(const Tensor& m) { return (m.scalar_type() == at::kBool ? m : m.ne(0)).contiguous(); }

inline void check_2d(const Tensor& t, const char* op) {
  TORCH_CHECK(t.dim() == 2, "rlhf_kernels::", op, ": expected a 2-D [B, T] tensor, got ", t.sizes());
}

}  // namespace rlhf_kernels
