// CUDA glue of token_logprobs: takes tensors and the current stream, calls the raw-pointer launchers of
// csrc/cuda/logprobs.cu and registers the CUDA implementations.  Compiled only in CUDA builds.
#include "glue.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace rlhf_kernels {
namespace cuda_launch {

// Defined in csrc/cuda/logprobs.cu.
// token_logprobs: logits [n, vocab] of dtype, row stride in elements, unit column stride.
int token_logprobs_forward(const void* logits, int dtype, int64_t row_stride, int64_t n, int64_t vocab,
                           const int64_t* labels, float inv_t, int64_t ignore_index, bool with_entropy,
                           float* logprobs, float* lse, float* entropy, void* stream);
// grad [n, vocab] contiguous, same dtype as logits; g_entropy may be null.
int token_logprobs_backward(const void* logits, int dtype, int64_t row_stride, int64_t n, int64_t vocab,
                            const int64_t* labels, const float* lse, const float* entropy, const float* g_logprobs,
                            const float* g_entropy, float inv_t, int64_t ignore_index, void* grad, void* stream);

}  // namespace cuda_launch

namespace cuda {

Tensor3 token_logprobs_fwd(const Tensor& logits_in, const Tensor& labels_in, double temperature, int64_t ignore_index,
                           bool with_entropy) {
  TORCH_CHECK(logits_in.dim() == 2 && labels_in.dim() == 1, "rlhf_kernels::token_logprobs: logits [N, V], labels [N]");
  c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t n = logits.size(0), vocab = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  Tensor lp = at::empty({n}, opts), lse = at::empty({n}, opts), ent = at::empty({n}, opts);
  check(L::token_logprobs_forward(logits.data_ptr(), dtype_code(logits), logits.stride(0), n, vocab,
                                  labels.data_ptr<int64_t>(), static_cast<float>(1.0 / temperature), ignore_index,
                                  with_entropy, fp(lp), fp(lse), fp(ent), stream()),
        "token_logprobs_fwd");
  return {lp, lse, ent};
}

Tensor token_logprobs_bwd(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                          const Tensor& logits_in, const Tensor& labels_in, const Tensor& lse, const Tensor& entropy,
                          double temperature, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t n = logits.size(0), vocab = logits.size(1);
  Tensor grad = at::empty({n, vocab}, logits.options());
  const Tensor g_lp = f32(grad_logprobs), lse_c = f32(lse), ent_c = f32(entropy);
  Tensor g_ent;
  if (grad_entropy.has_value() && grad_entropy->defined()) g_ent = f32(*grad_entropy);
  check(L::token_logprobs_backward(logits.data_ptr(), dtype_code(logits), logits.stride(0), n, vocab,
                                   labels.data_ptr<int64_t>(), fp(lse_c), fp(ent_c), fp(g_lp),
                              g_ent.defined() ? fp(g_ent) : nullptr, static_cast<float>(1.0 / temperature),
                              ignore_index, grad.data_ptr(), stream()),
        "token_logprobs_bwd");
  return grad;
}

}  // namespace cuda
}  // namespace rlhf_kernels

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("token_logprobs_fwd", &rlhf_kernels::cuda::token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &rlhf_kernels::cuda::token_logprobs_bwd);
}
