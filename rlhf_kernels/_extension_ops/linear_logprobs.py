"""linear_token_logprobs on the compiled backends: fakes, autograd, wrapper.

The forward op returns ``(logprobs, lse, entropy, mean_logit, is_top1)`` for ``hidden`` [N, H]
(entropy of size 0 unless ``with_entropy``, mean_logit and is_top1 of size 0 unless ``with_extras``);
autograd saves the inputs and the O(N) ``lse`` / ``entropy`` and the backward op recomputes the
logits tiles.  ``softcap`` 0.0 means no soft-cap.
"""

from __future__ import annotations

import torch

from .._registry import register_impl
from . import BACKENDS, NAMESPACE, f32_like, zeros_if_none

_ops = torch.ops.rlhf_kernels


@torch.library.register_fake(f"{NAMESPACE}::linear_token_logprobs_fwd")
def _(hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index, with_entropy, with_extras):
    n = hidden.shape[0]
    n_ent = n if with_entropy else 0
    n_extra = n if with_extras else 0
    top1 = hidden.new_empty((n_extra,), dtype=torch.bool)
    return f32_like(hidden, n), f32_like(hidden, n), f32_like(hidden, n_ent), f32_like(hidden, n_extra), top1


@torch.library.register_fake(f"{NAMESPACE}::linear_token_logprobs_bwd")
def _(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy, logit_scale, softcap, temperature,
      ignore_index, output_mask):
    need_h, need_w, need_b = output_mask
    grad_h = hidden.new_empty(hidden.shape if need_h else (0,))
    grad_w = weight.new_empty(weight.shape if need_w else (0,))
    grad_b = bias.new_empty(bias.shape) if (need_b and bias is not None) else hidden.new_empty((0,))
    return grad_h, grad_w, grad_b


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index, with_entropy, _extras = inputs
    _, lse, entropy, mean_logit, is_top1 = output
    ctx.mark_non_differentiable(lse, mean_logit, is_top1)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.constants = (logit_scale, softcap, temperature, ignore_index)
    ctx.with_entropy = with_entropy


def _backward(ctx, g_lp, g_lse, g_ent, g_mean, g_top1):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    g_lp = zeros_if_none(g_lp, lse)
    if not ctx.with_entropy:
        g_ent = None
    mask = [bool(x) for x in ctx.needs_input_grad[:3]]
    grad_h, grad_w, grad_b = _ops.linear_token_logprobs_bwd(
        g_lp, g_ent, hidden, weight, bias, labels, lse, entropy, *ctx.constants, mask)
    return (grad_h if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd(f"{NAMESPACE}::linear_token_logprobs_fwd", _backward, setup_context=_setup_context)


@register_impl(BACKENDS, "linear_token_logprobs")
def linear_token_logprobs(hidden, weight, labels, bias, logit_scale, softcap, temperature, ignore_index,
                          return_entropy, return_mean_logit, return_is_top1):
    n = labels.numel()
    lp, _, ent, mean_logit, top1 = _ops.linear_token_logprobs_fwd(
        hidden.reshape(n, hidden.shape[-1]), weight, bias, labels.reshape(n), float(logit_scale), float(softcap),
        float(temperature), int(ignore_index), bool(return_entropy), bool(return_mean_logit or return_is_top1))
    shape = labels.shape
    return (
        lp.view(shape),
        ent.view(shape) if return_entropy else None,
        mean_logit.view(shape) if return_mean_logit else None,
        top1.view(shape) if return_is_top1 else None,
    )
