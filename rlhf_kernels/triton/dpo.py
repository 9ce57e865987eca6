"""Triton DPO loss (Rafailov et al., 2023) and its IPO, hinge and robust variants.

One launch forward (losses and both rewards), one launch backward (all four input gradients).
With h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), ls = label_smoothing:

    sigmoid: -(1 - ls) * logsigmoid(beta h) - ls * logsigmoid(-beta h)
    ipo:     (h - 1 / (2 beta))^2
    hinge:   relu(1 - beta h)
    robust:  (-(1 - ls) * logsigmoid(beta h) + ls * logsigmoid(-beta h)) / (1 - 2 ls)

logsigmoid(x) = min(x, 0) - log(1 + exp(-|x|)) and its derivative sigmoid(-x) = 1 / (1 + exp(x))
stay finite for any margin (|beta h| of 1e4 included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import code, register_impl
from ._launch import NAMESPACE, block, cast_to, interpreting, launch

# The loss-type codes the kernels branch on, from the registry (constexpr globals, as Triton requires).
_SIGMOID = tl.constexpr(code("dpo_loss_type", "sigmoid"))
_IPO = tl.constexpr(code("dpo_loss_type", "ipo"))
_HINGE = tl.constexpr(code("dpo_loss_type", "hinge"))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _dpo_fwd_kernel(
    # pointers: four inputs [B], outputs losses, chosen_rewards, rejected_rewards [B] fp32
    pc_ptr, pr_ptr, rc_ptr, rr_ptr, loss_ptr, chosen_ptr, rejected_ptr,
    # shapes
    B,
    # constants
    beta, ls,
    LOSS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < B
    chosen = tl.load(pc_ptr + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(
        rc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    rejected = tl.load(pr_ptr + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(
        rr_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    h = chosen - rejected
    if LOSS == _SIGMOID:
        loss = -(1.0 - ls) * _logsigmoid(beta * h) - ls * _logsigmoid(-beta * h)
    elif LOSS == _IPO:
        loss = (h - 1.0 / (2.0 * beta)) * (h - 1.0 / (2.0 * beta))
    elif LOSS == _HINGE:
        loss = tl.maximum(1.0 - beta * h, 0.0)
    else:
        loss = (-(1.0 - ls) * _logsigmoid(beta * h) + ls * _logsigmoid(-beta * h)) / (1.0 - 2.0 * ls)
    tl.store(loss_ptr + offs, loss, mask=ok)
    tl.store(chosen_ptr + offs, beta * chosen, mask=ok)
    tl.store(rejected_ptr + offs, beta * rejected, mask=ok)


@triton.jit
def _dpo_bwd_kernel(
    # pointers: upstream grad [B], four inputs [B], four gradients [B] in the inputs' dtypes
    grad_ptr, pc_ptr, pr_ptr, rc_ptr, rr_ptr, g_pc_ptr, g_pr_ptr, g_rc_ptr, g_rr_ptr,
    # shapes
    B,
    # constants
    beta, ls,
    LOSS: tl.constexpr, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < B
    g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    h = (tl.load(pc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
         - tl.load(rc_ptr + offs, mask=ok, other=0.0).to(tl.float32)) - (
        tl.load(pr_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        - tl.load(rr_ptr + offs, mask=ok, other=0.0).to(tl.float32))
    x = beta * h
    # d logsigmoid(x) / dx = sigmoid(-x);  d logsigmoid(-x) / dx = -sigmoid(x)
    sig_neg = 1.0 / (1.0 + tl.exp(x))
    sig_pos = 1.0 / (1.0 + tl.exp(-x))
    if LOSS == _SIGMOID:
        dh = beta * (-(1.0 - ls) * sig_neg + ls * sig_pos)
    elif LOSS == _IPO:
        dh = 2.0 * (h - 1.0 / (2.0 * beta))
    elif LOSS == _HINGE:
        dh = tl.where(1.0 - x > 0, -beta, 0.0)
    else:
        dh = beta * (-(1.0 - ls) * sig_neg - ls * sig_pos) / (1.0 - 2.0 * ls)
    gh = g * dh
    tl.store(g_pc_ptr + offs, cast_to(gh, g_pc_ptr.dtype.element_ty, SOFT_BF16), mask=ok)
    tl.store(g_pr_ptr + offs, cast_to(-gh, g_pr_ptr.dtype.element_ty, SOFT_BF16), mask=ok)
    tl.store(g_rc_ptr + offs, cast_to(-gh, g_rc_ptr.dtype.element_ty, SOFT_BF16), mask=ok)
    tl.store(g_rr_ptr + offs, cast_to(gh, g_rr_ptr.dtype.element_ty, SOFT_BF16), mask=ok)


def _config(B: int):
    return block(B, 1024, 4096), 4


def dpo_loss_forward(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    B = pc.shape[0]
    outs = [torch.empty(B, dtype=torch.float32, device=pc.device) for _ in range(3)]
    if B:
        blk, warps = _config(B)
        launch(_dpo_fwd_kernel, (triton.cdiv(B, blk),),
            pc.contiguous(), pr.contiguous(), rc.contiguous(), rr.contiguous(), *outs, B,
            float(beta), float(label_smoothing), LOSS=code("dpo_loss_type", loss_type), BLOCK=blk, num_warps=warps)
    return tuple(outs)


def dpo_loss_backward(grad, pc, pr, rc, rr, beta, loss_type, label_smoothing):
    B = pc.shape[0]
    grads = [torch.empty(B, dtype=t.dtype, device=t.device) for t in (pc, pr, rc, rr)]
    if B:
        blk, warps = _config(B)
        launch(_dpo_bwd_kernel, (triton.cdiv(B, blk),),
            grad.contiguous(), pc.contiguous(), pr.contiguous(), rc.contiguous(), rr.contiguous(), *grads, B,
            float(beta), float(label_smoothing), LOSS=code("dpo_loss_type", loss_type), BLOCK=blk,
            SOFT_BF16=interpreting(), num_warps=warps)
    return tuple(grads)


@torch.library.custom_op(f"{NAMESPACE}::dpo_loss_fwd", mutates_args=())
def dpo_loss_fwd(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, beta: float, loss_type: str,
                 label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dpo_loss_forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing)


@dpo_loss_fwd.register_fake
def _(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    return tuple(policy_chosen.new_empty(policy_chosen.shape, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op(f"{NAMESPACE}::dpo_loss_bwd", mutates_args=())
def dpo_loss_bwd(grad: torch.Tensor, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                 ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float, loss_type: str,
                 label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dpo_loss_backward(grad, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type,
                        label_smoothing)


@dpo_loss_bwd.register_fake
def _(grad, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    return tuple(t.new_empty(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def _setup_context(ctx, inputs, output):
    *tensors, beta, loss_type, label_smoothing = inputs
    ctx.save_for_backward(*tensors)
    ctx.args = (beta, loss_type, label_smoothing)


def _backward(ctx, grad_losses, grad_chosen, grad_rejected):
    # The rewards are logging values (detached by the wrapper): only the losses carry gradient.
    grads = dpo_loss_bwd(grad_losses, *ctx.saved_tensors, *ctx.args)
    return (*grads, None, None, None)


dpo_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_impl("triton", "dpo_loss")
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    """Same contract as :func:`rlhf_kernels.reference.dpo_loss`."""
    losses, chosen, rejected = dpo_loss_fwd(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                            float(beta), loss_type, float(label_smoothing))
    return losses, chosen.detach(), rejected.detach()
