// Math shared by the C++ CPU kernels (g++) and the CUDA kernels (nvcc): pure inline functions on
// fp32 scalars, no PyTorch or CUDA runtime headers.  Each formula is the one of the reference
// backend (rlhf_kernels/reference/, documented in docs/architecture.md); the gradient helpers follow PyTorch's autograd conventions where the reference has a kink:
// clamp passes the gradient on the closed interval [lo, hi], and maximum/minimum split it in half
// on a tie (ratio inside the clip range makes the two PPO branches exactly equal).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define RK_HD __host__ __device__ __forceinline__
#else
#define RK_HD inline
#endif

namespace rlhf_kernels {

// ------------------------------------------------------------------------------------------------
// KL estimators (Schulman 2020); d = logprobs - ref_logprobs.
// The order of every enum here is the order of its names in rlhf_kernels/_registry.py (Python passes
// the index); the k*Names tables are exposed by the op rlhf_kernels::enum_names and a test compares
// them with the Python tuples.
enum KlEstimator : int { kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3 };
inline constexpr const char* kKlEstimatorNames[] = {"k1", "k2", "k3", "abs"};
static_assert(sizeof(kKlEstimatorNames) / sizeof(kKlEstimatorNames[0]) == kAbs + 1, "one name per KlEstimator");

RK_HD float kl_value(float d, int est) {
  switch (est) {
    case kK1: return d;
    case kK2: return 0.5f * d * d;
    case kK3: return expf(-d) - 1.0f + d;
    default: return fabsf(d);
  }
}

// d kl / d d  (d logprobs = +, d ref = -).  |d|' = sign(d), 0 at 0 as torch.abs.
RK_HD float kl_grad(float d, int est) {
  switch (est) {
    case kK1: return 1.0f;
    case kK2: return d;
    case kK3: return 1.0f - expf(-d);
    default: return d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f);
  }
}

// ------------------------------------------------------------------------------------------------
// GAE over one row of T steps (the CPU kernel runs it per row in a loop, the CUDA kernel one row per
// thread).  Masked steps are skipped: A_next and V_next carry over unchanged, outputs are 0 there.
//   delta_t = r_t + gamma V_next - V_t,   A_t = delta_t + gamma lam A_next,   R_t = A_t + V_t
RK_HD void gae_row_forward(const float* r, const float* v, const bool* m, int64_t T, float gamma,
                           float gamma_lam, float* adv, float* ret) {
  float a_next = 0.0f, v_next = 0.0f;
  for (int64_t t = T - 1; t >= 0; --t) {
    if (!m[t]) {
      adv[t] = 0.0f;
      ret[t] = 0.0f;
      continue;
    }
    const float vt = v[t];
    const float at = r[t] + gamma * v_next - vt + gamma_lam * a_next;
    adv[t] = at;
    ret[t] = at + vt;
    a_next = at;
    v_next = vt;
  }
}

// Adjoint of the scan, run forward in time over the valid steps t_1 < t_2 < ...:
//   G_i = gA_i + gR_i + gamma lam G_{i-1}        (total gradient reaching A at t_i)
//   d r_i = G_i,   d v_i = -G_i + gR_i + gamma G_{i-1}   (v_i is V_next of step t_{i-1})
RK_HD void gae_row_backward(const float* g_adv, const float* g_ret, const bool* m, int64_t T, float gamma,
                            float gamma_lam, float* d_rewards, float* d_values) {
  float carry = 0.0f;
  for (int64_t t = 0; t < T; ++t) {
    if (!m[t]) {
      d_rewards[t] = 0.0f;
      d_values[t] = 0.0f;
      continue;
    }
    const float G = g_adv[t] + g_ret[t] + gamma_lam * carry;
    d_rewards[t] = G;
    d_values[t] = -G + g_ret[t] + gamma * carry;
    carry = G;
  }
}

// ------------------------------------------------------------------------------------------------
// Aggregation modes and per-token weights for a masked [B, T] loss.
enum Agg : int { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2 };
inline constexpr const char* kAggNames[] = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum"};
static_assert(sizeof(kAggNames) / sizeof(kAggNames[0]) == kSeqMeanTokenSum + 1, "one name per Agg");

