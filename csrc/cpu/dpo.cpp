// dpo_loss on CPU: elementwise over pairs with the losses of rlhf_kernels/math.h.  Also the
// schemas of the dpo family.
#include "common.h"
#include "rlhf_kernels/math.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace rlhf_kernels {
namespace cpu {

Tensor3 dpo_loss_fwd(const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr, double beta,
                     int64_t loss_type, double label_smoothing) {
  const Tensor a = f32(pc), b = f32(pr), c = f32(rc), d = f32(rr);
  const int64_t n = a.numel();
  Tensor losses = at::empty({n}, a.options()), cr = at::empty({n}, a.options()), rj = at::empty({n}, a.options());
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>(), *pcc = c.data_ptr<float>(),
              *pd = d.data_ptr<float>();
  float *pl = losses.data_ptr<float>(), *pcr = cr.data_ptr<float>(), *prj = rj.data_ptr<float>();
  const float be = static_cast<float>(beta), ls = static_cast<float>(label_smoothing);
  const int type = static_cast<int>(loss_type);
  at::parallel_for(0, n, kElemGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float chosen = pa[i] - pcc[i], rejected = pb[i] - pd[i];
      pl[i] = dpo_pair(chosen - rejected, be, type, ls).loss;
      pcr[i] = be * chosen;
      prj[i] = be * rejected;
    }
  });
  return {losses, cr, rj};
}

Tensor4 dpo_loss_bwd(const Tensor& grad_losses, const Tensor& pc, const Tensor& pr, const Tensor& rc,
                     const Tensor& rr, double beta, int64_t loss_type, double label_smoothing) {
  const Tensor a = f32(pc), b = f32(pr), c = f32(rc), d = f32(rr), g = f32(grad_losses);
  const int64_t n = a.numel();
  Tensor dh = at::empty({n}, a.options());
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>(), *pcc = c.data_ptr<float>(),
              *pd = d.data_ptr<float>(), *pg = g.data_ptr<float>();
  float* pdh = dh.data_ptr<float>();
  const float be = static_cast<float>(beta), ls = static_cast<float>(label_smoothing);
  const int type = static_cast<int>(loss_type);
  at::parallel_for(0, n, kElemGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      pdh[i] = pg[i] * dpo_pair((pa[i] - pcc[i]) - (pb[i] - pd[i]), be, type, ls).d_h;
  });
  const Tensor neg = dh.neg();
  return {dh.to(pc.scalar_type()), neg.to(pr.scalar_type()), neg.to(rc.scalar_type()), dh.to(rr.scalar_type())};
}

}  // namespace cpu
}  // namespace rlhf_kernels

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("dpo_loss_fwd(Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, Tensor ref_rejected, "
        "float beta, int loss_type, float label_smoothing) -> (Tensor, Tensor, Tensor)");
  m.def("dpo_loss_bwd(Tensor grad_losses, Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, "
        "Tensor ref_rejected, float beta, int loss_type, float label_smoothing) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("dpo_loss_fwd", &rlhf_kernels::cpu::dpo_loss_fwd);
  m.impl("dpo_loss_bwd", &rlhf_kernels::cpu::dpo_loss_bwd);
}
