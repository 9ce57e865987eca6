"""kl_penalty on the compiled backends: fake, autograd, wrapper."""

from __future__ import annotations

import torch

from .._registry import code, register_impl
from . import BACKENDS, NAMESPACE, cpu_training, dx_autograd, f32_like, fast_autograd

_ops = torch.ops.rlhf_kernels


@torch.library.register_fake(f"{NAMESPACE}::kl_penalty_fwd")
def _(logprobs, ref_logprobs, estimator):
    return f32_like(logprobs, *logprobs.shape)


@torch.library.register_fake(f"{NAMESPACE}::kl_penalty_bwd")
def _(grad, logprobs, ref_logprobs, estimator):
    return logprobs.new_empty(logprobs.shape), ref_logprobs.new_empty(ref_logprobs.shape)


def _setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, estimator = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.estimator = estimator


def _backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    g_lp, g_ref = _ops.kl_penalty_bwd(grad, logprobs, ref_logprobs, ctx.estimator)
    return g_lp, g_ref, None


torch.library.register_autograd(f"{NAMESPACE}::kl_penalty_fwd", _backward, setup_context=_setup_context)
_kl_penalty_fwd = fast_autograd(_ops.kl_penalty_fwd, _setup_context, _backward)


@torch.library.register_fake(f"{NAMESPACE}::kl_penalty_fwd_dx")
def _(logprobs, ref_logprobs, estimator):
    return f32_like(logprobs, *logprobs.shape), f32_like(logprobs, *logprobs.shape)


def _dx_setup(ctx, inputs, output):
    logprobs, ref_logprobs, _ = inputs
    kl, dx = output
    ctx.save_for_backward(dx)
    ctx.dtypes = (logprobs.dtype, ref_logprobs.dtype)
    return kl


def _dx_backward(ctx, grad):
    (dx,) = ctx.saved_tensors
    g = grad * dx
    g_lp = g.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    g_ref = (-g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return g_lp, g_ref, None


_kl_penalty_train = dx_autograd(_ops.kl_penalty_fwd_dx, _dx_setup, _dx_backward, "kl_penalty")


@register_impl(BACKENDS, "kl_penalty")
def kl_penalty(logprobs, ref_logprobs, estimator):
    est = code("kl_estimator", estimator)
    if cpu_training(logprobs) or cpu_training(ref_logprobs):
        return _kl_penalty_train(logprobs, ref_logprobs, est)
    return _kl_penalty_fwd(logprobs, ref_logprobs, est)
