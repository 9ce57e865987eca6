// CUDA glue of token_logprobs: checks the tensors (device, dtype, shape), guards their device, calls the raw-pointer launchers of
// csrc/cuda/logprobs.cu and registers the CUDA implementations.  Compiled only in CUDA builds.
#include "glue.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

namespace rlhf_kernels {
namespace cuda_launch {

// Defined in csrc/cuda/logprobs.cu.
// token_logprobs: logits [n, vocab] of dtype, row stride in elements (any: rows need no alignment),
// unit column stride; 64-bit offsets.  The launchers derive log2(e)/T and 1/T from the temperature.
int token_logprobs_forward(const void* logits, int dtype, int64_t row_stride, int64_t n, int64_t vocab,
                           const int64_t* labels, double temperature, int64_t ignore_index, bool with_entropy,
                           float* logprobs, float* lse, float* entropy, void* stream);
// grad [n, vocab] contiguous, same dtype as logits; g_entropy may be null.
int token_logprobs_backward(const void* logits, int dtype, int64_t row_stride, int64_t n, int64_t vocab,
                            const int64_t* labels, const float* lse, const float* entropy, const float* g_logprobs,
                            const float* g_entropy, double temperature, int64_t ignore_index, void* grad,
                            void* stream);

}  // namespace cuda_launch

namespace cuda {
namespace {

// logits [N, V] read in place when its last stride is 1 (any row stride: a sliced or padded view is
// not copied); otherwise one contiguous copy.  One block per row: N < 2^31.
Tensor logits_view(const Args& a, const Tensor& logits_in, const Tensor& labels) {
  a.dims("logits", logits_in, 2);
  a.floating("logits", logits_in, /*f64_ok=*/false);
  a.integral("labels", labels);
  a.numel("labels", labels, logits_in.size(0));
  TORCH_CHECK(logits_in.size(0) < (int64_t{1} << 31), "rlhf_kernels::token_logprobs: at most 2^31 - 1 rows, got ",
              logits_in.size(0));
  return logits_in.stride(1) == 1 || logits_in.size(1) <= 1 ? logits_in : logits_in.contiguous();
}

}  // namespace

Tensor3 token_logprobs_fwd(const Tensor& logits_in, const Tensor& labels_in, double temperature, int64_t ignore_index,
                           bool with_entropy) {
  Args a("token_logprobs_fwd", {{"logits", &logits_in}, {"labels", &labels_in}});
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, "rlhf_kernels::token_logprobs_fwd: temperature must be "
              "a finite positive number, got ", temperature);
  const Tensor logits = logits_view(a, logits_in, labels_in);
  const Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t n = logits.size(0), vocab = logits.size(1);
  // Row stride of a [N, 1] tensor or a single row may be anything; the kernel only multiplies by it.
  const int64_t row_stride = n > 1 ? logits.stride(0) : vocab;
  auto opts = logits.options().dtype(at::kFloat);
  Tensor lp = at::empty({n}, opts), lse = at::empty({n}, opts), ent = at::empty({n}, opts);
  check(L::token_logprobs_forward(logits.data_ptr(), dtype_code(logits), row_stride, n, vocab,
                                  labels.data_ptr<int64_t>(), temperature, ignore_index, with_entropy, fp(lp), fp(lse),
                                  fp(ent), a.stream()),
        "token_logprobs_fwd");
  return {lp, lse, ent};  // entropy [N] (zeros unless with_entropy), as the CPU op
}

Tensor token_logprobs_bwd(const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
                          const Tensor& logits_in, const Tensor& labels_in, const Tensor& lse, const Tensor& entropy,
                          double temperature, int64_t ignore_index) {
  Args a("token_logprobs_bwd", {{"logits", &logits_in}, {"grad_logprobs", &grad_logprobs}, {"labels", &labels_in},
                                {"lse", &lse}, {"entropy", &entropy}});
  a.optional("grad_entropy", grad_entropy);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, "rlhf_kernels::token_logprobs_bwd: temperature must be "
              "a finite positive number, got ", temperature);
  const Tensor logits = logits_view(a, logits_in, labels_in);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  a.floating("grad_logprobs", grad_logprobs);
  a.numel("grad_logprobs", grad_logprobs, n);
  a.floating("lse", lse);
  a.numel("lse", lse, n);
  const bool has_ent = grad_entropy.has_value() && grad_entropy->defined();
  if (has_ent) {
    a.floating("grad_entropy", *grad_entropy);
    a.numel("grad_entropy", *grad_entropy, n);
    a.floating("entropy", entropy);
    a.numel("entropy", entropy, n);
  }
  const Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t row_stride = n > 1 ? logits.stride(0) : vocab;
  Tensor grad = at::empty({n, vocab}, logits.options());
  const Tensor g_lp = f32(grad_logprobs), lse_c = f32(lse);
  Tensor g_ent, ent_c;
  if (has_ent) { g_ent = f32(*grad_entropy); ent_c = f32(entropy); }
  check(L::token_logprobs_backward(logits.data_ptr(), dtype_code(logits), row_stride, n, vocab,
                                   labels.data_ptr<int64_t>(), fp(lse_c), has_ent ? fp(ent_c) : nullptr, fp(g_lp),
                                   has_ent ? fp(g_ent) : nullptr, temperature, ignore_index, grad.data_ptr(), a.stream()),
        "token_logprobs_bwd");
  return grad;
}

}  // namespace cuda
}  // namespace rlhf_kernels

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("token_logprobs_fwd", &rlhf_kernels::cuda::token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &rlhf_kernels::cuda::token_logprobs_bwd);
}
