"""Triton per-token KL estimators (Schulman, 2020): one elementwise kernel per direction.

With d = logprobs - ref_logprobs in fp32:  k1 = d,  k2 = d^2 / 2,  k3 = exp(-d) - 1 + d,  abs = |d|.
The backward kernel writes both input gradients (d k / d logprobs = -d k / d ref_logprobs) in the
inputs' own dtypes, in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import code, register_impl
from ._launch import NAMESPACE, block, cast_to, interpreting, launch

# The estimator codes the kernels branch on, from the registry (constexpr globals, as Triton requires).
_K1 = tl.constexpr(code("kl_estimator", "k1"))
_K2 = tl.constexpr(code("kl_estimator", "k2"))
_K3 = tl.constexpr(code("kl_estimator", "k3"))


@triton.jit
def _kl_fwd_kernel(
    # pointers: inputs [n], output [n] fp32
    lp_ptr, ref_ptr, out_ptr,
    # shapes
    n,
    # constants
    ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    d = tl.load(lp_ptr + offs, mask=valid, other=0.0).to(tl.float32) - tl.load(
        ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if ESTIMATOR == _K1:
        k = d
    elif ESTIMATOR == _K2:
        k = 0.5 * d * d
    elif ESTIMATOR == _K3:
        k = tl.exp(-d) - 1.0 + d
    else:
        k = tl.abs(d)
    tl.store(out_ptr + offs, k, mask=valid)


@triton.jit
def _kl_bwd_kernel(
    # pointers: upstream grad [n], inputs [n], outputs grad_lp, grad_ref [n] in the inputs' dtypes
    grad_ptr, lp_ptr, ref_ptr, grad_lp_ptr, grad_ref_ptr,
    # shapes
    n,
    # constants
    ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    d = tl.load(lp_ptr + offs, mask=valid, other=0.0).to(tl.float32) - tl.load(
        ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if ESTIMATOR == _K1:
        dk = tl.full(d.shape, 1.0, tl.float32)
    elif ESTIMATOR == _K2:
        dk = d
    elif ESTIMATOR == _K3:
        dk = 1.0 - tl.exp(-d)
    else:
        dk = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))  # sign(d), 0 at d == 0 as torch.abs
    gd = g * dk
    tl.store(grad_lp_ptr + offs, cast_to(gd, grad_lp_ptr.dtype.element_ty, SOFT_BF16), mask=valid)
    tl.store(grad_ref_ptr + offs, cast_to(-gd, grad_ref_ptr.dtype.element_ty, SOFT_BF16), mask=valid)


def _config(n: int):
    # H100: 4 KiB of fp32 output per program, 4 warps -> 8 elements (two 16-byte vectors) per thread.
    return block(n, 1024, 4096), 4


def kl_penalty_forward(logprobs, ref_logprobs, estimator):
    lp, ref = logprobs.contiguous(), ref_logprobs.contiguous()
    out = torch.empty(lp.shape, dtype=torch.float32, device=lp.device)
    n = lp.numel()
    if n:
        blk, warps = _config(n)
        launch(_kl_fwd_kernel, (triton.cdiv(n, blk),), lp, ref, out, n,
               ESTIMATOR=code("kl_estimator", estimator), BLOCK=blk, num_warps=warps)
    return out


def kl_penalty_backward(grad, logprobs, ref_logprobs, estimator):
    lp, ref = logprobs.contiguous(), ref_logprobs.contiguous()
    grad_lp = torch.empty(lp.shape, dtype=lp.dtype, device=lp.device)
    grad_ref = torch.empty(ref.shape, dtype=ref.dtype, device=ref.device)
    n = lp.numel()
    if n:
        blk, warps = _config(n)
        launch(_kl_bwd_kernel, (triton.cdiv(n, blk),), grad.contiguous(), lp, ref, grad_lp, grad_ref, n,
               ESTIMATOR=code("kl_estimator", estimator), BLOCK=blk, SOFT_BF16=interpreting(), num_warps=warps)
    return grad_lp, grad_ref


@torch.library.custom_op(f"{NAMESPACE}::kl_penalty_fwd", mutates_args=())
def kl_penalty_fwd(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    return kl_penalty_forward(logprobs, ref_logprobs, estimator)


@kl_penalty_fwd.register_fake
def _(logprobs, ref_logprobs, estimator):
    return logprobs.new_empty(logprobs.shape, dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::kl_penalty_bwd", mutates_args=())
def kl_penalty_bwd(grad: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kl_penalty_backward(grad, logprobs, ref_logprobs, estimator)


@kl_penalty_bwd.register_fake
def _(grad, logprobs, ref_logprobs, estimator):
    return logprobs.new_empty(logprobs.shape), ref_logprobs.new_empty(ref_logprobs.shape)


def _setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, estimator = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.estimator = estimator


def _backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    grad_lp, grad_ref = kl_penalty_bwd(grad, logprobs, ref_logprobs, ctx.estimator)
    return grad_lp, grad_ref, None


kl_penalty_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_impl("triton", "kl_penalty")
def kl_penalty(logprobs, ref_logprobs, estimator):
    """Same contract as :func:`rlhf_kernels.reference.kl_penalty`."""
    return kl_penalty_fwd(logprobs, ref_logprobs, estimator)