// Weight of each valid token of a row in the aggregated loss.
RK_HD float agg_row_weight(int agg, float row_tokens, float total_tokens, float rows_with_tokens,
                           float n_rows) {
  if (agg == kTokenMean) return 1.0f / fmaxf(total_tokens, 1.0f);
  if (agg == kSeqMeanTokenMean) return 1.0f / (fmaxf(row_tokens, 1.0f) * fmaxf(rows_with_tokens, 1.0f));
  return 1.0f / fmaxf(n_rows, 1.0f);
}

// ------------------------------------------------------------------------------------------------
// PPO clipped policy loss of one valid token, with the gradient of pg w.r.t. the log-ratio input
// (d pg / d logprobs; d / d old_logprobs is its negative) and w.r.t. the advantage.
struct PolicyToken {
  float pg;
  float d_logratio;  // d pg / d (logprobs - old_logprobs)
  float d_adv;       // d pg / d advantage
  bool clipped;      // the clipped branch is the larger
  bool lower;        // the dual-clip bound is active
};

RK_HD PolicyToken ppo_policy_token(float lp, float old, float adv, float clip_low, float clip_high,
                                   bool has_dual, float dual_clip) {
  PolicyToken out;
  const float x = lp - old;
  const float lr = fminf(fmaxf(x, -20.0f), 20.0f);
  const float d_lr = (x >= -20.0f && x <= 20.0f) ? 1.0f : 0.0f;  // clamp passes [lo, hi]
  const float ratio = expf(lr);
  const float lo = 1.0f - clip_low, hi = 1.0f + clip_high;
  const float cr = fminf(fmaxf(ratio, lo), hi);
  const float d_cr = (ratio >= lo && ratio <= hi) ? 1.0f : 0.0f;
  const float pg1 = -adv * ratio, pg2 = -adv * cr;
  // d/d ratio and d/d adv of each branch
  const float g1r = -adv, g1a = -ratio;
  const float g2r = -adv * d_cr, g2a = -cr;
  float pg, gr, ga;
  if (pg1 > pg2) { pg = pg1; gr = g1r; ga = g1a; }
  else if (pg2 > pg1) { pg = pg2; gr = g2r; ga = g2a; }
  else { pg = pg1; gr = 0.5f * (g1r + g2r); ga = 0.5f * (g1a + g2a); }
  out.clipped = pg2 > pg1;
  out.lower = false;
  if (has_dual && adv < 0.0f) {
    const float pg3 = -adv * dual_clip;  // d/d adv = -dual_clip
    out.lower = pg > pg3;
    if (pg > pg3) { pg = pg3; gr = 0.0f; ga = -dual_clip; }
    else if (pg == pg3) { gr = 0.5f * gr; ga = 0.5f * (ga - dual_clip); }
  }
  out.pg = pg;
  out.d_logratio = gr * ratio * d_lr;
  out.d_adv = ga;
  return out;
}

// ------------------------------------------------------------------------------------------------
// Clipped value loss of one valid token: vf = max((v - R)^2, (v_clip - R)^2).
struct ValueToken {
  float vf;
  float d_v, d_old, d_ret;
  bool clipped;
};

RK_HD ValueToken ppo_value_token(float v, float old, float ret, bool has_clip, float clip) {
  ValueToken out;
  const float e1 = v - ret;
  const float l1 = e1 * e1;
  out.clipped = false;
  if (!has_clip) {
    out.vf = l1; out.d_v = 2.0f * e1; out.d_old = 0.0f; out.d_ret = -2.0f * e1;
    return out;
  }
  const float d = v - old;
  const float cd = fminf(fmaxf(d, -clip), clip);
  const float inside = (d >= -clip && d <= clip) ? 1.0f : 0.0f;
  const float vc = old + cd;
  const float e2 = vc - ret;
  const float l2 = e2 * e2;
  // branch 2: d/dv = 2 e2 inside, d/dold = 2 e2 (1 - inside), d/dret = -2 e2
  const float a_v = 2.0f * e1, a_r = -2.0f * e1;
  const float b_v = 2.0f * e2 * inside, b_o = 2.0f * e2 * (1.0f - inside), b_r = -2.0f * e2;
  out.clipped = l2 > l1;
  if (l1 > l2) { out.vf = l1; out.d_v = a_v; out.d_old = 0.0f; out.d_ret = a_r; }
  else if (l2 > l1) { out.vf = l2; out.d_v = b_v; out.d_old = b_o; out.d_ret = b_r; }
  else { out.vf = l1; out.d_v = 0.5f * (a_v + b_v); out.d_old = 0.5f * b_o; out.d_ret = 0.5f * (a_r + b_r); }
  return out;
}

