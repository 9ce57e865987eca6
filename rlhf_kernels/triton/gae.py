"""Triton Generalized Advantage Estimation (Schulman et al., 2016) with skip-masking.

Forward: one program per block of ``BLOCK_B`` sequences scans t = T-1 .. 0 keeping the running
advantage and the next valid value in registers (one lane per sequence):

    valid step:  delta = r + gamma * V_next - V;  A = delta + gamma * lam * A_next;  R = A + V
    masked step: A = R = 0, and A_next, V_next carry over unchanged.

Backward is the adjoint recurrence, a scan forward in time.  With c = gamma * lam, over the valid
steps j of a row (upstream grads gA, gR):

    gdelta_j = gA_j + gR_j + c * gdelta_{j-1}
    d rewards_j = gdelta_j,    d values_j = gR_j - gdelta_j + gamma * gdelta_{j-1}

(the previous valid step's delta contains gamma * V_j).  Masked entries are never loaded, so NaN
there reaches neither the outputs nor the gradients; their gradients are 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._registry import register_impl
from ._launch import NAMESPACE, block, cast_to, interpreting, launch


@triton.jit
def _gae_fwd_kernel(
    # pointers: rewards, values [B, T] (contiguous), mask [B, T] uint8, outputs [B, T] fp32
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    # shapes
    B, T,
    # constants
    gamma, lam,
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    base = rows.to(tl.int64) * T  # int64: B * T may exceed 2^31
    a_next = tl.zeros([BLOCK_B], dtype=tl.float32)
    v_next = tl.zeros([BLOCK_B], dtype=tl.float32)
    for i in range(0, T):
        t = T - 1 - i
        m = tl.load(mask_ptr + base + t, mask=row_ok, other=0) != 0
        r = tl.load(rewards_ptr + base + t, mask=m, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + base + t, mask=m, other=0.0).to(tl.float32)
        a = r + gamma * v_next - v + gamma * lam * a_next
        tl.store(adv_ptr + base + t, tl.where(m, a, 0.0), mask=row_ok)
        tl.store(ret_ptr + base + t, tl.where(m, a + v, 0.0), mask=row_ok)
        a_next = tl.where(m, a, a_next)
        v_next = tl.where(m, v, v_next)


@triton.jit
def _gae_bwd_kernel(
    # pointers: upstream grads [B, T] (contiguous), mask [B, T] uint8, outputs in the inputs' dtypes
    grad_adv_ptr, grad_ret_ptr, mask_ptr, grad_rewards_ptr, grad_values_ptr,
    # shapes
    B, T,
    # constants
    gamma, lam,
    HAS_GRAD_ADV: tl.constexpr, HAS_GRAD_RET: tl.constexpr, BLOCK_B: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    base = rows.to(tl.int64) * T
    g_delta_prev = tl.zeros([BLOCK_B], dtype=tl.float32)
    for t in range(0, T):
        m = tl.load(mask_ptr + base + t, mask=row_ok, other=0) != 0
        g_a = tl.zeros([BLOCK_B], dtype=tl.float32)
        g_r = tl.zeros([BLOCK_B], dtype=tl.float32)
        if HAS_GRAD_ADV:
            g_a = tl.load(grad_adv_ptr + base + t, mask=m, other=0.0).to(tl.float32)
        if HAS_GRAD_RET:
            g_r = tl.load(grad_ret_ptr + base + t, mask=m, other=0.0).to(tl.float32)
        g_delta = g_a + g_r + gamma * lam * g_delta_prev
        g_value = g_r - g_delta + gamma * g_delta_prev
        tl.store(grad_rewards_ptr + base + t,
                 cast_to(tl.where(m, g_delta, 0.0), grad_rewards_ptr.dtype.element_ty, SOFT_BF16), mask=row_ok)
        tl.store(grad_values_ptr + base + t,
                 cast_to(tl.where(m, g_value, 0.0), grad_values_ptr.dtype.element_ty, SOFT_BF16), mask=row_ok)
        g_delta_prev = tl.where(m, g_delta, g_delta_prev)


def _config(B: int):
    # One lane per sequence; a warp covers 32 sequences so a batch of 512 spreads over 16+ SMs.
    blk = block(B, 32, 64)
    return blk, 1 if blk <= 32 else 2


def gae_forward(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    ret = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    if B * T:
        blk, warps = _config(B)
        launch(_gae_fwd_kernel, (triton.cdiv(B, blk),),
            rewards.contiguous(), values.contiguous(), mask.contiguous().view(torch.uint8), adv, ret,
            B, T, float(gamma), float(lam), BLOCK_B=blk, num_warps=warps)
    return adv, ret


def gae_backward(grad_adv, grad_ret, mask, gamma, lam, rewards_dtype, values_dtype):
    B, T = mask.shape
    grad_r = torch.empty((B, T), dtype=rewards_dtype, device=mask.device)
    grad_v = torch.empty((B, T), dtype=values_dtype, device=mask.device)
    if B * T:
        blk, warps = _config(B)
        has_a, has_r = grad_adv is not None, grad_ret is not None
        launch(_gae_bwd_kernel, (triton.cdiv(B, blk),),
            grad_adv.contiguous() if has_a else grad_r, grad_ret.contiguous() if has_r else grad_r,
            mask.contiguous().view(torch.uint8), grad_r, grad_v,
            B, T, float(gamma), float(lam),
            HAS_GRAD_ADV=has_a, HAS_GRAD_RET=has_r, BLOCK_B=blk, SOFT_BF16=interpreting(), num_warps=warps)
    return grad_r, grad_v


@torch.library.custom_op(f"{NAMESPACE}::gae_fwd", mutates_args=())
def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
            lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    return gae_forward(rewards, values, mask, gamma, lam)


@gae_fwd.register_fake
def _(rewards, values, mask, gamma, lam):
    return (rewards.new_empty(rewards.shape, dtype=torch.float32),
            rewards.new_empty(rewards.shape, dtype=torch.float32))


@torch.library.custom_op(f"{NAMESPACE}::gae_bwd", mutates_args=())
def gae_bwd(grad_adv: Optional[torch.Tensor], grad_ret: Optional[torch.Tensor], mask: torch.Tensor,
            gamma: float, lam: float, rewards_dtype: torch.dtype,
            values_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return gae_backward(grad_adv, grad_ret, mask, gamma, lam, rewards_dtype, values_dtype)


@gae_bwd.register_fake
def _(grad_adv, grad_ret, mask, gamma, lam, rewards_dtype, values_dtype):
    return mask.new_empty(mask.shape, dtype=rewards_dtype), mask.new_empty(mask.shape, dtype=values_dtype)


def _setup_context(ctx, inputs, output):
    rewards, values, mask, gamma, lam = inputs
    ctx.save_for_backward(mask)
    ctx.gamma, ctx.lam = gamma, lam
    ctx.dtypes = (rewards.dtype, values.dtype)


def _backward(ctx, grad_adv, grad_ret):
    (mask,) = ctx.saved_tensors
    grad_r, grad_v = gae_bwd(grad_adv, grad_ret, mask, ctx.gamma, ctx.lam, *ctx.dtypes)
    return grad_r, grad_v, None, None, None


gae_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_impl("triton", "gae")
def gae(rewards, values, mask, gamma, lam):
    """Same contract as :func:`rlhf_kernels.reference.gae`; ``mask`` is a bool tensor."""
    return gae_fwd(rewards, values, mask.bool(), float(gamma), float(lam))
