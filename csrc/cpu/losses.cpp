// C++ CPU kernels for kl_penalty, gae, ppo_policy_loss, ppo_value_loss and dpo_loss.  The math per
// token is shared with the CUDA kernels (rlhf_kernels/math.h); here inputs are read as fp32
// contiguous arrays, rows (sequences) run in parallel with at::parallel_for, and sums accumulate in
// double per row and combine in row order (deterministic).  Masked entries are never read.
#include "../ops/ops.h"
#include "rlhf_kernels/math.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <vector>

namespace rlhf_kernels {
namespace cpu {
namespace {

constexpr int64_t kElemGrain = 32768;

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }
Tensor as_bool(const Tensor& m) { return (m.scalar_type() == at::kBool ? m : m.ne(0)).contiguous(); }

void check_2d(const Tensor& t, const char* op) {
  TORCH_CHECK(t.dim() == 2, "rlhf_kernels::", op, ": expected a 2-D [B, T] tensor, got ", t.sizes());
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// kl_penalty

Tensor kl_penalty_fwd(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  const Tensor a = f32(logprobs), b = f32(ref_logprobs);
  Tensor out = at::empty(a.sizes(), a.options());
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int est = static_cast<int>(estimator);
  at::parallel_for(0, a.numel(), kElemGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) po[i] = kl_value(pa[i] - pb[i], est);
  });
  return out;
}

Tensor2 kl_penalty_bwd(const Tensor& grad, const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  const Tensor a = f32(logprobs), b = f32(ref_logprobs), g = f32(grad);
  Tensor ga = at::empty(a.sizes(), a.options());
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>(), *pg = g.data_ptr<float>();
  float* pga = ga.data_ptr<float>();
  const int est = static_cast<int>(estimator);
  at::parallel_for(0, a.numel(), kElemGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) pga[i] = pg[i] * kl_grad(pa[i] - pb[i], est);
  });
  return {ga.to(logprobs.scalar_type()), ga.neg().to(ref_logprobs.scalar_type())};
}

// ------------------------------------------------------------------------------------------------
// gae: one reverse scan per row; masked steps carry A_next and V_next over unchanged.

Tensor2 gae_fwd(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma, double lam) {
  check_2d(rewards, "gae");
  const Tensor r = f32(rewards), v = f32(values), m = as_bool(mask);
  const int64_t B = r.size(0), T = r.size(1);
  Tensor adv = at::empty({B, T}, r.options()), ret = at::empty({B, T}, r.options());
  const float *pr = r.data_ptr<float>(), *pv = v.data_ptr<float>();
  const bool* pm = m.data_ptr<bool>();
  float *pa = adv.data_ptr<float>(), *pR = ret.data_ptr<float>();
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float a_next = 0.0f, v_next = 0.0f;
      const int64_t o = b * T;
      for (int64_t t = T - 1; t >= 0; --t) {
        if (!pm[o + t]) {
          pa[o + t] = 0.0f;
          pR[o + t] = 0.0f;
          continue;
        }
        const float vt = pv[o + t];
        const float a = pr[o + t] + g * v_next - vt + gl * a_next;
        pa[o + t] = a;
        pR[o + t] = a + vt;
        a_next = a;
        v_next = vt;
      }
    }
  });
  return {adv, ret};
}

// Adjoint of the scan, run forward in time over the valid steps t_1 < t_2 < ...:
//   G_i = gA_i + gR_i + gamma lam G_{i-1}        (total gradient reaching A at t_i)
//   d r_i = G_i,   d v_i = -G_i + gR_i + gamma G_{i-1}   (v_i is V_next of step t_{i-1})
Tensor2 gae_bwd(const Tensor& grad_advantages, const Tensor& grad_returns, const Tensor& mask, double gamma,
                double lam) {
  check_2d(mask, "gae");
  const Tensor gA = f32(grad_advantages), gR = f32(grad_returns), m = as_bool(mask);
  const int64_t B = m.size(0), T = m.size(1);
  Tensor dr = at::empty({B, T}, gA.options()), dv = at::empty({B, T}, gA.options());
  const float *pgA = gA.data_ptr<float>(), *pgR = gR.data_ptr<float>();
  const bool* pm = m.data_ptr<bool>();
  float *pdr = dr.data_ptr<float>(), *pdv = dv.data_ptr<float>();
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float carry = 0.0f;
      const int64_t o = b * T;
      for (int64_t t = 0; t < T; ++t) {
        if (!pm[o + t]) {
          pdr[o + t] = 0.0f;
          pdv[o + t] = 0.0f;
          continue;
        }
        const float G = pgA[o + t] + pgR[o + t] + gl * carry;
        pdr[o + t] = G;
        pdv[o + t] = -G + pgR[o + t] + g * carry;
        carry = G;
      }
    }
  });
  return {dr, dv};
}

