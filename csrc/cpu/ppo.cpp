// ppo_policy_loss and ppo_value_loss on CPU.  The math per token is shared with the CUDA kernels
// (rlhf_kernels/math.h); rows (sequences) run in parallel, sums accumulate in double per row and
// combine in row order (deterministic).  Masked entries are never read.  Also the family's schemas.
#include "common.h"
#include "rlhf_kernels/math.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

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
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
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
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &rlhf_kernels::cpu::ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &rlhf_kernels::cpu::ppo_policy_loss_bwd);
  m.impl("ppo_value_loss_fwd", &rlhf_kernels::cpu::ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &rlhf_kernels::cpu::ppo_value_loss_bwd);
}
