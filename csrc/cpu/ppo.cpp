// ppo_policy_loss and ppo_value_loss on CPU.  The math per token is the one of the CUDA kernels
// (rlhf_kernels/math.h), written out on SIMD vectors (vec.h) with selects instead of branches, one
// pass over the inputs in their own dtype; rows (sequences) run in parallel, sums accumulate in fp32
// lanes per chunk of 256 tokens and in double per row, and rows combine in row order
// (deterministic).  Masked entries do not reach the results (selected away, so NaN or inf there are
// harmless).  Also the family's schemas.
#include "common.h"
#include "rlhf_kernels/math.h"
#include "vec.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace rlhf_kernels {
namespace cpu {

// Masked aggregation shared by the PPO losses: per-row sums in parallel, then the row weights.

namespace {

// Per-token weight of each row for agg, from the per-row valid-token counts.
Tensor row_weights(const std::vector<double>& row_tokens, int64_t agg, const at::TensorOptions& opts) {
  const int64_t B = static_cast<int64_t>(row_tokens.size());
  double total = 0.0, rows_with = 0.0;
  for (double c : row_tokens) {
    total += c;
    rows_with += c > 0 ? 1.0 : 0.0;
  }
  Tensor w = at::empty({B}, opts);
  float* pw = w.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    pw[b] = agg_row_weight(static_cast<int>(agg), static_cast<float>(row_tokens[b]), static_cast<float>(total),
                           static_cast<float>(rows_with), static_cast<float>(B));
  return w;
}

}  // namespace


namespace {

template <typename VF>
RK_INLINE VF vclamp(VF x, float lo, float hi) { return vmin(vmax(x, vbroadcast<VF>(lo)), vbroadcast<VF>(hi)); }

// Inputs of both losses: three float streams, the mask bytes, [B, T] contiguous.
struct LossArgs {
  SrcF x, y, z;          // policy: logprobs, old_logprobs, advantages; value: values, old_values, returns
  const uint8_t* mask;
  int64_t T;
  float p0, p1, p2;      // policy: clip_low, clip_high, dual_clip; value: clip
  bool flag;             // policy: has dual clip; value: has clip
  // forward: per-row sums (double) out; backward: upstream scale, row weights in, gradients out
  double *s0, *s1, *s2, *s3, *s4;
  float g;
  const float* w;
  DstF *d0, *d1, *d2;
};

// ---- policy loss, vector form of ppo_policy_token ----
template <typename VF>
struct PolicyV {
  VF pg, ratio, gr, ga, dlr, clipped, lower;
};

template <typename VF>
RK_INLINE PolicyV<VF> policy_v(VF lp, VF old, VF adv, const LossArgs& a, bool grads) {
  PolicyV<VF> o;
  const VF zero = vbroadcast<VF>(0.0f), one = vbroadcast<VF>(1.0f), half = vbroadcast<VF>(0.5f);
  const VF x = lp - old;
  const VF lr = vclamp(x, -20.0f, 20.0f);
  const float lo = 1.0f - a.p0, hi = 1.0f + a.p1;
  o.ratio = vexp(lr);
  const VF cr = vclamp(o.ratio, lo, hi);
  const VF pg1 = -adv * o.ratio, pg2 = -adv * cr;
  const auto lt = pg2 > pg1, gt = pg1 > pg2;
  o.pg = lt ? pg2 : pg1;
  o.clipped = lt ? one : zero;
  o.lower = zero;
  if (grads) {
    const VF dcr = (o.ratio >= lo) & (o.ratio <= hi) ? one : zero;
    const VF g1r = -adv, g2r = -adv * dcr, g1a = -o.ratio, g2a = -cr;
    o.gr = gt ? g1r : (lt ? g2r : half * (g1r + g2r));
    o.ga = gt ? g1a : (lt ? g2a : half * (g1a + g2a));
    o.dlr = (x >= -20.0f) & (x <= 20.0f) ? one : zero;
  }
  if (a.flag) {
    const VF pg3 = -adv * a.p2;
    const auto neg = adv < zero;
    const auto low = neg & (o.pg > pg3);
    if (grads) {
      const auto tie = neg & (o.pg == pg3);
      o.gr = low ? zero : (tie ? half * o.gr : o.gr);
      o.ga = low ? vbroadcast<VF>(-a.p2) : (tie ? half * (o.ga - a.p2) : o.ga);
    }
    o.pg = low ? pg3 : o.pg;
    o.lower = low ? one : zero;
  }
  return o;
}

// DX: also write each token's d pg / d logprobs (0 where masked) to *a.d0, fp32, unweighted.
template <typename VF, bool DX>
RK_INLINE void policy_fwd_rows(const LossArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t W = lanes<VF>();
  float bx[kVecChunk], by[kVecChunk], bz[kVecChunk];
  const VF zero = vbroadcast<VF>(0.0f);
  for (int64_t b = begin; b < end; ++b) {
    double c = 0, s = 0, cn = 0, ln = 0, k = 0;
    for (int64_t t0 = 0; t0 < a.T; t0 += kVecChunk) {
      const int64_t n = std::min(kVecChunk, a.T - t0), off = b * a.T + t0;
      const float *lp = a.x.chunk(off, n, bx), *old = a.y.chunk(off, n, by), *adv = a.z.chunk(off, n, bz);
      const uint8_t* m = a.mask + off;
      float* dx = DX ? a.d0->at(off, nullptr) : nullptr;
      VF vc = zero, vs = zero, vcn = zero, vln = zero, vk = zero;
      int64_t i = 0;
      for (; i + W <= n; i += W) {
        const VF mv = vload_mask<VF>(m + i);
        const auto valid = mv > zero;
        const VF l = vload<VF>(lp + i), o = vload<VF>(old + i);
        const PolicyV<VF> tok = policy_v(l, o, vload<VF>(adv + i), a, DX);
        vc += mv;
        vs += valid ? tok.pg : zero;
        vcn += valid ? tok.clipped : zero;
        vln += valid ? tok.lower : zero;
        vk += valid ? o - l : zero;
        if (DX) vstore(dx + i, valid ? tok.gr * tok.ratio * tok.dlr : zero);
      }
      c += hsum(vc); s += hsum(vs); cn += hsum(vcn); ln += hsum(vln); k += hsum(vk);
      for (; i < n; ++i) {
        if (!m[i]) {
          if (DX) dx[i] = 0.0f;
          continue;
        }
        const PolicyToken tok = ppo_policy_token(lp[i], old[i], adv[i], a.p0, a.p1, a.flag, a.p2);
        c += 1; s += tok.pg; cn += tok.clipped; ln += tok.lower; k += static_cast<double>(old[i] - lp[i]);
        if (DX) dx[i] = tok.d_logratio;
      }
    }
    a.s0[b] = c; a.s1[b] = s; a.s2[b] = cn; a.s3[b] = ln; a.s4[b] = k;
  }
}

template <typename VF>
RK_INLINE void policy_fwd_range(const LossArgs& a, int64_t begin, int64_t end) {
  if (a.d0) policy_fwd_rows<VF, true>(a, begin, end); else policy_fwd_rows<VF, false>(a, begin, end);
}

template <typename VF>
RK_INLINE void policy_bwd_range(const LossArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t W = lanes<VF>();
  float bx[kVecChunk], by[kVecChunk], bz[kVecChunk], o0[kVecChunk], o1[kVecChunk], o2[kVecChunk];
  const VF zero = vbroadcast<VF>(0.0f);
  for (int64_t b = begin; b < end; ++b) {
    const float g = a.g * a.w[b];
    for (int64_t t0 = 0; t0 < a.T; t0 += kVecChunk) {
      const int64_t n = std::min(kVecChunk, a.T - t0), off = b * a.T + t0;
      const float *lp = a.x.chunk(off, n, bx), *old = a.y.chunk(off, n, by), *adv = a.z.chunk(off, n, bz);
      const uint8_t* m = a.mask + off;
      float *d0 = a.d0->at(off, o0), *d1 = a.d1->at(off, o1), *d2 = a.d2->at(off, o2);
      int64_t i = 0;
      for (; i + W <= n; i += W) {
        const auto valid = vload_mask<VF>(m + i) > zero;
        const PolicyV<VF> tok = policy_v(vload<VF>(lp + i), vload<VF>(old + i), vload<VF>(adv + i), a, true);
        const VF dl = g * (tok.gr * tok.ratio * tok.dlr);
        vstore(d0 + i, valid ? dl : zero);
        vstore(d1 + i, valid ? -dl : zero);
        vstore(d2 + i, valid ? g * tok.ga : zero);
      }
      for (; i < n; ++i) {
        if (!m[i]) {
          d0[i] = d1[i] = d2[i] = 0.0f;
          continue;
        }
        const PolicyToken tok = ppo_policy_token(lp[i], old[i], adv[i], a.p0, a.p1, a.flag, a.p2);
        d0[i] = g * tok.d_logratio;
        d1[i] = -g * tok.d_logratio;
        d2[i] = g * tok.d_adv;
      }
      a.d0->flush(off, n, o0); a.d1->flush(off, n, o1); a.d2->flush(off, n, o2);
    }
  }
}

// ---- value loss, vector form of ppo_value_token ----
template <typename VF>
struct ValueV {
  VF vf, dv, dold, dret, clipped;
};

template <typename VF>
RK_INLINE ValueV<VF> value_v(VF v, VF old, VF ret, const LossArgs& a) {
  ValueV<VF> o;
  const VF zero = vbroadcast<VF>(0.0f), one = vbroadcast<VF>(1.0f), half = vbroadcast<VF>(0.5f);
  const VF e1 = v - ret, l1 = e1 * e1;
  if (!a.flag) {
    o.vf = l1; o.dv = 2.0f * e1; o.dold = zero; o.dret = -2.0f * e1; o.clipped = zero;
    return o;
  }
  const float c = a.p0;
  const VF d = v - old;
  const VF inside = (d >= -c) & (d <= c) ? one : zero;
  const VF e2 = (old + vclamp(d, -c, c)) - ret, l2 = e2 * e2;
  const VF av = 2.0f * e1, ar = -2.0f * e1;
  const VF bv = 2.0f * e2 * inside, bo = 2.0f * e2 * (1.0f - inside), br = -2.0f * e2;
  const auto gt = l1 > l2, lt = l2 > l1;
  o.vf = lt ? l2 : l1;
  o.clipped = lt ? one : zero;
  o.dv = gt ? av : (lt ? bv : half * (av + bv));
  o.dold = gt ? zero : (lt ? bo : half * bo);
  o.dret = gt ? ar : (lt ? br : half * (ar + br));
  return o;
}

// DX: also write each token's d vf / d values (0 where masked) to *a.d0, fp32, unweighted.
template <typename VF, bool DX>
RK_INLINE void value_fwd_rows(const LossArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t W = lanes<VF>();
  float bx[kVecChunk], by[kVecChunk], bz[kVecChunk];
  const VF zero = vbroadcast<VF>(0.0f);
  for (int64_t b = begin; b < end; ++b) {
    double c = 0, s = 0, cn = 0;
    for (int64_t t0 = 0; t0 < a.T; t0 += kVecChunk) {
      const int64_t n = std::min(kVecChunk, a.T - t0), off = b * a.T + t0;
      const float *v = a.x.chunk(off, n, bx), *old = a.y.chunk(off, n, by), *ret = a.z.chunk(off, n, bz);
      const uint8_t* m = a.mask + off;
      float* dx = DX ? a.d0->at(off, nullptr) : nullptr;
      VF vc = zero, vs = zero, vcn = zero;
      int64_t i = 0;
      for (; i + W <= n; i += W) {
        const VF mv = vload_mask<VF>(m + i);
        const auto valid = mv > zero;
        const ValueV<VF> tok = value_v(vload<VF>(v + i), vload<VF>(old + i), vload<VF>(ret + i), a);
        vc += mv;
        vs += valid ? tok.vf : zero;
        vcn += valid ? tok.clipped : zero;
        if (DX) vstore(dx + i, valid ? tok.dv : zero);
      }
      c += hsum(vc); s += hsum(vs); cn += hsum(vcn);
      for (; i < n; ++i) {
        if (!m[i]) {
          if (DX) dx[i] = 0.0f;
          continue;
        }
        const ValueToken tok = ppo_value_token(v[i], old[i], ret[i], a.flag, a.p0);
        c += 1; s += tok.vf; cn += tok.clipped;
        if (DX) dx[i] = tok.d_v;
      }
    }
    a.s0[b] = c; a.s1[b] = s; a.s2[b] = cn;
  }
}

template <typename VF>
RK_INLINE void value_fwd_range(const LossArgs& a, int64_t begin, int64_t end) {
  if (a.d0) value_fwd_rows<VF, true>(a, begin, end); else value_fwd_rows<VF, false>(a, begin, end);
}

template <typename VF>
RK_INLINE void value_bwd_range(const LossArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t W = lanes<VF>();
  float bx[kVecChunk], by[kVecChunk], bz[kVecChunk], o0[kVecChunk], o1[kVecChunk], o2[kVecChunk];
  const VF zero = vbroadcast<VF>(0.0f);
  for (int64_t b = begin; b < end; ++b) {
    const float g = a.g * a.w[b];
    for (int64_t t0 = 0; t0 < a.T; t0 += kVecChunk) {
      const int64_t n = std::min(kVecChunk, a.T - t0), off = b * a.T + t0;
      const float *v = a.x.chunk(off, n, bx), *old = a.y.chunk(off, n, by), *ret = a.z.chunk(off, n, bz);
      const uint8_t* m = a.mask + off;
      float *d0 = a.d0->at(off, o0), *d1 = a.d1->at(off, o1), *d2 = a.d2->at(off, o2);
      int64_t i = 0;
      for (; i + W <= n; i += W) {
        const auto valid = vload_mask<VF>(m + i) > zero;
        const ValueV<VF> tok = value_v(vload<VF>(v + i), vload<VF>(old + i), vload<VF>(ret + i), a);
        vstore(d0 + i, valid ? g * tok.dv : zero);
        vstore(d1 + i, valid ? g * tok.dold : zero);
        vstore(d2 + i, valid ? g * tok.dret : zero);
      }
      for (; i < n; ++i) {
        if (!m[i]) {
          d0[i] = d1[i] = d2[i] = 0.0f;
          continue;
        }
        const ValueToken tok = ppo_value_token(v[i], old[i], ret[i], a.flag, a.p0);
        d0[i] = g * tok.d_v;
        d1[i] = g * tok.d_old;
        d2[i] = g * tok.d_ret;
      }
      a.d0->flush(off, n, o0); a.d1->flush(off, n, o1); a.d2->flush(off, n, o2);
    }
  }
}

RK_ISA_DISPATCH(policy_fwd, LossArgs)
RK_ISA_DISPATCH(policy_bwd, LossArgs)
RK_ISA_DISPATCH(value_fwd, LossArgs)
RK_ISA_DISPATCH(value_bwd, LossArgs)

// The checks of every PPO op: x, y, z floating CPU [B, T] of one shape, mask of that shape.
void check_loss_inputs(const char* op, const Tensor& x, const char* xn, const Tensor& y, const char* yn,
                       const Tensor& z, const char* zn, const Tensor& mask) {
  check_float_cpu(x, op, xn);
  TORCH_CHECK(x.dim() == 2, "rlhf_kernels::", op, ": ", xn, " must be 2-D [B, T], got shape ", x.sizes());
  check_float_like(y, x, op, yn, xn);
  check_float_like(z, x, op, zn, xn);
  check_mask(mask, x, op, xn);
}

void check_agg(int64_t agg, const char* op) {
  TORCH_CHECK(agg >= 0 && agg <= kSeqMeanTokenSum, "rlhf_kernels::", op, ": agg must be in [0, ",
              int(kSeqMeanTokenSum), "], got ", agg);
}

// The backward's extra inputs: a scalar grad_loss and row_weight [B].
float check_bwd_extras(const char* op, const Tensor& grad_loss, const Tensor& row_weight, int64_t B) {
  check_float_cpu(grad_loss, op, "grad_loss");
  TORCH_CHECK(grad_loss.numel() == 1, "rlhf_kernels::", op, ": grad_loss must have one element, got shape ",
              grad_loss.sizes());
  check_float_cpu(row_weight, op, "row_weight");
  TORCH_CHECK(row_weight.dim() == 1 && row_weight.size(0) == B, "rlhf_kernels::", op,
              ": row_weight must be [B] with B = ", B, ", got shape ", row_weight.sizes());
  return grad_loss.item<float>();
}

Tensor empty_like_dtype(const Tensor& t) {
  return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

namespace {

// The policy forward; with dx (the training forward) also each token's d pg / d logprobs.
Tensor3 policy_forward(const char* op, const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                       const Tensor& mask, double clip_low, double clip_high, std::optional<double> dual_clip,
                       int64_t agg, Tensor* dx) {
  check_loss_inputs(op, logprobs, "logprobs", old_logprobs, "old_logprobs", advantages, "advantages", mask);
  check_agg(agg, op);
  const Tensor lp = contig(logprobs), old = contig(old_logprobs), adv = contig(advantages), m = mask_bytes(mask);
  const int64_t B = lp.size(0), T = lp.size(1);
  const auto opts = lp.options().dtype(at::kFloat);
  // per row: valid tokens, sum pg, clipped, lower, sum(old - lp)
  std::vector<double> cnt(B), pg_sum(B), clip_n(B), lower_n(B), kl_sum(B);
  LossArgs a{SrcF(lp), SrcF(old), SrcF(adv), reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()), T,
                   static_cast<float>(clip_low), static_cast<float>(clip_high),
                   dual_clip ? static_cast<float>(*dual_clip) : 0.0f, dual_clip.has_value(),
                   cnt.data(), pg_sum.data(), clip_n.data(), lower_n.data(), kl_sum.data(),
                   0.0f, nullptr, nullptr, nullptr, nullptr};
  std::optional<DstF> od;
  if (dx) {
    *dx = at::empty({B, T}, opts);
    od.emplace(*dx);
    a.d0 = &*od;
  }
  parallel_blocks(B, row_grain(T), [&](int64_t begin, int64_t end) { policy_fwd(a, begin, end); });
  Tensor w = row_weights(cnt, agg, opts);
  const float* pw = w.data_ptr<float>();
  double loss = 0, total = 0, cn = 0, ln = 0, k = 0;
  for (int64_t b = 0; b < B; ++b) {
    loss += pg_sum[b] * pw[b];
    total += cnt[b]; cn += clip_n[b]; ln += lower_n[b]; k += kl_sum[b];
  }
  const double denom = std::max(total, 1.0);
  Tensor stats = at::empty({3}, opts);
  float* ps = stats.data_ptr<float>();
  ps[0] = static_cast<float>(cn / denom);
  ps[1] = static_cast<float>(ln / denom);
  ps[2] = static_cast<float>(k / denom);
  return {at::scalar_tensor(loss, opts), stats, w};
}

}  // namespace

Tensor3 ppo_policy_loss_fwd(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                            const Tensor& mask, double clip_low, double clip_high, std::optional<double> dual_clip,
                            int64_t agg) {
  return policy_forward("ppo_policy_loss_fwd", logprobs, old_logprobs, advantages, mask, clip_low, clip_high,
                        dual_clip, agg, nullptr);
}

// The forward for training on CPU: also d pg / d logprobs per token (fp32, 0 where masked, before
// the row weights), so the backward is grad * row_weight * dx instead of a pass that recomputes the
// ratio's exp from three inputs and the mask.
Tensor4 ppo_policy_loss_fwd_dx(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                               const Tensor& mask, double clip_low, double clip_high,
                               std::optional<double> dual_clip, int64_t agg) {
  Tensor dx;
  auto [loss, stats, w] = policy_forward("ppo_policy_loss_fwd_dx", logprobs, old_logprobs, advantages, mask,
                                         clip_low, clip_high, dual_clip, agg, &dx);
  return {loss, stats, w, dx};
}

Tensor3 ppo_policy_loss_bwd(const Tensor& grad_loss, const Tensor& logprobs, const Tensor& old_logprobs,
                            const Tensor& advantages, const Tensor& mask, const Tensor& row_weight,
                            double clip_low, double clip_high, std::optional<double> dual_clip) {
  const char* op = "ppo_policy_loss_bwd";
  check_loss_inputs(op, logprobs, "logprobs", old_logprobs, "old_logprobs", advantages, "advantages", mask);
  const Tensor lp = contig(logprobs), old = contig(old_logprobs), adv = contig(advantages), m = mask_bytes(mask);
  const int64_t B = lp.size(0), T = lp.size(1);
  const float gl = check_bwd_extras(op, grad_loss, row_weight, B);
  const Tensor w = row_weight.to(at::kFloat).contiguous();
  Tensor dlp = empty_like_dtype(logprobs), dold = empty_like_dtype(old_logprobs), dadv = empty_like_dtype(advantages);
  DstF o0(dlp), o1(dold), o2(dadv);
  const LossArgs a{SrcF(lp), SrcF(old), SrcF(adv), reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()), T,
                   static_cast<float>(clip_low), static_cast<float>(clip_high),
                   dual_clip ? static_cast<float>(*dual_clip) : 0.0f, dual_clip.has_value(),
                   nullptr, nullptr, nullptr, nullptr, nullptr, gl, w.data_ptr<float>(), &o0, &o1, &o2};
  parallel_blocks(B, row_grain(T), [&](int64_t begin, int64_t end) { policy_bwd(a, begin, end); });
  return {dlp, dold, dadv};
}

namespace {

// The value forward; with dx (the training forward) also each token's d vf / d values.
Tensor3 value_forward(const char* op, const Tensor& values, const Tensor& old_values, const Tensor& returns,
                      const Tensor& mask, std::optional<double> clip, int64_t agg, Tensor* dx) {
  check_loss_inputs(op, values, "values", old_values, "old_values", returns, "returns", mask);
  check_agg(agg, op);
  const Tensor v = contig(values), old = contig(old_values), ret = contig(returns), m = mask_bytes(mask);
  const int64_t B = v.size(0), T = v.size(1);
  const auto opts = v.options().dtype(at::kFloat);
  std::vector<double> cnt(B), vf_sum(B), clip_n(B);
  LossArgs a{SrcF(v), SrcF(old), SrcF(ret), reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()), T,
             clip ? static_cast<float>(*clip) : 0.0f, 0.0f, 0.0f, clip.has_value(),
             cnt.data(), vf_sum.data(), clip_n.data(), nullptr, nullptr, 0.0f, nullptr, nullptr, nullptr, nullptr};
  std::optional<DstF> od;
  if (dx) {
    *dx = at::empty({B, T}, opts);
    od.emplace(*dx);
    a.d0 = &*od;
  }
  parallel_blocks(B, row_grain(T), [&](int64_t begin, int64_t end) { value_fwd(a, begin, end); });
  Tensor w = row_weights(cnt, agg, opts);
  const float* pw = w.data_ptr<float>();
  double loss = 0, total = 0, cn = 0;
  for (int64_t b = 0; b < B; ++b) {
    loss += vf_sum[b] * pw[b];
    total += cnt[b];
    cn += clip_n[b];
  }
  return {at::scalar_tensor(0.5 * loss, opts), at::scalar_tensor(cn / std::max(total, 1.0), opts), w};
}

}  // namespace