// ------------------------------------------------------------------------------------------------
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

Tensor3 ppo_policy_loss_fwd(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                            const Tensor& mask, double clip_low, double clip_high, std::optional<double> dual_clip,
                            int64_t agg) {
  check_2d(logprobs, "ppo_policy_loss");
  const Tensor lp = f32(logprobs), old = f32(old_logprobs), adv = f32(advantages), m = as_bool(mask);
  const int64_t B = lp.size(0), T = lp.size(1);
  const float *plp = lp.data_ptr<float>(), *pold = old.data_ptr<float>(), *padv = adv.data_ptr<float>();
  const bool* pm = m.data_ptr<bool>();
  const float cl = static_cast<float>(clip_low), ch = static_cast<float>(clip_high);
  const bool has_dual = dual_clip.has_value();
  const float dc = has_dual ? static_cast<float>(*dual_clip) : 0.0f;
  // per row: valid tokens, sum pg, clipped, lower, sum(old - lp)
  std::vector<double> cnt(B), pg_sum(B), clip_n(B), lower_n(B), kl_sum(B);
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double c = 0, s = 0, cn = 0, ln = 0, k = 0;
      for (int64_t t = b * T; t < (b + 1) * T; ++t) {
        if (!pm[t]) continue;
        const PolicyToken tok = ppo_policy_token(plp[t], pold[t], padv[t], cl, ch, has_dual, dc);
        c += 1;
        s += tok.pg;
        cn += tok.clipped;
        ln += tok.lower;
        k += static_cast<double>(pold[t] - plp[t]);
      }
      cnt[b] = c; pg_sum[b] = s; clip_n[b] = cn; lower_n[b] = ln; kl_sum[b] = k;
    }
  });
  Tensor w = row_weights(cnt, agg, lp.options());
  const float* pw = w.data_ptr<float>();
  double loss = 0, total = 0, cn = 0, ln = 0, k = 0;
  for (int64_t b = 0; b < B; ++b) {
    loss += pg_sum[b] * pw[b];
    total += cnt[b]; cn += clip_n[b]; ln += lower_n[b]; k += kl_sum[b];
  }
  const double denom = std::max(total, 1.0);
  Tensor stats = at::empty({3}, lp.options());
  float* ps = stats.data_ptr<float>();
  ps[0] = static_cast<float>(cn / denom);
  ps[1] = static_cast<float>(ln / denom);
  ps[2] = static_cast<float>(k / denom);
  return {at::scalar_tensor(loss, lp.options()), stats, w};
}

Tensor3 ppo_policy_loss_bwd(const Tensor& grad_loss, const Tensor& logprobs, const Tensor& old_logprobs,
                            const Tensor& advantages, const Tensor& mask, const Tensor& row_weight,
                            double clip_low, double clip_high, std::optional<double> dual_clip) {
  check_2d(logprobs, "ppo_policy_loss");
  const Tensor lp = f32(logprobs), old = f32(old_logprobs), adv = f32(advantages), m = as_bool(mask);
  const Tensor w = f32(row_weight);
  const int64_t B = lp.size(0), T = lp.size(1);
  const float gl = grad_loss.item<float>();
  Tensor dlp = at::empty({B, T}, lp.options()), dold = at::empty({B, T}, lp.options()),
         dadv = at::empty({B, T}, lp.options());
  const float *plp = lp.data_ptr<float>(), *pold = old.data_ptr<float>(), *padv = adv.data_ptr<float>(),
              *pw = w.data_ptr<float>();
  const bool* pm = m.data_ptr<bool>();
  float *pdlp = dlp.data_ptr<float>(), *pdold = dold.data_ptr<float>(), *pdadv = dadv.data_ptr<float>();
  const float cl = static_cast<float>(clip_low), ch = static_cast<float>(clip_high);
  const bool has_dual = dual_clip.has_value();
  const float dc = has_dual ? static_cast<float>(*dual_clip) : 0.0f;
  at::parallel_for(0, B * T, kElemGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (!pm[t]) {
        pdlp[t] = pdold[t] = pdadv[t] = 0.0f;
        continue;
      }
      const PolicyToken tok = ppo_policy_token(plp[t], pold[t], padv[t], cl, ch, has_dual, dc);
      const float g = gl * pw[t / T];
      pdlp[t] = g * tok.d_logratio;
      pdold[t] = -g * tok.d_logratio;
      pdadv[t] = g * tok.d_adv;
    }
  });
  return {dlp.to(logprobs.scalar_type()), dold.to(old_logprobs.scalar_type()), dadv.to(advantages.scalar_type())};
}