// ------------------------------------------------------------------------------------------------
// DPO losses (Rafailov et al. 2023) and variants; h = (pc - rc) - (pr - rr).
enum DpoLoss : int { kSigmoid = 0, kIpo = 1, kHinge = 2, kRobust = 3 };
inline constexpr const char* kDpoLossNames[] = {"sigmoid", "ipo", "hinge", "robust"};
static_assert(sizeof(kDpoLossNames) / sizeof(kDpoLossNames[0]) == kRobust + 1, "one name per DpoLoss");

// log(sigmoid(x)) without overflow for |x| large.
RK_HD float log_sigmoid(float x) { return fminf(x, 0.0f) - log1pf(expf(-fabsf(x))); }
RK_HD float sigmoid(float x) {
  return x >= 0.0f ? 1.0f / (1.0f + expf(-x)) : expf(x) / (1.0f + expf(x));
}

struct DpoPair { float loss, d_h; };

RK_HD DpoPair dpo_pair(float h, float beta, int type, float ls) {
  DpoPair out;
  const float bh = beta * h;
  switch (type) {
    case kSigmoid:
      out.loss = -(1.0f - ls) * log_sigmoid(bh) - ls * log_sigmoid(-bh);
      out.d_h = beta * (-(1.0f - ls) * sigmoid(-bh) + ls * sigmoid(bh));
      break;
    case kIpo: {
      const float e = h - 1.0f / (2.0f * beta);
      out.loss = e * e; out.d_h = 2.0f * e;
      break;
    }
    case kHinge: {
      const float m = 1.0f - bh;
      out.loss = m > 0.0f ? m : 0.0f; out.d_h = m > 0.0f ? -beta : 0.0f;
      break;
    }
    default: {
      const float k = 1.0f / (1.0f - 2.0f * ls);
      out.loss = k * (-(1.0f - ls) * log_sigmoid(bh) + ls * log_sigmoid(-bh));
      out.d_h = k * beta * (-(1.0f - ls) * sigmoid(-bh) - ls * sigmoid(bh));
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Online log-sum-exp and entropy over a row, fp32.  State relative to the running max m:
//   s = sum exp(z - m),  u = sum exp(z - m) * (z - m);   lse = m + log s,  H = log s - u / s.
// Shifting by the max keeps every term small, so H never cancels two large numbers.
struct LseState { float m, s, u; };

RK_HD LseState lse_init() { LseState st; st.m = -INFINITY; st.s = 0.0f; st.u = 0.0f; return st; }

// Move the state to a new (larger) max m2.
RK_HD void lse_rescale(LseState& st, float m2) {
  if (st.s > 0.0f) {
    const float delta = st.m - m2;  // <= 0
    const float a = expf(delta);
    st.u = a * (st.u + st.s * delta);
    st.s = a * st.s;
  }
  st.m = m2;
}

RK_HD void lse_add(LseState& st, float z) {
  if (z > st.m) lse_rescale(st, z);
  if (st.m == -INFINITY) return;  // only -inf so far
  const float d = z - st.m;
  const float e = expf(d);
  st.s += e;
  st.u += e > 0.0f ? e * d : 0.0f;  // exp(-inf) * -inf would be NaN; no mass there
}

// Merge two states (parallel reductions).
RK_HD LseState lse_merge(LseState a, LseState b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;
  lse_rescale(a, m);
  lse_rescale(b, m);
  LseState out; out.m = m; out.s = a.s + b.s; out.u = a.u + b.u;
  return out;
}

RK_HD float lse_value(const LseState& st) { return st.m + logf(st.s); }
RK_HD float lse_entropy(const LseState& st) { return logf(st.s) - st.u / st.s; }

// d/dz of (g_lp * logprob + g_ent * entropy) at one vocab entry, before the / temperature and the
// + g_lp at the label.  p = exp(z - lse); the entropy term -p (log p + H) vanishes where p == 0.
RK_HD float token_logprobs_grad(float z, float lse, float entropy, float g_lp, float g_ent) {
  const float logp = z - lse;
  const float p = expf(logp);
  float g = -p * g_lp;
  if (p > 0.0f) g -= g_ent * p * (logp + entropy);
  return g;
}

}  // namespace rlhf_kernels
