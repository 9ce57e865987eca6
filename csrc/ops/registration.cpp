// Schemas of every op in the rlhf_kernels namespace and their CPU implementations.  CUDA
// implementations are registered in cuda_glue.cpp (compiled only in CUDA builds); fake (meta)
// implementations and autograd are registered from Python (rlhf_kernels/_extension_ops.py) with
// torch.library, so the ops compose with torch.compile.
#include "ops.h"

#include <torch/library.h>

#include <sstream>
#include <string>

#if defined(RLHF_KERNELS_WITH_CUDA)
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

namespace rlhf_kernels {
namespace {

// What this binary was built for; the loader compares it with the running torch.
std::string build_info() {
  std::ostringstream s;
#if defined(RLHF_KERNELS_TORCH_MAJOR)
  s << "torch=" << RLHF_KERNELS_TORCH_MAJOR << "." << RLHF_KERNELS_TORCH_MINOR << "." << RLHF_KERNELS_TORCH_PATCH;
#else
  s << "torch=unknown";
#endif
#if defined(RLHF_KERNELS_WITH_CUDA)
  s << ";cuda=" << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10;
#else
  s << ";cuda=none";
#endif
#if defined(__clang__)
  s << ";compiler=clang " << __clang_major__ << "." << __clang_minor__;
#elif defined(__GNUC__)
  s << ";compiler=gcc " << __GNUC__ << "." << __GNUC_MINOR__;
#elif defined(_MSC_VER)
  s << ";compiler=msvc " << _MSC_VER;
#endif
  s << ";cxx11_abi=" << _GLIBCXX_USE_CXX11_ABI;
  return s.str();
}

}  // namespace
}  // namespace rlhf_kernels

TORCH_LIBRARY(rlhf_kernels, m) {
  m.def("build_info() -> str", &rlhf_kernels::build_info);
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, "
        "bool with_entropy) -> (Tensor, Tensor, Tensor)");
  m.def("token_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, "
        "Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");
  m.def("kl_penalty_fwd(Tensor logprobs, Tensor ref_logprobs, int estimator) -> Tensor");
  m.def("kl_penalty_bwd(Tensor grad, Tensor logprobs, Tensor ref_logprobs, int estimator) -> (Tensor, Tensor)");
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("gae_bwd(Tensor grad_advantages, Tensor grad_returns, Tensor mask, float gamma, float lam) "
        "-> (Tensor, Tensor)");
  m.def("ppo_policy_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
        "float clip_low, float clip_high, float? dual_clip, int agg) -> (Tensor, Tensor, Tensor)");
  m.def("ppo_policy_loss_bwd(Tensor grad_loss, Tensor logprobs, Tensor old_logprobs, Tensor advantages, "
        "Tensor mask, Tensor row_weight, float clip_low, float clip_high, float? dual_clip) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("ppo_value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float? clip, "
        "int agg) -> (Tensor, Tensor, Tensor)");
  m.def("ppo_value_loss_bwd(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, "
        "Tensor mask, Tensor row_weight, float? clip) -> (Tensor, Tensor, Tensor)");
  m.def("dpo_loss_fwd(Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, Tensor ref_rejected, "
        "float beta, int loss_type, float label_smoothing) -> (Tensor, Tensor, Tensor)");
  m.def("dpo_loss_bwd(Tensor grad_losses, Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, "
        "Tensor ref_rejected, float beta, int loss_type, float label_smoothing) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

#define RK_IMPL_ALL(NS)                                                 \
  m.impl("token_logprobs_fwd", &rlhf_kernels::NS::token_logprobs_fwd);   \
  m.impl("token_logprobs_bwd", &rlhf_kernels::NS::token_logprobs_bwd);   \
  m.impl("kl_penalty_fwd", &rlhf_kernels::NS::kl_penalty_fwd);           \
  m.impl("kl_penalty_bwd", &rlhf_kernels::NS::kl_penalty_bwd);           \
  m.impl("gae_fwd", &rlhf_kernels::NS::gae_fwd);                         \
  m.impl("gae_bwd", &rlhf_kernels::NS::gae_bwd);                         \
  m.impl("ppo_policy_loss_fwd", &rlhf_kernels::NS::ppo_policy_loss_fwd); \
  m.impl("ppo_policy_loss_bwd", &rlhf_kernels::NS::ppo_policy_loss_bwd); \
  m.impl("ppo_value_loss_fwd", &rlhf_kernels::NS::ppo_value_loss_fwd);   \
  m.impl("ppo_value_loss_bwd", &rlhf_kernels::NS::ppo_value_loss_bwd);   \
  m.impl("dpo_loss_fwd", &rlhf_kernels::NS::dpo_loss_fwd);               \
  m.impl("dpo_loss_bwd", &rlhf_kernels::NS::dpo_loss_bwd);

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { RK_IMPL_ALL(cpu) }

#if defined(RLHF_KERNELS_WITH_CUDA)
TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) { RK_IMPL_ALL(cuda) }
#endif