Tensor3 ppo_value_loss_fwd(const Tensor& values, const Tensor& old_values, const Tensor& returns,
                           const Tensor& mask, std::optional<double> clip, int64_t agg) {
  check_2d(values, "ppo_value_loss");
  const Tensor v = f32(values), old = f32(old_values), ret = f32(returns), m = as_bool(mask);
  const int64_t B = v.size(0), T = v.size(1);
  const float *pv = v.data_ptr<float>(), *pold = old.data_ptr<float>(), *pret = ret.data_ptr<float>();
  const bool* pm = m.data_ptr<bool>();
  const bool has_clip = clip.has_value();
  const float c = has_clip ? static_cast<float>(*clip) : 0.0f;
  std::vector<double> cnt(B), vf_sum(B), clip_n(B);
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double n = 0, s = 0, cn = 0;
      for (int64_t t = b * T; t < (b + 1) * T; ++t) {
        if (!pm[t]) continue;
        const ValueToken tok = ppo_value_token(pv[t], pold[t], pret[t], has_clip, c);
        n += 1;
        s += tok.vf;
        cn += tok.clipped;
      }
      cnt[b] = n; vf_sum[b] = s; clip_n[b] = cn;
    }
  });
  Tensor w = row_weights(cnt, agg, v.options());
  const float* pw = w.data_ptr<float>();
  double loss = 0, total = 0, cn = 0;
  for (int64_t b = 0; b < B; ++b) {
    loss += vf_sum[b] * pw[b];
    total += cnt[b];
    cn += clip_n[b];
  }
  return {at::scalar_tensor(0.5 * loss, v.options()), at::scalar_tensor(cn / std::max(total, 1.0), v.options()), w};
}

Tensor3 ppo_value_loss_bwd(const Tensor& grad_loss, const Tensor& values, const Tensor& old_values,
                           const Tensor& returns, const Tensor& mask, const Tensor& row_weight,
                           std::optional<double> clip) {
  check_2d(values, "ppo_value_loss");
  const Tensor v = f32(values), old = f32(old_values), ret = f32(returns), m = as_bool(mask);
  const Tensor w = f32(row_weight);
  const int64_t B = v.size(0), T = v.size(1);
  const float gl = 0.5f * grad_loss.item<float>();
  Tensor dv = at::empty({B, T}, v.options()), dold = at::empty({B, T}, v.options()),
         dret = at::empty({B, T}, v.options());
  const float *pv = v.data_ptr<float>(), *pold = old.data_ptr<float>(), *pret = ret.data_ptr<float>(),
              *pw = w.data_ptr<float>();
  const bool* pm = m.data_ptr<bool>();
  float *pdv = dv.data_ptr<float>(), *pdold = dold.data_ptr<float>(), *pdret = dret.data_ptr<float>();
  const bool has_clip = clip.has_value();
  const float c = has_clip ? static_cast<float>(*clip) : 0.0f;
  at::parallel_for(0, B * T, kElemGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (!pm[t]) {
        pdv[t] = pdold[t] = pdret[t] = 0.0f;
        continue;
      }
      const ValueToken tok = ppo_value_token(pv[t], pold[t], pret[t], has_clip, c);
      const float g = gl * pw[t / T];
      pdv[t] = g * tok.d_v;
      pdold[t] = g * tok.d_old;
      pdret[t] = g * tok.d_ret;
    }
  });
  return {dv.to(values.scalar_type()), dold.to(old_values.scalar_type()), dret.to(returns.scalar_type())};
}

// ------------------------------------------------------------------------------------------------
// dpo_loss: elementwise over pairs.

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
