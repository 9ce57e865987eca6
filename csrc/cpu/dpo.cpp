// dpo_loss on CPU: one vectorized pass over the pairs (vec.h) with the losses of
// rlhf_kernels/math.h written out on SIMD vectors (exp and log1p by polynomials), inputs read in
// their own dtype.  Also the schemas of the dpo family.
#include "common.h"
#include "rlhf_kernels/math.h"
#include "vec.h"

#include <torch/library.h>

#include <optional>

namespace rlhf_kernels {
namespace cpu {
namespace {

struct DpoArgs {
  SrcF pc, pr, rc, rr, g;
  DstF *o0, *o1, *o2, *o3;  // forward: losses, chosen, rejected; backward: d pc, d pr, d rc, d rr
  float beta, ls;
  int type;
};

// log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)); sigmoid(|x|) = 1 / (1 + e), sigmoid(-|x|) = e / (1 + e).
template <typename VF>
struct SigV { VF ls_pos, ls_neg, sig_pos, sig_neg; };  // at +x and -x

template <typename VF>
RK_INLINE SigV<VF> sig_v(VF x) {
  const VF zero = vbroadcast<VF>(0.0f);
  const VF e = vexp(-vabs(x));
  const VF l1p = vlog1p_unit(e);
  const VF inv = 1.0f / (1.0f + e);
  const VF big = inv, small = e * inv;  // sigmoid(|x|), sigmoid(-|x|)
  const auto pos = x >= zero;
  SigV<VF> o;
  o.ls_pos = vmin(x, zero) - l1p;
  o.ls_neg = vmin(-x, zero) - l1p;
  o.sig_pos = pos ? big : small;
  o.sig_neg = pos ? small : big;
  return o;
}

template <typename VF>
RK_INLINE void dpo_v(VF h, const DpoArgs& a, VF& loss, VF& dh) {
  const float beta = a.beta, ls = a.ls;
  const VF bh = beta * h;
  switch (a.type) {
    case kSigmoid: {
      const SigV<VF> s = sig_v(bh);
      loss = -(1.0f - ls) * s.ls_pos - ls * s.ls_neg;
      dh = beta * (-(1.0f - ls) * s.sig_neg + ls * s.sig_pos);
      break;
    }
    case kIpo: {
      const VF e = h - 1.0f / (2.0f * beta);
      loss = e * e;
      dh = 2.0f * e;
      break;
    }
    case kHinge: {
      const VF zero = vbroadcast<VF>(0.0f);
      const VF m = 1.0f - bh;
      loss = m > zero ? m : zero;
      dh = m > zero ? vbroadcast<VF>(-beta) : zero;
      break;
    }
    default: {
      const float k = 1.0f / (1.0f - 2.0f * ls);
      const SigV<VF> s = sig_v(bh);
      loss = k * (-(1.0f - ls) * s.ls_pos + ls * s.ls_neg);
      dh = k * beta * (-(1.0f - ls) * s.sig_neg - ls * s.sig_pos);
    }
  }
}

template <typename VF>
RK_INLINE void dpo_fwd_range(const DpoArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t W = lanes<VF>();
  float b0[kVecChunk], b1[kVecChunk], b2[kVecChunk], b3[kVecChunk], o0[kVecChunk], o1[kVecChunk], o2[kVecChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kVecChunk) {
    const int64_t n = std::min(kVecChunk, end - c0);
    const float *pc = a.pc.chunk(c0, n, b0), *pr = a.pr.chunk(c0, n, b1), *rc = a.rc.chunk(c0, n, b2),
                *rr = a.rr.chunk(c0, n, b3);
    float *pl = a.o0->at(c0, o0), *pcr = a.o1->at(c0, o1), *prj = a.o2->at(c0, o2);
    float* pdh = a.o3 ? a.o3->at(c0, nullptr) : nullptr;  // the training forward's d loss / d h (fp32)
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      const VF chosen = vload<VF>(pc + i) - vload<VF>(rc + i), rejected = vload<VF>(pr + i) - vload<VF>(rr + i);
      VF loss, dh;
      dpo_v(chosen - rejected, a, loss, dh);
      vstore(pl + i, loss);
      vstore(pcr + i, a.beta * chosen);
      vstore(prj + i, a.beta * rejected);
      if (pdh) vstore(pdh + i, dh);
    }
    for (; i < n; ++i) {
      const float chosen = pc[i] - rc[i], rejected = pr[i] - rr[i];
      const DpoPair pair = dpo_pair(chosen - rejected, a.beta, a.type, a.ls);
      pl[i] = pair.loss;
      pcr[i] = a.beta * chosen;
      prj[i] = a.beta * rejected;
      if (pdh) pdh[i] = pair.d_h;
    }
    a.o0->flush(c0, n, o0); a.o1->flush(c0, n, o1); a.o2->flush(c0, n, o2);
  }
}

template <typename VF>
RK_INLINE void dpo_bwd_range(const DpoArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t W = lanes<VF>();
  float b0[kVecChunk], b1[kVecChunk], b2[kVecChunk], b3[kVecChunk], bg[kVecChunk];
  float o0[kVecChunk], o1[kVecChunk], o2[kVecChunk], o3[kVecChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kVecChunk) {
    const int64_t n = std::min(kVecChunk, end - c0);
    const float *pc = a.pc.chunk(c0, n, b0), *pr = a.pr.chunk(c0, n, b1), *rc = a.rc.chunk(c0, n, b2),
                *rr = a.rr.chunk(c0, n, b3), *pg = a.g.chunk(c0, n, bg);
    float *d0 = a.o0->at(c0, o0), *d1 = a.o1->at(c0, o1), *d2 = a.o2->at(c0, o2), *d3 = a.o3->at(c0, o3);
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      const VF h = (vload<VF>(pc + i) - vload<VF>(rc + i)) - (vload<VF>(pr + i) - vload<VF>(rr + i));
      VF loss, dh;
      dpo_v(h, a, loss, dh);
      const VF g = vload<VF>(pg + i) * dh;
      vstore(d0 + i, g); vstore(d1 + i, -g); vstore(d2 + i, -g); vstore(d3 + i, g);
    }
    for (; i < n; ++i) {
      const float g = pg[i] * dpo_pair((pc[i] - rc[i]) - (pr[i] - rr[i]), a.beta, a.type, a.ls).d_h;
      d0[i] = g; d1[i] = -g; d2[i] = -g; d3[i] = g;
    }
    a.o0->flush(c0, n, o0); a.o1->flush(c0, n, o1); a.o2->flush(c0, n, o2); a.o3->flush(c0, n, o3);
  }
}

RK_ISA_DISPATCH_AVX512(dpo_fwd, DpoArgs)
RK_ISA_DISPATCH_AVX512(dpo_bwd, DpoArgs)

void check_pairs(const char* op, const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr,
                 int64_t loss_type, double beta) {
  check_float_cpu(pc, op, "policy_chosen");
  TORCH_CHECK(pc.dim() == 1, "rlhf_kernels::", op, ": policy_chosen must be 1-D [B], got shape ", pc.sizes());
  check_float_like(pr, pc, op, "policy_rejected", "policy_chosen");
  check_float_like(rc, pc, op, "ref_chosen", "policy_chosen");
  check_float_like(rr, pc, op, "ref_rejected", "policy_chosen");
  TORCH_CHECK(loss_type >= 0 && loss_type <= kRobust, "rlhf_kernels::", op, ": loss_type must be in [0, ",
              int(kRobust), "], got ", loss_type);
  TORCH_CHECK(beta > 0.0, "rlhf_kernels::", op, ": beta must be > 0, got ", beta);
}

Tensor empty_contig(const Tensor& like, at::ScalarType st) {
  return at::empty({like.numel()}, like.options().dtype(st).memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

namespace {

// The forward; with dh (the training forward) also d loss / d h per pair, h = (pc - rc) - (pr - rr).
Tensor3 dpo_forward(const char* op, const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr,
                    double beta, int64_t loss_type, double label_smoothing, Tensor* dh) {
  check_pairs(op, pc, pr, rc, rr, loss_type, beta);
  const Tensor a = contig(pc), b = contig(pr), c = contig(rc), d = contig(rr);
  Tensor losses = empty_contig(a, at::kFloat), cr = empty_contig(a, at::kFloat), rj = empty_contig(a, at::kFloat);
  DstF o0(losses), o1(cr), o2(rj);
  std::optional<DstF> o3;
  if (dh) {
    *dh = empty_contig(a, at::kFloat);
    o3.emplace(*dh);
  }
  const DpoArgs args{SrcF(a), SrcF(b), SrcF(c), SrcF(d), SrcF(a), &o0, &o1, &o2, dh ? &*o3 : nullptr,
                     static_cast<float>(beta), static_cast<float>(label_smoothing), static_cast<int>(loss_type)};
  parallel_blocks(a.numel(), kElemGrain, [&](int64_t begin, int64_t end) { dpo_fwd(args, begin, end); });
  return {losses, cr, rj};
}

}  // namespace

Tensor3 dpo_loss_fwd(const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr, double beta,
                     int64_t loss_type, double label_smoothing) {
  return dpo_forward("dpo_loss_fwd", pc, pr, rc, rr, beta, loss_type, label_smoothing, nullptr);
}

// The forward for training on CPU: also d loss / d h per pair (fp32), so the backward is grad * dh
// (with signs per input) instead of a pass that re-evaluates the sigmoid terms from four inputs.
Tensor4 dpo_loss_fwd_dx(const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr, double beta,
                        int64_t loss_type, double label_smoothing) {
  Tensor dh;
  auto [losses, cr, rj] = dpo_forward("dpo_loss_fwd_dx", pc, pr, rc, rr, beta, loss_type, label_smoothing, &dh);
  return {losses, cr, rj, dh};
}

Tensor4 dpo_loss_bwd(const Tensor& grad_losses, const Tensor& pc, const Tensor& pr, const Tensor& rc,
                     const Tensor& rr, double beta, int64_t loss_type, double label_smoothing) {
  check_pairs("dpo_loss_bwd", pc, pr, rc, rr, loss_type, beta);
  check_float_like(grad_losses, pc, "dpo_loss_bwd", "grad_losses", "policy_chosen");
  const Tensor a = contig(pc), b = contig(pr), c = contig(rc), d = contig(rr), g = contig(grad_losses);
  Tensor d0 = empty_contig(a, pc.scalar_type()), d1 = empty_contig(a, pr.scalar_type()),
         d2 = empty_contig(a, rc.scalar_type()), d3 = empty_contig(a, rr.scalar_type());
  DstF o0(d0), o1(d1), o2(d2), o3(d3);
  const DpoArgs args{SrcF(a), SrcF(b), SrcF(c), SrcF(d), SrcF(g), &o0, &o1, &o2, &o3,
                     static_cast<float>(beta), static_cast<float>(label_smoothing), static_cast<int>(loss_type)};
  parallel_blocks(a.numel(), kElemGrain, [&](int64_t begin, int64_t end) { dpo_bwd(args, begin, end); });
  return {d0, d1, d2, d3};
}

}  // namespace cpu
}  // namespace rlhf_kernels

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("dpo_loss_fwd(Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, Tensor ref_rejected, "
        "float beta, int loss_type, float label_smoothing) -> (Tensor, Tensor, Tensor)");
  m.def("dpo_loss_bwd(Tensor grad_losses, Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, "
        "Tensor ref_rejected, float beta, int loss_type, float label_smoothing) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // CPU only: the training forward of the cpu backend (see _extension_ops/dpo.py).
  m.def("dpo_loss_fwd_dx(Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, Tensor ref_rejected, "
        "float beta, int loss_type, float label_smoothing) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("dpo_loss_fwd", &rlhf_kernels::cpu::dpo_loss_fwd);
  m.impl("dpo_loss_bwd", &rlhf_kernels::cpu::dpo_loss_bwd);
  m.impl("dpo_loss_fwd_dx", &rlhf_kernels::cpu::dpo_loss_fwd_dx);
}
