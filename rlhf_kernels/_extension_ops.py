"""The compiled ops (``torch.ops.rlhf_kernels.*``) behind the ``cpu`` and ``cuda`` backends: fake
(meta) implementations and autograd registered with :mod:`torch.library`, and thin wrappers with the
reference backend's signatures.  Imported by the loader only after the library is loaded.

Each public op is a forward op and a backward op in C++; the backward recomputes what it needs from
the inputs and O(N) saved values (the per-row log-sum-exp and entropy of token_logprobs, the
per-row weights of the PPO aggregation) instead of saving large intermediates.
"""

from __future__ import annotations

import torch

_NS = "rlhf_kernels"
_ops = torch.ops.rlhf_kernels

KL_ESTIMATOR = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
AGG = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2}
DPO_LOSS = {"sigmoid": 0, "ipo": 1, "hinge": 2, "robust": 3}


def _f32(t: torch.Tensor, *shape) -> torch.Tensor:
    return t.new_empty(shape, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# fake implementations (shapes and dtypes only), for torch.compile / meta tensors


def _register_fakes():
    lib = torch.library

    @lib.register_fake(f"{_NS}::token_logprobs_fwd")
    def _(logits, labels, temperature, ignore_index, with_entropy):
        n = logits.shape[0]
        return _f32(logits, n), _f32(logits, n), _f32(logits, n)

    @lib.register_fake(f"{_NS}::token_logprobs_bwd")
    def _(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
        return logits.new_empty(logits.shape)

    @lib.register_fake(f"{_NS}::kl_penalty_fwd")
    def _(logprobs, ref_logprobs, estimator):
        return _f32(logprobs, *logprobs.shape)

    @lib.register_fake(f"{_NS}::kl_penalty_bwd")
    def _(grad, logprobs, ref_logprobs, estimator):
        return logprobs.new_empty(logprobs.shape), ref_logprobs.new_empty(ref_logprobs.shape)

    @lib.register_fake(f"{_NS}::gae_fwd")
    def _(rewards, values, mask, gamma, lam):
        return _f32(rewards, *rewards.shape), _f32(rewards, *rewards.shape)

    @lib.register_fake(f"{_NS}::gae_bwd")
    def _(grad_advantages, grad_returns, mask, gamma, lam):
        return _f32(grad_advantages, *mask.shape), _f32(grad_advantages, *mask.shape)

    @lib.register_fake(f"{_NS}::ppo_policy_loss_fwd")
    def _(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg):
        return _f32(logprobs), _f32(logprobs, 3), _f32(logprobs, logprobs.shape[0])

    @lib.register_fake(f"{_NS}::ppo_policy_loss_bwd")
    def _(grad_loss, logprobs, old_logprobs, advantages, mask, row_weight, clip_low, clip_high, dual_clip):
        return tuple(t.new_empty(t.shape) for t in (logprobs, old_logprobs, advantages))

    @lib.register_fake(f"{_NS}::ppo_value_loss_fwd")
    def _(values, old_values, returns, mask, clip, agg):
        return _f32(values), _f32(values), _f32(values, values.shape[0])

    @lib.register_fake(f"{_NS}::ppo_value_loss_bwd")
    def _(grad_loss, values, old_values, returns, mask, row_weight, clip):
        return tuple(t.new_empty(t.shape) for t in (values, old_values, returns))

    @lib.register_fake(f"{_NS}::dpo_loss_fwd")
    def _(pc, pr, rc, rr, beta, loss_type, label_smoothing):
        n = pc.numel()
        return _f32(pc, n), _f32(pc, n), _f32(pc, n)

    @lib.register_fake(f"{_NS}::dpo_loss_bwd")
    def _(grad_losses, pc, pr, rc, rr, beta, loss_type, label_smoothing):
        return tuple(t.new_empty(t.shape) for t in (pc, pr, rc, rr))


# ------------------------------------------------------------------------------------------------
# autograd: each forward op's backward calls the matching backward op


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _register_autograd():
    reg = torch.library.register_autograd

    def tl_setup(ctx, inputs, output):
        logits, labels, temperature, ignore_index, with_entropy = inputs
        _, lse, entropy = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.with_entropy = temperature, ignore_index, with_entropy

    def tl_backward(ctx, g_lp, g_lse, g_ent):
        logits, labels, lse, entropy = ctx.saved_tensors
        g_lp = _zeros_if_none(g_lp, lse)
        if not ctx.with_entropy:
            g_ent = None
        grad = _ops.token_logprobs_bwd(g_lp, g_ent, logits, labels, lse, entropy, ctx.temperature,
                                       ctx.ignore_index)
        return grad, None, None, None, None

    reg(f"{_NS}::token_logprobs_fwd", tl_backward, setup_context=tl_setup)

    def kl_setup(ctx, inputs, output):
        logprobs, ref_logprobs, estimator = inputs
        ctx.save_for_backward(logprobs, ref_logprobs)
        ctx.estimator = estimator

    def kl_backward(ctx, grad):
        lp, ref = ctx.saved_tensors
        g_lp, g_ref = _ops.kl_penalty_bwd(grad, lp, ref, ctx.estimator)
        return g_lp, g_ref, None

    reg(f"{_NS}::kl_penalty_fwd", kl_backward, setup_context=kl_setup)

    def gae_setup(ctx, inputs, output):
        rewards, values, mask, gamma, lam = inputs
        ctx.save_for_backward(mask)
        ctx.gamma, ctx.lam = gamma, lam
        ctx.dtypes = (rewards.dtype, values.dtype)

    def gae_backward(ctx, g_adv, g_ret):
        (mask,) = ctx.saved_tensors
        like = mask.to(torch.float32) if (g_adv is None or g_ret is None) else None
        d_r, d_v = _ops.gae_bwd(_zeros_if_none(g_adv, like), _zeros_if_none(g_ret, like), mask, ctx.gamma, ctx.lam)
        return d_r.to(ctx.dtypes[0]), d_v.to(ctx.dtypes[1]), None, None, None

    reg(f"{_NS}::gae_fwd", gae_backward, setup_context=gae_setup)

    def policy_setup(ctx, inputs, output):
        lp, old, adv, mask, clip_low, clip_high, dual_clip, _agg = inputs
        _, stats, row_weight = output
        ctx.mark_non_differentiable(stats, row_weight)
        ctx.save_for_backward(lp, old, adv, mask, row_weight)
        ctx.params = (clip_low, clip_high, dual_clip)

    def policy_backward(ctx, g_loss, g_stats, g_w):
        lp, old, adv, mask, row_weight = ctx.saved_tensors
        grads = _ops.ppo_policy_loss_bwd(g_loss, lp, old, adv, mask, row_weight, *ctx.params)
        return (*grads, None, None, None, None, None)

    reg(f"{_NS}::ppo_policy_loss_fwd", policy_backward, setup_context=policy_setup)

    def value_setup(ctx, inputs, output):
        v, old, ret, mask, clip, _agg = inputs
        _, clipfrac, row_weight = output
        ctx.mark_non_differentiable(clipfrac, row_weight)
        ctx.save_for_backward(v, old, ret, mask, row_weight)
        ctx.clip = clip

    def value_backward(ctx, g_loss, g_cf, g_w):
        v, old, ret, mask, row_weight = ctx.saved_tensors
        grads = _ops.ppo_value_loss_bwd(g_loss, v, old, ret, mask, row_weight, ctx.clip)
        return (*grads, None, None, None)

    reg(f"{_NS}::ppo_value_loss_fwd", value_backward, setup_context=value_setup)

    def dpo_setup(ctx, inputs, output):
        pc, pr, rc, rr, beta, loss_type, ls = inputs
        _, cr, rj = output
        ctx.mark_non_differentiable(cr, rj)
        ctx.save_for_backward(pc, pr, rc, rr)
        ctx.params = (beta, loss_type, ls)

    def dpo_backward(ctx, g_losses, g_cr, g_rr):
        pc, pr, rc, rr = ctx.saved_tensors
        grads = _ops.dpo_loss_bwd(g_losses, pc, pr, rc, rr, *ctx.params)
        return (*grads, None, None, None)

    reg(f"{_NS}::dpo_loss_fwd", dpo_backward, setup_context=dpo_setup)


_registered = False


def register() -> None:
    """Register fakes and autograd once (the loader calls this right after loading the library)."""
    global _registered
    if _registered:
        return
    _register_fakes()
    _register_autograd()
    _registered = True


# ------------------------------------------------------------------------------------------------
# Backend implementations with the reference signatures (arguments already validated by _api.py)


def token_logprobs(logits, labels, temperature, ignore_index, return_entropy):
    n = labels.numel()
    lp, _, ent = _ops.token_logprobs_fwd(logits.reshape(n, logits.shape[-1]), labels.reshape(n),
                                         float(temperature), int(ignore_index), bool(return_entropy))
    shape = labels.shape
    return lp.view(shape), (ent.view(shape) if return_entropy else None)


def kl_penalty(logprobs, ref_logprobs, estimator):
    return _ops.kl_penalty_fwd(logprobs, ref_logprobs, KL_ESTIMATOR[estimator])


def gae(rewards, values, mask, gamma, lam):
    return _ops.gae_fwd(rewards, values, mask, float(gamma), float(lam))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    # token-mean accepts any shape: one row of all tokens gives the same weights.
    return t if t.dim() == 2 else t.reshape(1, -1)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg):
    loss, stats, _ = _ops.ppo_policy_loss_fwd(
        _as_rows(logprobs), _as_rows(old_logprobs), _as_rows(advantages), _as_rows(mask), float(clip_low),
        float(clip_high), None if dual_clip is None else float(dual_clip), AGG[agg])
    return loss, {"clipfrac": stats[0], "clipfrac_lower": stats[1], "approx_kl": stats[2]}


def ppo_value_loss(values, old_values, returns, mask, clip, agg):
    loss, clipfrac, _ = _ops.ppo_value_loss_fwd(
        _as_rows(values), _as_rows(old_values), _as_rows(returns), _as_rows(mask),
        None if clip is None else float(clip), AGG[agg])
    return loss, {"clipfrac": clipfrac}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    return _ops.dpo_loss_fwd(policy_chosen, policy_rejected, ref_chosen, ref_rejected, float(beta),
                             DPO_LOSS[loss_type], float(label_smoothing))


OPS = {
    "token_logprobs": token_logprobs,
    "kl_penalty": kl_penalty,
    "gae": gae,
    "ppo_policy_loss": ppo_policy_loss,
    "ppo_value_loss": ppo_value_loss,
    "dpo_loss": dpo_loss,
}
