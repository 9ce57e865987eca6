"""Triton PPO clipped policy loss and clipped value loss (Schulman et al., 2017).

Forward, per op: a row kernel (one program per sequence, or per chunk of tokens for
``agg="token-mean"``) computes the per-token loss, masks it and reduces it in the same pass to
per-row partial sums ``[sum loss, n valid, sum stat...]``; one small finalize program turns the
partials into the loss and the stats.  Nothing leaves the GPU: no ``.item()``, so a training step
that calls these can be captured in a CUDA graph.

Backward, per op: one kernel recomputes the per-token terms from the inputs and writes every input
gradient.  The aggregation weight of a token (1 / n_valid for token-mean, 1 / (n_row * n_rows) for
seq-mean-token-mean, 1 / B for seq-mean-token-sum) is formed from the saved partial counts.

Gradients follow torch's conventions exactly where the reference has ties: max/min split the
gradient equally between equal arguments (the clipped and unclipped terms are equal whenever the
ratio is inside the clip range) and clamp passes the gradient on the closed interval.
Masked entries are never loaded, so NaN there reaches neither the loss nor the gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._registry import code, register_impl
from ._launch import NAMESPACE, block, cast_to, interpreting, launch

# The aggregation codes the kernels branch on, from the registry (constexpr globals, as Triton requires).
_TOKEN_MEAN = tl.constexpr(code("agg", "token-mean"))
_SEQ_MEAN_TOKEN_MEAN = tl.constexpr(code("agg", "seq-mean-token-mean"))
# Output layout of the finalize program: loss, three stat slots, n_valid, n_rows_with_tokens.
_OUT_SIZE = 6
_N_PARTIALS = 5
# Tokens per program for token-mean (rows then are chunks of the flat tensor).
_TOKEN_CHUNK = 4096


# ---------------------------------------------------------------------------------------------
# Per-token math shared by forward and backward


@triton.jit
def _policy_terms(lp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL: tl.constexpr):
    x = lp - old
    ratio = tl.exp(tl.minimum(tl.maximum(x, -20.0), 20.0))
    pg1 = -adv * ratio
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    pg2 = -adv * clipped_ratio
    pg_max = tl.maximum(pg1, pg2)
    pg = pg_max
    lower = tl.zeros_like(pg) != 0
    if HAS_DUAL:
        pg3 = -adv * dual_clip
        neg = adv < 0
        lower = neg & (pg_max > pg3)
        pg = tl.where(neg, tl.minimum(pg_max, pg3), pg_max)
    return x, ratio, pg1, clipped_ratio, pg2, pg_max, pg, lower


@triton.jit
def _value_terms(v, old, ret, clip, HAS_CLIP: tl.constexpr):
    l1 = (v - ret) * (v - ret)
    dv = v - old
    v_clip = v
    l2 = l1
    vf = l1
    clipped = tl.zeros_like(l1) != 0
    if HAS_CLIP:
        v_clip = old + tl.minimum(tl.maximum(dv, -clip), clip)
        l2 = (v_clip - ret) * (v_clip - ret)
        vf = tl.maximum(l1, l2)
        clipped = l2 > l1
    return dv, l1, v_clip, l2, vf, clipped


@triton.jit
def _split_max(g, a, b):
    """Gradient of max(a, b) to (a, b) as torch: equal arguments share it equally."""
    ga = tl.where(a > b, g, tl.where(a == b, 0.5 * g, 0.0))
    return ga, g - ga


@triton.jit
def _token_weight(out_ptr, partials_ptr, row, R, n_seq, AGG: tl.constexpr):
    """d loss / d (per-token loss) for a valid token of ``row``."""
    n_valid = tl.load(out_ptr + 4)
    if AGG == _TOKEN_MEAN:
        w = 1.0 / tl.maximum(n_valid, 1.0)
    elif AGG == _SEQ_MEAN_TOKEN_MEAN:
        n_row = tl.load(partials_ptr + R + row)
        w = 1.0 / (tl.maximum(n_row, 1.0) * tl.maximum(tl.load(out_ptr + 5), 1.0))
    else:
        w = 1.0 / n_seq
    return w


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _policy_fwd_kernel(
    # pointers: inputs [n] (rows of T contiguous tokens), mask [n] uint8, partials [5, R] fp32
    lp_ptr, old_ptr, adv_ptr, mask_ptr, partials_ptr,
    # shapes: R rows of T tokens, n tokens in all
    R, T, n,
    # constants
    clip_low, clip_high, dual_clip,
    HAS_DUAL: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    acc_loss = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_lower = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        offs = base + t
        in_row = (t < T) & (offs < n)
        m = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
        lp = tl.load(lp_ptr + offs, mask=m, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=m, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + offs, mask=m, other=0.0).to(tl.float32)
        _, _, pg1, _, pg2, _, pg, lower = _policy_terms(lp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL)
        acc_loss += tl.where(m, pg, 0.0)
        acc_n += m.to(tl.float32)
        acc_clip += (m & (pg2 > pg1)).to(tl.float32)
        acc_lower += (m & lower).to(tl.float32)
        acc_kl += tl.where(m, old - lp, 0.0)
    tl.store(partials_ptr + row, tl.sum(acc_loss, axis=0))
    tl.store(partials_ptr + R + row, tl.sum(acc_n, axis=0))
    tl.store(partials_ptr + 2 * R + row, tl.sum(acc_clip, axis=0))
    tl.store(partials_ptr + 3 * R + row, tl.sum(acc_lower, axis=0))
    tl.store(partials_ptr + 4 * R + row, tl.sum(acc_kl, axis=0))


@triton.jit
def _policy_bwd_kernel(
    # pointers: grad of the finalize output [6], inputs [n], mask [n] uint8, saved out [6] and
    # partials [5, R], gradients [n] in the inputs' dtypes
    grad_out_ptr, lp_ptr, old_ptr, adv_ptr, mask_ptr, out_ptr, partials_ptr,
    grad_lp_ptr, grad_old_ptr, grad_adv_ptr,
    # shapes
    R, T, n,
    # constants: n_seq = max(R, 1) as a float
    n_seq, clip_low, clip_high, dual_clip,
    HAS_DUAL: tl.constexpr, AGG: tl.constexpr, BLOCK_T: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    g_row = tl.load(grad_out_ptr).to(tl.float32) * _token_weight(out_ptr, partials_ptr, row, R, n_seq, AGG)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        offs = base + t
        in_row = (t < T) & (offs < n)
        m = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
        lp = tl.load(lp_ptr + offs, mask=m, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=m, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + offs, mask=m, other=0.0).to(tl.float32)
        x, ratio, pg1, clipped_ratio, pg2, pg_max, _pg, _lower = _policy_terms(
            lp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL)
        g_pg = tl.where(m, g_row, 0.0)
        g_adv = tl.zeros_like(g_pg)
        g_max = g_pg
        if HAS_DUAL:
            # pg = where(adv < 0, min(pg_max, pg3), pg_max)
            pg3 = -adv * dual_clip
            g_min_max, g_pg3 = _split_max(g_pg, pg3, pg_max)  # min(a, b) = -max(-a, -b)
            g_max = tl.where(adv < 0, g_min_max, g_pg)
            g_adv += tl.where(adv < 0, -dual_clip * g_pg3, 0.0)
        g1, g2 = _split_max(g_max, pg1, pg2)
        g_ratio = -adv * g1
        g_ratio += tl.where((ratio >= 1.0 - clip_low) & (ratio <= 1.0 + clip_high), -adv * g2, 0.0)
        g_adv += -ratio * g1 - clipped_ratio * g2
        g_x = tl.where((x >= -20.0) & (x <= 20.0), ratio * g_ratio, 0.0)
        tl.store(grad_lp_ptr + offs, cast_to(g_x, grad_lp_ptr.dtype.element_ty, SOFT_BF16), mask=in_row)
        tl.store(grad_old_ptr + offs, cast_to(-g_x, grad_old_ptr.dtype.element_ty, SOFT_BF16), mask=in_row)
        tl.store(grad_adv_ptr + offs, cast_to(g_adv, grad_adv_ptr.dtype.element_ty, SOFT_BF16), mask=in_row)


@triton.jit
def _value_fwd_kernel(
    # pointers: inputs [n], mask [n] uint8, partials [5, R] fp32 (two stat slots unused)
    v_ptr, old_ptr, ret_ptr, mask_ptr, partials_ptr,
    # shapes
    R, T, n,
    # constants
    clip,
    HAS_CLIP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    acc_loss = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        offs = base + t
        in_row = (t < T) & (offs < n)
        m = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
        v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=m, other=0.0).to(tl.float32)
        ret = tl.load(ret_ptr + offs, mask=m, other=0.0).to(tl.float32)
        _, _, _, _, vf, clipped = _value_terms(v, old, ret, clip, HAS_CLIP)
        acc_loss += tl.where(m, vf, 0.0)
        acc_n += m.to(tl.float32)
        acc_clip += (m & clipped).to(tl.float32)
    tl.store(partials_ptr + row, tl.sum(acc_loss, axis=0))
    tl.store(partials_ptr + R + row, tl.sum(acc_n, axis=0))
    tl.store(partials_ptr + 2 * R + row, tl.sum(acc_clip, axis=0))
    tl.store(partials_ptr + 3 * R + row, 0.0)
    tl.store(partials_ptr + 4 * R + row, 0.0)


@triton.jit
def _value_bwd_kernel(
    # pointers: as _policy_bwd_kernel
    grad_out_ptr, v_ptr, old_ptr, ret_ptr, mask_ptr, out_ptr, partials_ptr,
    grad_v_ptr, grad_old_ptr, grad_ret_ptr,
    # shapes
    R, T, n,
    # constants: n_seq = max(R, 1) as a float
    n_seq, clip, loss_scale,
    HAS_CLIP: tl.constexpr, AGG: tl.constexpr, BLOCK_T: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    g_row = tl.load(grad_out_ptr).to(tl.float32) * loss_scale * _token_weight(out_ptr, partials_ptr, row, R, n_seq, AGG)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        offs = base + t
        in_row = (t < T) & (offs < n)
        m = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
        v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=m, other=0.0).to(tl.float32)
        ret = tl.load(ret_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dv, l1, v_clip, l2, _vf, _clipped = _value_terms(v, old, ret, clip, HAS_CLIP)
        g_vf = tl.where(m, g_row, 0.0)
        g1 = g_vf
        g2 = tl.zeros_like(g_vf)
        if HAS_CLIP:
            g1, g2 = _split_max(g_vf, l1, l2)
        d1 = 2.0 * (v - ret) * g1  # d l1 / d v
        d2 = 2.0 * (v_clip - ret) * g2  # d l2 / d v_clip
        inside = (dv >= -clip) & (dv <= clip)
        g_through = tl.where(inside, d2, 0.0)
        g_v = d1 + g_through
        g_old = d2 - g_through
        g_ret = -d1 - d2
        tl.store(grad_v_ptr + offs, cast_to(g_v, grad_v_ptr.dtype.element_ty, SOFT_BF16), mask=in_row)
        tl.store(grad_old_ptr + offs, cast_to(g_old, grad_old_ptr.dtype.element_ty, SOFT_BF16), mask=in_row)
        tl.store(grad_ret_ptr + offs, cast_to(g_ret, grad_ret_ptr.dtype.element_ty, SOFT_BF16), mask=in_row)


@triton.jit
def _finalize_kernel(
    # pointers: partials [5, R] fp32, output [6] fp32
    partials_ptr, out_ptr,
    # shapes
    R,
    # constants: n_seq = max(R, 1) as a float, the divisor of seq-mean-token-sum
    n_seq, loss_scale,
    AGG: tl.constexpr, BLOCK_R: tl.constexpr,
):
    acc_loss = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_rows = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_s0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_s1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_s2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        ok = r < R
        row_loss = tl.load(partials_ptr + r, mask=ok, other=0.0)
        row_n = tl.load(partials_ptr + R + r, mask=ok, other=0.0)
        if AGG == _SEQ_MEAN_TOKEN_MEAN:
            row_loss = tl.where(row_n > 0, row_loss / tl.maximum(row_n, 1.0), 0.0)
        acc_loss += row_loss
        acc_n += row_n
        acc_rows += (row_n > 0).to(tl.float32)
        acc_s0 += tl.load(partials_ptr + 2 * R + r, mask=ok, other=0.0)
        acc_s1 += tl.load(partials_ptr + 3 * R + r, mask=ok, other=0.0)
        acc_s2 += tl.load(partials_ptr + 4 * R + r, mask=ok, other=0.0)
    total = tl.sum(acc_loss, axis=0)
    n_valid = tl.sum(acc_n, axis=0)
    n_rows = tl.sum(acc_rows, axis=0)
    denom_n = tl.maximum(n_valid, 1.0)
    if AGG == _TOKEN_MEAN:
        loss = total / denom_n
    elif AGG == _SEQ_MEAN_TOKEN_MEAN:
        loss = total / tl.maximum(n_rows, 1.0)
    else:
        loss = total / n_seq
    tl.store(out_ptr, loss * loss_scale)
    tl.store(out_ptr + 1, tl.sum(acc_s0, axis=0) / denom_n)
    tl.store(out_ptr + 2, tl.sum(acc_s1, axis=0) / denom_n)
    tl.store(out_ptr + 3, tl.sum(acc_s2, axis=0) / denom_n)
    tl.store(out_ptr + 4, n_valid)
    tl.store(out_ptr + 5, n_rows)


# ---------------------------------------------------------------------------------------------
# Launchers


def _layout(shape, agg: str):
    """(R, T, n): sequences for the seq-* aggregations, fixed-size chunks for token-mean."""
    n = 1
    for s in shape:
        n *= s
    if agg == "token-mean":
        T = _TOKEN_CHUNK
        return triton.cdiv(n, T), T, n
    B, T = shape
    return B, T, n


def _row_config(T: int):
    # H100: up to 1024 tokens per iteration with 4 warps (8 fp32 per thread, vector loads).
    return block(T, 1024, 4096), 4


def _finalize(partials, R, agg, loss_scale, device):
    out = torch.empty(_OUT_SIZE, dtype=torch.float32, device=device)
    launch(_finalize_kernel, (1,), partials, out, R, float(max(R, 1)), float(loss_scale), AGG=code("agg", agg),
           BLOCK_R=block(R, 1024, 1024), num_warps=4)
    return out


def ppo_policy_loss_forward(lp, old, adv, mask, clip_low, clip_high, dual_clip, agg):
    R, T, n = _layout(lp.shape, agg)
    partials = torch.empty((_N_PARTIALS, R), dtype=torch.float32, device=lp.device)
    if R:
        blk, warps = _row_config(T)
        launch(_policy_fwd_kernel, (R,),
            lp.contiguous(), old.contiguous(), adv.contiguous(), mask.contiguous().view(torch.uint8), partials,
            R, T, n, float(clip_low), float(clip_high), float(dual_clip or 0.0),
            HAS_DUAL=dual_clip is not None, BLOCK_T=blk, num_warps=warps)
    return _finalize(partials, R, agg, 1.0, lp.device), partials


def ppo_policy_loss_backward(grad_out, lp, old, adv, mask, out, partials, clip_low, clip_high, dual_clip, agg):
    R, T, n = _layout(lp.shape, agg)
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (lp, old, adv)]
    if R:
        blk, warps = _row_config(T)
        launch(_policy_bwd_kernel, (R,),
            grad_out.contiguous(), lp.contiguous(), old.contiguous(), adv.contiguous(),
            mask.contiguous().view(torch.uint8), out, partials, *grads,
            R, T, n, float(max(R, 1)), float(clip_low), float(clip_high), float(dual_clip or 0.0),
            HAS_DUAL=dual_clip is not None, AGG=code("agg", agg), BLOCK_T=blk, SOFT_BF16=interpreting(),
            num_warps=warps)
    return tuple(grads)


_VALUE_SCALE = 0.5  # loss = 0.5 * agg(vf)


def ppo_value_loss_forward(v, old, ret, mask, clip, agg):
    R, T, n = _layout(v.shape, agg)
    partials = torch.empty((_N_PARTIALS, R), dtype=torch.float32, device=v.device)
    if R:
        blk, warps = _row_config(T)
        launch(_value_fwd_kernel, (R,),
            v.contiguous(), old.contiguous(), ret.contiguous(), mask.contiguous().view(torch.uint8), partials,
            R, T, n, float(clip or 0.0), HAS_CLIP=clip is not None, BLOCK_T=blk, num_warps=warps)
    return _finalize(partials, R, agg, _VALUE_SCALE, v.device), partials


def ppo_value_loss_backward(grad_out, v, old, ret, mask, out, partials, clip, agg):
    R, T, n = _layout(v.shape, agg)
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (v, old, ret)]
    if R:
        blk, warps = _row_config(T)
        launch(_value_bwd_kernel, (R,),
            grad_out.contiguous(), v.contiguous(), old.contiguous(), ret.contiguous(),
            mask.contiguous().view(torch.uint8), out, partials, *grads,
            R, T, n, float(max(R, 1)), float(clip or 0.0), _VALUE_SCALE,
            HAS_CLIP=clip is not None, AGG=code("agg", agg), BLOCK_T=blk, SOFT_BF16=interpreting(),
            num_warps=warps)
    return tuple(grads)


# ---------------------------------------------------------------------------------------------
# Registration with torch.library


def _partials_like(x, agg):
    R, _, _ = _layout(x.shape, agg)
    return x.new_empty((_N_PARTIALS, R), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::ppo_policy_loss_fwd", mutates_args=())
def ppo_policy_loss_fwd(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_low: float, clip_high: float, dual_clip: Optional[float],
                        agg: str) -> tuple[torch.Tensor, torch.Tensor]:
    return ppo_policy_loss_forward(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg)


@ppo_policy_loss_fwd.register_fake
def _(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg):
    return logprobs.new_empty(_OUT_SIZE, dtype=torch.float32), _partials_like(logprobs, agg)


@torch.library.custom_op(f"{NAMESPACE}::ppo_policy_loss_bwd", mutates_args=())
def ppo_policy_loss_bwd(grad_out: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        advantages: torch.Tensor, mask: torch.Tensor, out: torch.Tensor, partials: torch.Tensor,
                        clip_low: float, clip_high: float, dual_clip: Optional[float],
                        agg: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ppo_policy_loss_backward(grad_out, logprobs, old_logprobs, advantages, mask, out, partials, clip_low,
                           clip_high, dual_clip, agg)


@ppo_policy_loss_bwd.register_fake
def _(grad_out, logprobs, old_logprobs, advantages, mask, out, partials, clip_low, clip_high, dual_clip, agg):
    return tuple(t.new_empty(t.shape) for t in (logprobs, old_logprobs, advantages))


def _policy_setup(ctx, inputs, output):
    logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg = inputs
    out, partials = output
    ctx.save_for_backward(logprobs, old_logprobs, advantages, mask, out, partials)
    ctx.args = (clip_low, clip_high, dual_clip, agg)


def _policy_backward(ctx, grad_out, grad_partials):
    logprobs, old_logprobs, advantages, mask, out, partials = ctx.saved_tensors
    grads = ppo_policy_loss_bwd(grad_out, logprobs, old_logprobs, advantages, mask, out, partials, *ctx.args)
    return (*grads, None, None, None, None, None)


ppo_policy_loss_fwd.register_autograd(_policy_backward, setup_context=_policy_setup)


@torch.library.custom_op(f"{NAMESPACE}::ppo_value_loss_fwd", mutates_args=())
def ppo_value_loss_fwd(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: Optional[float], agg: str) -> tuple[torch.Tensor, torch.Tensor]:
    return ppo_value_loss_forward(values, old_values, returns, mask, clip, agg)


@ppo_value_loss_fwd.register_fake
def _(values, old_values, returns, mask, clip, agg):
    return values.new_empty(_OUT_SIZE, dtype=torch.float32), _partials_like(values, agg)


@torch.library.custom_op(f"{NAMESPACE}::ppo_value_loss_bwd", mutates_args=())
def ppo_value_loss_bwd(grad_out: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
                       returns: torch.Tensor, mask: torch.Tensor, out: torch.Tensor, partials: torch.Tensor,
                       clip: Optional[float], agg: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ppo_value_loss_backward(grad_out, values, old_values, returns, mask, out, partials, clip, agg)


@ppo_value_loss_bwd.register_fake
def _(grad_out, values, old_values, returns, mask, out, partials, clip, agg):
    return tuple(t.new_empty(t.shape) for t in (values, old_values, returns))


def _value_setup(ctx, inputs, output):
    values, old_values, returns, mask, clip, agg = inputs
    out, partials = output
    ctx.save_for_backward(values, old_values, returns, mask, out, partials)
    ctx.args = (clip, agg)


def _value_backward(ctx, grad_out, grad_partials):
    values, old_values, returns, mask, out, partials = ctx.saved_tensors
    grads = ppo_value_loss_bwd(grad_out, values, old_values, returns, mask, out, partials, *ctx.args)
    return (*grads, None, None, None)


ppo_value_loss_fwd.register_autograd(_value_backward, setup_context=_value_setup)


# ---------------------------------------------------------------------------------------------
# Backend entry points (arguments already validated by rlhf_kernels._api)


@register_impl("triton", "ppo_policy_loss")
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg):
    """Same contract as :func:`rlhf_kernels.reference.ppo_policy_loss`."""
    out, _ = ppo_policy_loss_fwd(logprobs, old_logprobs, advantages, mask.bool(), float(clip_low),
                                 float(clip_high), None if dual_clip is None else float(dual_clip), agg)
    stats = out.detach()
    return out[0], {"clipfrac": stats[1], "clipfrac_lower": stats[2], "approx_kl": stats[3]}


@register_impl("triton", "ppo_value_loss")
def ppo_value_loss(values, old_values, returns, mask, clip, agg):
    """Same contract as :func:`rlhf_kernels.reference.ppo_value_loss`."""
    out, _ = ppo_value_loss_fwd(values, old_values, returns, mask.bool(), None if clip is None else float(clip), agg)
    return out[0], {"clipfrac": out.detach()[1]}
