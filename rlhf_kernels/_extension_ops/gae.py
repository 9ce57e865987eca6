"""gae on the compiled backends: fake, autograd, wrapper."""

from __future__ import annotations

import torch

from .._registry import register_impl
from . import BACKENDS, NAMESPACE, f32_like, zeros_if_none

_ops = torch.ops.rlhf_kernels


@torch.library.register_fake(f"{NAMESPACE}::gae_fwd")
def _(rewards, values, mask, gamma, lam):
    return f32_like(rewards, *rewards.shape), f32_like(rewards, *rewards.shape)


@torch.library.register_fake(f"{NAMESPACE}::gae_bwd")
def _(grad_advantages, grad_returns, mask, gamma, lam):
    return f32_like(grad_advantages, *mask.shape), f32_like(grad_advantages, *mask.shape)


def _setup_context(ctx, inputs, output):
    rewards, values, mask, gamma, lam = inputs
    ctx.save_for_backward(mask)
    ctx.gamma, ctx.lam = gamma, lam
    ctx.dtypes = (rewards.dtype, values.dtype)


def _backward(ctx, g_adv, g_ret):
    (mask,) = ctx.saved_tensors
    like = mask.to(torch.float32) if (g_adv is None or g_ret is None) else None
    d_r, d_v = _ops.gae_bwd(zeros_if_none(g_adv, like), zeros_if_none(g_ret, like), mask, ctx.gamma, ctx.lam)
    return d_r.to(ctx.dtypes[0]), d_v.to(ctx.dtypes[1]), None, None, None


torch.library.register_autograd(f"{NAMESPACE}::gae_fwd", _backward, setup_context=_setup_context)


@register_impl(BACKENDS, "gae")
def gae(rewards, values, mask, gamma, lam):
    return _ops.gae_fwd(rewards, values, mask, float(gamma), float(lam))
