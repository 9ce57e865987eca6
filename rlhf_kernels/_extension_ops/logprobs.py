"""token_logprobs on the compiled backends: fake, autograd, wrapper."""

from __future__ import annotations

import torch

from .._registry import register_impl
from . import BACKENDS, NAMESPACE, f32_like, fast_autograd, zeros_if_none

_ops = torch.ops.rlhf_kernels


@torch.library.register_fake(f"{NAMESPACE}::token_logprobs_fwd")
def _(logits, labels, temperature, ignore_index, with_entropy):
    n = logits.shape[0]
    return f32_like(logits, n), f32_like(logits, n), f32_like(logits, n)


@torch.library.register_fake(f"{NAMESPACE}::token_logprobs_bwd")
def _(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy = inputs
    _, lse, entropy = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.with_entropy = temperature, ignore_index, with_entropy


def _backward(ctx, g_lp, g_lse, g_ent):
    logits, labels, lse, entropy = ctx.saved_tensors
    g_lp = zeros_if_none(g_lp, lse)
    if not ctx.with_entropy:
        g_ent = None
    grad = _ops.token_logprobs_bwd(g_lp, g_ent, logits, labels, lse, entropy, ctx.temperature, ctx.ignore_index)
    return grad, None, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::token_logprobs_fwd", _backward, setup_context=_setup_context)
_token_logprobs_fwd = fast_autograd(_ops.token_logprobs_fwd, _setup_context, _backward)


@register_impl(BACKENDS, "token_logprobs")
def token_logprobs(logits, labels, temperature, ignore_index, return_entropy):
    n = labels.numel()
    lp, _, ent = _token_logprobs_fwd(logits.reshape(n, logits.shape[-1]), labels.reshape(n),
                                         float(temperature), int(ignore_index), bool(return_entropy))
    shape = labels.shape
    return lp.view(shape), (ent.view(shape) if return_entropy else None)
