// CUDA glue of kl_penalty: checks the tensors (device, dtype, shape), guards their device, calls the raw-pointer launchers of
// csrc/cuda/kl.cu and registers the CUDA implementations.  Compiled only in CUDA builds.
#include "glue.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace rlhf_kernels {
namespace cuda_launch {

// Defined in csrc/cuda/kl.cu.
int kl_penalty_forward(const float* logprobs, const float* ref, int64_t n, int estimator, float* out, void* stream);
int kl_penalty_backward(const float* grad, const float* logprobs, const float* ref, int64_t n, int estimator,
                        float* g_logprobs, float* g_ref, void* stream);

}  // namespace cuda_launch

namespace cuda {

Tensor kl_penalty_fwd(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  Args g("kl_penalty_fwd", {{"logprobs", &logprobs}, {"ref_logprobs", &ref_logprobs}});
  g.floating("logprobs", logprobs);
  g.floating("ref_logprobs", ref_logprobs);
  g.same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs);
  const Tensor a = f32(logprobs), b = f32(ref_logprobs);
  Tensor out = at::empty(a.sizes(), a.options());
  check(L::kl_penalty_forward(fp(a), fp(b), a.numel(), static_cast<int>(estimator), fp(out), g.stream()),
        "kl_penalty_fwd");
  return out;
}

Tensor2 kl_penalty_bwd(const Tensor& grad, const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  Args c("kl_penalty_bwd", {{"logprobs", &logprobs}, {"ref_logprobs", &ref_logprobs}, {"grad", &grad}});
  c.floating("logprobs", logprobs);
  c.floating("ref_logprobs", ref_logprobs);
  c.floating("grad", grad);
  c.same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs);
  c.same_shape("grad", grad, "logprobs", logprobs);
  const Tensor a = f32(logprobs), b = f32(ref_logprobs), g = f32(grad);
  Tensor ga = at::empty(a.sizes(), a.options()), gb = at::empty(a.sizes(), a.options());
  check(L::kl_penalty_backward(fp(g), fp(a), fp(b), a.numel(), static_cast<int>(estimator), fp(ga), fp(gb),
                               c.stream()),
        "kl_penalty_bwd");
  return {ga.to(logprobs.scalar_type()), gb.to(ref_logprobs.scalar_type())};
}

}  // namespace cuda
}  // namespace rlhf_kernels

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("kl_penalty_fwd", &rlhf_kernels::cuda::kl_penalty_fwd);
  m.impl("kl_penalty_bwd", &rlhf_kernels::cuda::kl_penalty_bwd);
}
