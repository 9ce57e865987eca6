"""ppo_policy_loss and ppo_value_loss on the compiled backends: fakes, autograd, wrappers."""

from __future__ import annotations

import torch

from .._registry import code, register_impl
from . import BACKENDS, NAMESPACE, as_rows, cpu_training, dx_autograd, f32_like, fast_autograd

_ops = torch.ops.rlhf_kernels


@torch.library.register_fake(f"{NAMESPACE}::ppo_policy_loss_fwd")
def _(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg):
    return f32_like(logprobs), f32_like(logprobs, 3), f32_like(logprobs, logprobs.shape[0])


@torch.library.register_fake(f"{NAMESPACE}::ppo_policy_loss_bwd")
def _(grad_loss, logprobs, old_logprobs, advantages, mask, row_weight, clip_low, clip_high, dual_clip):
    return tuple(t.new_empty(t.shape) for t in (logprobs, old_logprobs, advantages))


@torch.library.register_fake(f"{NAMESPACE}::ppo_value_loss_fwd")
def _(values, old_values, returns, mask, clip, agg):
    return f32_like(values), f32_like(values), f32_like(values, values.shape[0])


@torch.library.register_fake(f"{NAMESPACE}::ppo_value_loss_bwd")
def _(grad_loss, values, old_values, returns, mask, row_weight, clip):
    return tuple(t.new_empty(t.shape) for t in (values, old_values, returns))


# Both losses save their inputs and the per-row weights; the stats outputs carry no gradient.
def _policy_setup(ctx, inputs, output):
    lp, old, adv, mask, clip_low, clip_high, dual_clip, _agg = inputs
    _, stats, row_weight = output
    ctx.mark_non_differentiable(stats, row_weight)
    ctx.save_for_backward(lp, old, adv, mask, row_weight)
    ctx.params = (clip_low, clip_high, dual_clip)


def _policy_backward(ctx, g_loss, g_stats, g_w):
    grads = _ops.ppo_policy_loss_bwd(g_loss, *ctx.saved_tensors, *ctx.params)
    return (*grads, None, None, None, None, None)


def _value_setup(ctx, inputs, output):
    v, old, ret, mask, clip, _agg = inputs
    _, clipfrac, row_weight = output
    ctx.mark_non_differentiable(clipfrac, row_weight)
    ctx.save_for_backward(v, old, ret, mask, row_weight)
    ctx.clip = clip


def _value_backward(ctx, g_loss, g_cf, g_w):
    grads = _ops.ppo_value_loss_bwd(g_loss, *ctx.saved_tensors, ctx.clip)
    return (*grads, None, None, None)


torch.library.register_autograd(f"{NAMESPACE}::ppo_policy_loss_fwd", _policy_backward, setup_context=_policy_setup)
torch.library.register_autograd(f"{NAMESPACE}::ppo_value_loss_fwd", _value_backward, setup_context=_value_setup)
_policy_fwd = fast_autograd(_ops.ppo_policy_loss_fwd, _policy_setup, _policy_backward)
_value_fwd = fast_autograd(_ops.ppo_value_loss_fwd, _value_setup, _value_backward)


@torch.library.register_fake(f"{NAMESPACE}::ppo_policy_loss_fwd_dx")
def _(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg):
    return (f32_like(logprobs), f32_like(logprobs, 3), f32_like(logprobs, logprobs.shape[0]),
            f32_like(logprobs, *logprobs.shape))


@torch.library.register_fake(f"{NAMESPACE}::ppo_value_loss_fwd_dx")
def _(values, old_values, returns, mask, clip, agg):
    return (f32_like(values), f32_like(values), f32_like(values, values.shape[0]),
            f32_like(values, *values.shape))


# The CPU training forwards: only the first input (logprobs / values) needs a gradient; the saved
# per-token derivative times grad_loss * row_weight is that gradient.
def _dx_setup(ctx, inputs, output):
    loss, stats, row_weight, dx = output
    ctx.mark_non_differentiable(stats, row_weight)
    ctx.save_for_backward(dx, row_weight)
    ctx.dtype = inputs[0].dtype
    return loss, stats, row_weight


def _dx_grad(ctx, scale):
    dx, row_weight = ctx.saved_tensors
    return (dx * (scale * row_weight).unsqueeze(1)).to(ctx.dtype)


def _policy_dx_backward(ctx, g_loss, g_stats, g_w):
    return (_dx_grad(ctx, g_loss), None, None, None, None, None, None, None)


def _value_dx_backward(ctx, g_loss, g_cf, g_w):
    return (_dx_grad(ctx, 0.5 * g_loss), None, None, None, None, None)


_policy_train = dx_autograd(_ops.ppo_policy_loss_fwd_dx, _dx_setup, _policy_dx_backward, "ppo_policy_loss")
_value_train = dx_autograd(_ops.ppo_value_loss_fwd_dx, _dx_setup, _value_dx_backward, "ppo_value_loss")


def _optional_float(x):
    return None if x is None else float(x)


@register_impl(BACKENDS, "ppo_policy_loss")
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg):
    fwd = _policy_train if cpu_training(logprobs, old_logprobs, advantages) else _policy_fwd
    loss, stats, _ = fwd(
        as_rows(logprobs), as_rows(old_logprobs), as_rows(advantages), as_rows(mask), float(clip_low),
        float(clip_high), _optional_float(dual_clip), code("agg", agg))
    clipfrac, clipfrac_lower, approx_kl = stats.unbind()
    return loss, {"clipfrac": clipfrac, "clipfrac_lower": clipfrac_lower, "approx_kl": approx_kl}


@register_impl(BACKENDS, "ppo_value_loss")
def ppo_value_loss(values, old_values, returns, mask, clip, agg):
    fwd = _value_train if cpu_training(values, old_values, returns) else _value_fwd
    loss, clipfrac, _ = fwd(
        as_rows(values), as_rows(old_values), as_rows(returns), as_rows(mask), _optional_float(clip),
        code("agg", agg))
    return loss, {"clipfrac": clipfrac}
