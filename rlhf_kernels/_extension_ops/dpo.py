"""dpo_loss on the compiled backends: fake, autograd, wrapper."""

from __future__ import annotations

import torch

from .._registry import code, register_impl
from . import BACKENDS, NAMESPACE, cpu_training, dx_autograd, f32_like, fast_autograd

_ops = torch.ops.rlhf_kernels


@torch.library.register_fake(f"{NAMESPACE}::dpo_loss_fwd")
def _(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    n = pc.numel()
    return f32_like(pc, n), f32_like(pc, n), f32_like(pc, n)


@torch.library.register_fake(f"{NAMESPACE}::dpo_loss_bwd")
def _(grad_losses, pc, pr, rc, rr, beta, loss_type, label_smoothing):
    return tuple(t.new_empty(t.shape) for t in (pc, pr, rc, rr))


def _setup_context(ctx, inputs, output):
    pc, pr, rc, rr, beta, loss_type, label_smoothing = inputs
    _, chosen_rewards, rejected_rewards = output
    ctx.mark_non_differentiable(chosen_rewards, rejected_rewards)
    ctx.save_for_backward(pc, pr, rc, rr)
    ctx.params = (beta, loss_type, label_smoothing)


def _backward(ctx, g_losses, g_chosen, g_rejected):
    grads = _ops.dpo_loss_bwd(g_losses, *ctx.saved_tensors, *ctx.params)
    return (*grads, None, None, None)


torch.library.register_autograd(f"{NAMESPACE}::dpo_loss_fwd", _backward, setup_context=_setup_context)
_dpo_loss_fwd = fast_autograd(_ops.dpo_loss_fwd, _setup_context, _backward)


@torch.library.register_fake(f"{NAMESPACE}::dpo_loss_fwd_dx")
def _(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    n = pc.numel()
    return f32_like(pc, n), f32_like(pc, n), f32_like(pc, n), f32_like(pc, n)


def _dx_setup(ctx, inputs, output):
    losses, chosen_rewards, rejected_rewards, dh = output
    ctx.mark_non_differentiable(chosen_rewards, rejected_rewards)
    ctx.save_for_backward(dh)
    ctx.dtypes = tuple(t.dtype for t in inputs[:4])
    return losses, chosen_rewards, rejected_rewards


def _dx_backward(ctx, g_losses, g_chosen, g_rejected):
    # h = (pc - rc) - (pr - rr): d h / d (pc, pr, rc, rr) = (1, -1, -1, 1)
    (dh,) = ctx.saved_tensors
    g = g_losses * dh
    grads = tuple((g if sign > 0 else -g).to(dt) if need else None
                  for sign, dt, need in zip((1, -1, -1, 1), ctx.dtypes, ctx.needs_input_grad[:4]))
    return (*grads, None, None, None)


_dpo_loss_train = dx_autograd(_ops.dpo_loss_fwd_dx, _dx_setup, _dx_backward, "dpo_loss")


@register_impl(BACKENDS, "dpo_loss")
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    inputs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if any(cpu_training(t) for t in inputs):
        return _dpo_loss_train(*inputs, float(beta), code("dpo_loss_type", loss_type), float(label_smoothing))
    return _dpo_loss_fwd(policy_chosen, policy_rejected, ref_chosen, ref_rejected, float(beta),
                             code("dpo_loss_type", loss_type), float(label_smoothing))
