// CUDA glue of dpo_loss: checks the tensors (device, dtype, shape), guards their device, calls the raw-pointer launchers of
// csrc/cuda/dpo.cu and registers the CUDA implementations.  Compiled only in CUDA builds.
#include "glue.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace rlhf_kernels {
namespace cuda_launch {

// Defined in csrc/cuda/dpo.cu.
int dpo_loss_forward(const float* pc, const float* pr, const float* rc, const float* rr, int64_t n, float beta, int loss_type,
            float label_smoothing, float* losses, float* chosen_rewards, float* rejected_rewards, void* stream);
int dpo_loss_backward(const float* g_losses, const float* pc, const float* pr, const float* rc, const float* rr, int64_t n,
            float beta, int loss_type, float label_smoothing, float* g_pc, float* g_pr, float* g_rc, float* g_rr,
                      void* stream);

}  // namespace cuda_launch

namespace cuda {

Tensor3 dpo_loss_fwd(const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr, double beta,
                     int64_t loss_type, double label_smoothing) {
  Args g("dpo_loss_fwd", {{"policy_chosen", &pc}, {"policy_rejected", &pr}, {"ref_chosen", &rc}, {"ref_rejected", &rr}});
  g.floating("policy_chosen", pc);
  g.floating("policy_rejected", pr);
  g.floating("ref_chosen", rc);
  g.floating("ref_rejected", rr);
  g.dims("policy_chosen", pc, 1);
  g.same_shape("policy_rejected", pr, "policy_chosen", pc);
  g.same_shape("ref_chosen", rc, "policy_chosen", pc);
  g.same_shape("ref_rejected", rr, "policy_chosen", pc);
  const Tensor a = f32(pc), b = f32(pr), c = f32(rc), d = f32(rr);
  const int64_t n = a.numel();
  Tensor losses = at::empty({n}, a.options()), cr = at::empty({n}, a.options()), rj = at::empty({n}, a.options());
  check(L::dpo_loss_forward(fp(a), fp(b), fp(c), fp(d), n, static_cast<float>(beta), static_cast<int>(loss_type),
                            static_cast<float>(label_smoothing), fp(losses), fp(cr), fp(rj), g.stream()),
        "dpo_loss_fwd");
  return {losses, cr, rj};
}

Tensor4 dpo_loss_bwd(const Tensor& grad_losses, const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr,
                     double beta, int64_t loss_type, double label_smoothing) {
  Args g("dpo_loss_bwd", {{"policy_chosen", &pc}, {"policy_rejected", &pr}, {"ref_chosen", &rc}, {"ref_rejected", &rr}, {"grad_losses", &grad_losses}});
  g.floating("policy_chosen", pc);
  g.floating("policy_rejected", pr);
  g.floating("ref_chosen", rc);
  g.floating("ref_rejected", rr);
  g.dims("policy_chosen", pc, 1);
  g.same_shape("policy_rejected", pr, "policy_chosen", pc);
  g.same_shape("ref_chosen", rc, "policy_chosen", pc);
  g.same_shape("ref_rejected", rr, "policy_chosen", pc);
  g.floating("grad_losses", grad_losses);
  g.same_shape("grad_losses", grad_losses, "policy_chosen", pc);
  const Tensor a = f32(pc), b = f32(pr), c = f32(rc), d = f32(rr), gl = f32(grad_losses);
  const int64_t n = a.numel();
  Tensor ga = at::empty({n}, a.options()), gb = at::empty({n}, a.options()), gc = at::empty({n}, a.options()),
         gd = at::empty({n}, a.options());
  check(L::dpo_loss_backward(fp(gl), fp(a), fp(b), fp(c), fp(d), n, static_cast<float>(beta), static_cast<int>(loss_type),
                             static_cast<float>(label_smoothing), fp(ga), fp(gb), fp(gc), fp(gd), g.stream()),
        "dpo_loss_bwd");
  return {ga.to(pc.scalar_type()), gb.to(pr.scalar_type()), gc.to(rc.scalar_type()), gd.to(rr.scalar_type())};
}

}  // namespace cuda
}  // namespace rlhf_kernels

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("dpo_loss_fwd", &rlhf_kernels::cuda::dpo_loss_fwd);
  m.impl("dpo_loss_bwd", &rlhf_kernels::cuda::dpo_loss_bwd);
}