Tensor3 ppo_value_loss_fwd(const Tensor& values, const Tensor& old_values, const Tensor& returns,
                           const Tensor& mask, std::optional<double> clip, int64_t agg) {
  return value_forward("ppo_value_loss_fwd", values, old_values, returns, mask, clip, agg, nullptr);
}

// The forward for training on CPU: also d vf / d values per token (fp32, 0 where masked, before the
// row weights and the 1/2), so the backward is 0.5 * grad * row_weight * dx.
Tensor4 ppo_value_loss_fwd_dx(const Tensor& values, const Tensor& old_values, const Tensor& returns,
                              const Tensor& mask, std::optional<double> clip, int64_t agg) {
  Tensor dx;
  auto [loss, clipfrac, w] = value_forward("ppo_value_loss_fwd_dx", values, old_values, returns, mask, clip, agg, &dx);
  return {loss, clipfrac, w, dx};
}

Tensor3 ppo_value_loss_bwd(const Tensor& grad_loss, const Tensor& values, const Tensor& old_values,
                           const Tensor& returns, const Tensor& mask, const Tensor& row_weight,
                           std::optional<double> clip) {
  const char* op = "ppo_value_loss_bwd";
  check_loss_inputs(op, values, "values", old_values, "old_values", returns, "returns", mask);
  const Tensor v = contig(values), old = contig(old_values), ret = contig(returns), m = mask_bytes(mask);
  const int64_t B = v.size(0), T = v.size(1);
  const float gl = 0.5f * check_bwd_extras(op, grad_loss, row_weight, B);
  const Tensor w = row_weight.to(at::kFloat).contiguous();
  Tensor dv = empty_like_dtype(values), dold = empty_like_dtype(old_values), dret = empty_like_dtype(returns);
  DstF o0(dv), o1(dold), o2(dret);
  const LossArgs a{SrcF(v), SrcF(old), SrcF(ret), reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()), T,
                   clip ? static_cast<float>(*clip) : 0.0f, 0.0f, 0.0f, clip.has_value(),
                   nullptr, nullptr, nullptr, nullptr, nullptr, gl, w.data_ptr<float>(), &o0, &o1, &o2};
  parallel_blocks(B, row_grain(T), [&](int64_t begin, int64_t end) { value_bwd(a, begin, end); });
  return {dv, dold, dret};
}

}  // namespace cpu
}  // namespace rlhf_kernels

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def("ppo_policy_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
        "float clip_low, float clip_high, float? dual_clip, int agg) -> (Tensor, Tensor, Tensor)");
  m.def("ppo_policy_loss_bwd(Tensor grad_loss, Tensor logprobs, Tensor old_logprobs, Tensor advantages, "
        "Tensor mask, Tensor row_weight, float clip_low, float clip_high, float? dual_clip) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("ppo_value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float? clip, "
        "int agg) -> (Tensor, Tensor, Tensor)");
  m.def("ppo_value_loss_bwd(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, "
        "Tensor mask, Tensor row_weight, float? clip) -> (Tensor, Tensor, Tensor)");
  // CPU only: the training forwards of the cpu backend (see _extension_ops/ppo.py).
  m.def("ppo_policy_loss_fwd_dx(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
        "float clip_low, float clip_high, float? dual_clip, int agg) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ppo_value_loss_fwd_dx(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float? clip, "
        "int agg) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &rlhf_kernels::cpu::ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &rlhf_kernels::cpu::ppo_policy_loss_bwd);
  m.impl("ppo_value_loss_fwd", &rlhf_kernels::cpu::ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &rlhf_kernels::cpu::ppo_value_loss_bwd);
  m.impl("ppo_policy_loss_fwd_dx", &rlhf_kernels::cpu::ppo_policy_loss_fwd_dx);
  m.impl("ppo_value_loss_fwd_dx", &rlhf_kernels::cpu::ppo_value_loss_fwd_dx);
}
