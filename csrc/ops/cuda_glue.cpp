// CUDA glue: takes tensors and the current stream, calls the raw-pointer launchers of csrc/cuda.
// Compiled only in CUDA builds (RLHF_KERNELS_WITH_CUDA).  Small inputs are made fp32 contiguous
// here; logits keep their dtype and row stride.  Nothing here syncs with the host.
#include "ops.h"
#include "rlhf_kernels/cuda_launch.h"

#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

namespace rlhf_kernels {
namespace cuda {
namespace {

namespace L = rlhf_kernels::cuda_launch;

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }
Tensor as_bool(const Tensor& m) { return (m.scalar_type() == at::kBool ? m : m.ne(0)).contiguous(); }
void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
template <typename T>
const float* fp(const T& t) { return t.template data_ptr<float>(); }
float* fp(Tensor& t) { return t.data_ptr<float>(); }

void check(int err, const char* op) {
  TORCH_CHECK(err == 0, "rlhf_kernels::", op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return L::kF32;
    case at::kBFloat16: return L::kBF16;
    case at::kHalf: return L::kF16;
    default: TORCH_CHECK(false, "rlhf_kernels (cuda): logits must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

}  // namespace

Tensor3 token_logprobs_fwd(const Tensor& logits_in, const Tensor& labels_in, double temperature, int64_t ignore_index,
                           bool with_entropy) {
  TORCH_CHECK(logits_in.dim() == 2 && labels_in.dim() == 1, "rlhf_kernels::token_logprobs: logits [N, V], labels [N]");
  c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t n = logits.size(0), vocab = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  Tensor lp = at::empty({n}, opts), lse = at::empty({n}, opts), ent = at::empty({n}, opts);
  check(L::token_logprobs_fwd(logits.data_ptr(), dtype_code(logits), logits.stride(0), n, vocab,
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
  check(L::token_logprobs_bwd(logits.data_ptr(), dtype_code(logits), logits.stride(0), n, vocab,
                              labels.data_ptr<int64_t>(), fp(lse_c), fp(ent_c), fp(g_lp),
                              g_ent.defined() ? fp(g_ent) : nullptr, static_cast<float>(1.0 / temperature),
                              ignore_index, grad.data_ptr(), stream()),
        "token_logprobs_bwd");
  return grad;
}

Tensor kl_penalty_fwd(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  c10::cuda::CUDAGuard guard(logprobs.device());
  const Tensor a = f32(logprobs), b = f32(ref_logprobs);
  Tensor out = at::empty(a.sizes(), a.options());
  check(L::kl_penalty_fwd(fp(a), fp(b), a.numel(), static_cast<int>(estimator), fp(out), stream()), "kl_penalty_fwd");
  return out;
}

Tensor2 kl_penalty_bwd(const Tensor& grad, const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  c10::cuda::CUDAGuard guard(logprobs.device());
  const Tensor a = f32(logprobs), b = f32(ref_logprobs), g = f32(grad);
  Tensor ga = at::empty(a.sizes(), a.options()), gb = at::empty(a.sizes(), a.options());
  check(L::kl_penalty_bwd(fp(g), fp(a), fp(b), a.numel(), static_cast<int>(estimator), fp(ga), fp(gb), stream()),
        "kl_penalty_bwd");
  return {ga.to(logprobs.scalar_type()), gb.to(ref_logprobs.scalar_type())};
}

Tensor2 gae_fwd(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma, double lam) {
  c10::cuda::CUDAGuard guard(rewards.device());
  const Tensor r = f32(rewards), v = f32(values), m = as_bool(mask);
  const int64_t B = r.size(0), T = r.size(1);
  Tensor adv = at::empty({B, T}, r.options()), ret = at::empty({B, T}, r.options());
  check(L::gae_fwd(fp(r), fp(v), m.data_ptr<bool>(), B, T, static_cast<float>(gamma), static_cast<float>(gamma * lam),
                   fp(adv), fp(ret), stream()),
        "gae_fwd");
  return {adv, ret};
}

Tensor2 gae_bwd(const Tensor& grad_advantages, const Tensor& grad_returns, const Tensor& mask, double gamma,
                double lam) {
  c10::cuda::CUDAGuard guard(mask.device());
  const Tensor gA = f32(grad_advantages), gR = f32(grad_returns), m = as_bool(mask);
  const int64_t B = m.size(0), T = m.size(1);
  Tensor dr = at::empty({B, T}, gA.options()), dv = at::empty({B, T}, gA.options());
  check(L::gae_bwd(fp(gA), fp(gR), m.data_ptr<bool>(), B, T, static_cast<float>(gamma),
                   static_cast<float>(gamma * lam), fp(dr), fp(dv), stream()),
        "gae_bwd");
  return {dr, dv};
}

Tensor3 ppo_policy_loss_fwd(const Tensor& logprobs, const Tensor& old_logprobs, const Tensor& advantages,
                            const Tensor& mask, double clip_low, double clip_high, std::optional<double> dual_clip,
                            int64_t agg) {
  c10::cuda::CUDAGuard guard(logprobs.device());
  const Tensor lp = f32(logprobs), old = f32(old_logprobs), adv = f32(advantages), m = as_bool(mask);
  const int64_t B = lp.size(0), T = lp.size(1);
  Tensor ws = at::empty({B * 5}, lp.options()), loss = at::empty({}, lp.options()), stats = at::empty({3}, lp.options()),
         w = at::empty({B}, lp.options());
  check(L::ppo_policy_fwd(fp(lp), fp(old), fp(adv), m.data_ptr<bool>(), B, T, static_cast<float>(clip_low),
                          static_cast<float>(clip_high), dual_clip.has_value(),
                          static_cast<float>(dual_clip.value_or(0.0)), static_cast<int>(agg), fp(ws), fp(loss),
                          fp(stats), fp(w), stream()),
        "ppo_policy_loss_fwd");
  return {loss, stats, w};
}

Tensor3 ppo_policy_loss_bwd(const Tensor& grad_loss, const Tensor& logprobs, const Tensor& old_logprobs,
                            const Tensor& advantages, const Tensor& mask, const Tensor& row_weight, double clip_low,
                            double clip_high, std::optional<double> dual_clip) {
  c10::cuda::CUDAGuard guard(logprobs.device());
  const Tensor lp = f32(logprobs), old = f32(old_logprobs), adv = f32(advantages), m = as_bool(mask);
  const Tensor w = f32(row_weight), g = f32(grad_loss);
  const int64_t B = lp.size(0), T = lp.size(1);
  Tensor dlp = at::empty({B, T}, lp.options()), dold = at::empty({B, T}, lp.options()),
         dadv = at::empty({B, T}, lp.options());
  check(L::ppo_policy_bwd(fp(g), fp(lp), fp(old), fp(adv), m.data_ptr<bool>(), fp(w), B, T,
                          static_cast<float>(clip_low), static_cast<float>(clip_high), dual_clip.has_value(),
                          static_cast<float>(dual_clip.value_or(0.0)), fp(dlp), fp(dold), fp(dadv), stream()),
        "ppo_policy_loss_bwd");
  return {dlp.to(logprobs.scalar_type()), dold.to(old_logprobs.scalar_type()), dadv.to(advantages.scalar_type())};
}

Tensor3 ppo_value_loss_fwd(const Tensor& values, const Tensor& old_values, const Tensor& returns, const Tensor& mask,
                           std::optional<double> clip, int64_t agg) {
  c10::cuda::CUDAGuard guard(values.device());
  const Tensor v = f32(values), old = f32(old_values), ret = f32(returns), m = as_bool(mask);
  const int64_t B = v.size(0), T = v.size(1);
  Tensor ws = at::empty({B * 5}, v.options()), loss = at::empty({}, v.options()), cf = at::empty({}, v.options()),
         w = at::empty({B}, v.options());
  check(L::ppo_value_fwd(fp(v), fp(old), fp(ret), m.data_ptr<bool>(), B, T, clip.has_value(),
                         static_cast<float>(clip.value_or(0.0)), static_cast<int>(agg), fp(ws), fp(loss), fp(cf),
                         fp(w), stream()),
        "ppo_value_loss_fwd");
  return {loss, cf, w};
}

Tensor3 ppo_value_loss_bwd(const Tensor& grad_loss, const Tensor& values, const Tensor& old_values,
                           const Tensor& returns, const Tensor& mask, const Tensor& row_weight,
                           std::optional<double> clip) {
  c10::cuda::CUDAGuard guard(values.device());
  const Tensor v = f32(values), old = f32(old_values), ret = f32(returns), m = as_bool(mask);
  const Tensor w = f32(row_weight), g = f32(grad_loss);
  const int64_t B = v.size(0), T = v.size(1);
  Tensor dv = at::empty({B, T}, v.options()), dold = at::empty({B, T}, v.options()),
         dret = at::empty({B, T}, v.options());
  check(L::ppo_value_bwd(fp(g), fp(v), fp(old), fp(ret), m.data_ptr<bool>(), fp(w), B, T, clip.has_value(),
                         static_cast<float>(clip.value_or(0.0)), fp(dv), fp(dold), fp(dret), stream()),
        "ppo_value_loss_bwd");
  return {dv.to(values.scalar_type()), dold.to(old_values.scalar_type()), dret.to(returns.scalar_type())};
}

Tensor3 dpo_loss_fwd(const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr, double beta,
                     int64_t loss_type, double label_smoothing) {
  c10::cuda::CUDAGuard guard(pc.device());
  const Tensor a = f32(pc), b = f32(pr), c = f32(rc), d = f32(rr);
  const int64_t n = a.numel();
  Tensor losses = at::empty({n}, a.options()), cr = at::empty({n}, a.options()), rj = at::empty({n}, a.options());
  check(L::dpo_fwd(fp(a), fp(b), fp(c), fp(d), n, static_cast<float>(beta), static_cast<int>(loss_type),
                   static_cast<float>(label_smoothing), fp(losses), fp(cr), fp(rj), stream()),
        "dpo_loss_fwd");
  return {losses, cr, rj};
}

Tensor4 dpo_loss_bwd(const Tensor& grad_losses, const Tensor& pc, const Tensor& pr, const Tensor& rc, const Tensor& rr,
                     double beta, int64_t loss_type, double label_smoothing) {
  c10::cuda::CUDAGuard guard(pc.device());
  const Tensor a = f32(pc), b = f32(pr), c = f32(rc), d = f32(rr), g = f32(grad_losses);
  const int64_t n = a.numel();
  Tensor ga = at::empty({n}, a.options()), gb = at::empty({n}, a.options()), gc = at::empty({n}, a.options()),
         gd = at::empty({n}, a.options());
  check(L::dpo_bwd(fp(g), fp(a), fp(b), fp(c), fp(d), n, static_cast<float>(beta), static_cast<int>(loss_type),
                   static_cast<float>(label_smoothing), fp(ga), fp(gb), fp(gc), fp(gd), stream()),
        "dpo_loss_bwd");
  return {ga.to(pc.scalar_type()), gb.to(pr.scalar_type()), gc.to(rc.scalar_type()), gd.to(rr.scalar_type())};
}

}  // namespace cuda
}  // namespace rlhf_kernels
