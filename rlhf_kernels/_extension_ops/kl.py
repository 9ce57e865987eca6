"""kl_penalty on the compiled backends: fake, autograd, wrapper."""

from __future__ import annotations

import torch

from .._registry import code, register_impl
from . import BACKENDS, NAMESPACE, f32_like, fast_autograd

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


@register_impl(BACKENDS, "kl_penalty")
def kl_penalty(logprobs, ref_logprobs, estimator):
    return _kl_penalty_fwd(logprobs, ref_logprobs, code("kl_estimator", estimator))
