// Helpers shared by the CUDA glue files (csrc/cuda/<family>_glue.cpp): argument checks of direct
// torch.ops.rlhf_kernels.* calls (device, dtype, shape; every error names the argument), the device
// guard and that device's current stream, raw fp32 pointers, launch error checks, dtype codes.  Small
// inputs are made fp32 contiguous (see csrc/tensor_utils.h; a copy only when they are not already);
// logits keep their dtype and row stride.  Nothing here syncs with the host.
#pragma once

#include "../tensor_utils.h"
#include "rlhf_kernels/cuda_launch.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <initializer_list>
#include <utility>

namespace rlhf_kernels {
namespace cuda {

namespace L = rlhf_kernels::cuda_launch;

// The current stream of the inputs' device (call under that device's guard).
inline void* stream(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()).stream(); }

// Arguments of one op call: every tensor must be a defined CUDA tensor on the device of the first one.
// Construct it first in each glue function; it holds the CUDA guard of that device.
class Args {
 public:
  Args(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> tensors) : op_(op) {
    const auto* first = tensors.begin();
    for (const auto& [name, t] : tensors) {
      TORCH_CHECK(t->defined(), "rlhf_kernels::", op, ": ", name, " is an undefined tensor");
      TORCH_CHECK(t->is_cuda(), "rlhf_kernels::", op, ": ", name, " must be a CUDA tensor, got device ", t->device());
      TORCH_CHECK(t->device() == first->second->device(), "rlhf_kernels::", op, ": ", name, " is on ", t->device(),
                  " but ", first->first, " is on ", first->second->device(), "; all tensors must be on one device");
    }
    device_ = first->second->device();
    guard_.emplace(device_);
  }
  // An optional tensor (Tensor? in the schema): the same device check when it is given.
  void optional(const char* name, const std::optional<Tensor>& t) const {
    if (!t.has_value() || !t->defined()) return;
    TORCH_CHECK(t->is_cuda() && t->device() == device_, "rlhf_kernels::", op_, ": ", name, " is on ", t->device(),
                " but the other tensors are on ", device_);
  }
  // Floating point: float32, bfloat16, float16 (float64 too where `f64_ok`: it is read as fp32).
  void floating(const char* name, const Tensor& t, bool f64_ok = true) const {
    const auto st = t.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || (f64_ok && st == at::kDouble),
                "rlhf_kernels::", op_, ": ", name, " must be float32, bfloat16 or float16", (f64_ok ? " (or float64)" : ""),
                ", got ", st);
  }
  void integral(const char* name, const Tensor& t) const {
    TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), "rlhf_kernels::", op_, ": ", name,
                " must be an integer tensor, got ", t.scalar_type());
  }
  // A mask: bool, or any integer / floating dtype read as != 0.
  void mask(const char* name, const Tensor& t) const {
    TORCH_CHECK(t.scalar_type() == at::kBool || at::isIntegralType(t.scalar_type(), false) ||
                    at::isFloatingType(t.scalar_type()),
                "rlhf_kernels::", op_, ": ", name, " must be a bool (or 0/1) tensor, got ", t.scalar_type());
  }
  void dims(const char* name, const Tensor& t, int64_t dim) const {
    TORCH_CHECK(t.dim() == dim, "rlhf_kernels::", op_, ": ", name, " must have ", dim, " dimensions, got shape ",
                t.sizes());
  }
  void same_shape(const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) const {
    TORCH_CHECK(t.sizes() == ref.sizes(), "rlhf_kernels::", op_, ": ", name, " has shape ", t.sizes(), " but ",
                ref_name, " has shape ", ref.sizes());
  }
  void numel(const char* name, const Tensor& t, int64_t n) const {
    TORCH_CHECK(t.dim() == 1 && t.numel() == n, "rlhf_kernels::", op_, ": ", name, " must be a 1-D tensor of ", n,
                " elements, got shape ", t.sizes());
  }
  const at::Device& device() const { return device_; }
  void* stream() const { return cuda::stream(device_); }

 private:
  const char* op_;
  at::Device device_{at::kCUDA};
  std::optional<c10::cuda::CUDAGuard> guard_;
};
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
