"""Triton token log-probs and entropy: one pass over each row of logits, forward and backward.

Forward, one program per row (token): an online log-sum-exp in fp32 reads the row once in blocks
of ``BLOCK_V``, keeps the running max ``m`` and the running sum ``s = sum exp(z - m)`` and, for the
entropy, ``w = sum exp(z - m) * (z - m)``; the label logit is one extra load.  Then

    lse = m + log(s),    logprob = z[label] - lse,    entropy = log(s) - w / s.

Keeping ``w`` relative to the running max (rescaled when the max moves) avoids computing the
entropy as lse - sum(p * z), a difference of two large numbers for peaked rows.

Backward re-reads the row with the saved lse (and entropy) and writes the logits gradient directly,
in the logits dtype: no fp32 ``[N, V]`` temporary exists at any point.  Rows whose label is
``ignore_index`` read nothing and write zeros.

Offsets: the row index is cast to int64 before it is multiplied by a stride, so tokens x vocab
beyond 2^31 elements address correctly.  Logits may be any strided ``[..., V]`` view (for instance
``logits[:, :-1]``): the kernel takes up to two leading strides, so such views are not copied.  A
vocabulary stride other than 1 (``big[:, ::2]``, a transposed layout) is multiplied in int64 too:
``cols * stride_v`` in int32 would wrap for V = 128256 and a stride of 32768.  The common stride-1
case is a compile-time branch (``VOCAB_CONTIG``) that keeps 32-bit column offsets.

Labels out of ``[0, V)`` (other than ``ignore_index``) reach the kernel only from callers that skip
the Python check (CUDA tensors without ``RLHF_KERNELS_DEBUG=1``, or direct ``torch.ops`` calls):
the label load is masked, never out of bounds, and the row's log-prob is NaN.  Its entropy and
lse are computed as usual, and backward gives that row ``-softmax(z) * g / temperature`` (plus
the entropy term): there is no label column to add the one-hot to.  The CUDA kernel does the same.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._registry import register_impl
from ._launch import NAMESPACE, block, cast_to, interpreting, launch

# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _token_logprobs_fwd_kernel(
    # pointers: logits [A, T, V] (strided), labels [A*T] int64, outputs [A*T] fp32
    logits_ptr, labels_ptr, logprob_ptr, lse_ptr, entropy_ptr,
    # shapes
    T, V,
    # strides of logits
    stride_a, stride_t, stride_v,
    # constants
    temperature, ignore_index,
    RETURN_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, VOCAB_CONTIG: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may exceed 2^31
    a = row // T
    t = row % T
    row_ptr = logits_ptr + a * stride_a + t * stride_t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    n_cols = tl.where(valid, V, 0)  # ignored rows read nothing

    m = -float("inf")  # running max of z (fp32)
    s = 0.0  # sum exp(z - m)
    w = 0.0  # sum exp(z - m) * (z - m)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        if VOCAB_CONTIG:
            offs = cols
        else:
            offs = cols.to(tl.int64) * stride_v  # int32 would wrap past 2^31
        x = tl.load(row_ptr + offs, mask=cols < V, other=-float("inf"))
        z = x.to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A finite reference point even while every value so far is -inf.
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)
        if RETURN_ENTROPY:
            # Rescale w to the new max: sum e'(z - m') = alpha * (w + (m - m') * s).
            shift = tl.where(s > 0, (m - m_ref) * s, 0.0)
            # -inf logits carry no mass: 0 * -inf must not become NaN.
            ez = tl.where(e > 0, e * (z - m_ref), 0.0)
            w = alpha * (w + shift) + tl.sum(ez, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

    m_ref = tl.where(m == -float("inf"), 0.0, m)
    log_s = tl.log(tl.where(valid, s, 1.0))  # ignored rows: s = 0
    lse = m_ref + log_s
    # Out-of-range labels (only from callers that skipped the Python check) load nothing: NaN.
    in_range = (label >= 0) & (label < V)
    safe_label = tl.where(valid & in_range, label, 0)  # int64: safe_label * stride_v cannot wrap
    x_label = tl.load(row_ptr + safe_label * stride_v, mask=valid & in_range, other=0.0)
    z_label = x_label.to(tl.float32) / temperature
    logprob = tl.where(in_range, z_label - lse, float("nan"))
    tl.store(logprob_ptr + row, tl.where(valid, logprob, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, log_s - w / tl.where(valid, s, 1.0), 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    # pointers: upstream grads [A*T], logits [A, T, V] (strided), labels, saved lse/entropy,
    # output grad_logits [A*T, V] contiguous
    grad_lp_ptr, grad_ent_ptr, logits_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_logits_ptr,
    # shapes
    T, V,
    # strides of logits
    stride_a, stride_t, stride_v,
    # constants
    temperature, ignore_index,
    HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr, BLOCK_V: tl.constexpr, SOFT_BF16: tl.constexpr,
    VOCAB_CONTIG: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a = row // T
    t = row % T
    row_ptr = logits_ptr + a * stride_a + t * stride_t
    out_ptr = grad_logits_ptr + row * V
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row)
    g_lp = 0.0
    if HAS_GRAD_LP:
        g_lp = tl.where(valid, tl.load(grad_lp_ptr + row).to(tl.float32), 0.0)
    g_ent = 0.0
    h = 0.0
    if HAS_GRAD_ENT:
        g_ent = tl.where(valid, tl.load(grad_ent_ptr + row).to(tl.float32), 0.0)
        h = tl.load(entropy_ptr + row)
    n_read = tl.where(valid, V, 0)  # ignored rows load nothing (p = 0 everywhere), write zeros
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        if VOCAB_CONTIG:
            offs = cols
        else:
            offs = cols.to(tl.int64) * stride_v  # int32 would wrap past 2^31
        x = tl.load(row_ptr + offs, mask=cols < n_read, other=-float("inf"))
        z = x.to(tl.float32) / temperature
        log_p = z - lse
        p = tl.exp(log_p)
        # d logprob / dz = onehot(label) - p (no one-hot for a label out of [0, V)), formed in fp32 before the one rounding to the
        # logits dtype (in bf16, 1 - p would cancel as p -> 1).
        g = tl.where(cols == label, g_lp, 0.0) - p * g_lp
        if HAS_GRAD_ENT:
            # d H / dz = -p * (log p + H); entries with p == 0 (-inf logits) contribute nothing.
            g += tl.where(p > 0, -p * (log_p + h), 0.0) * g_ent
        g = g / temperature
        tl.store(out_ptr + cols, cast_to(g, grad_logits_ptr.dtype.element_ty, SOFT_BF16), mask=in_row)


# ---------------------------------------------------------------------------------------------
# Launchers


def _config(logits: torch.Tensor):
    V = logits.shape[-1]
    # H100: 8192 two-byte or 4096 four-byte elements per iteration (16 KiB in flight per program,
    # 16-byte vector loads per thread); fewer warps for small vocabularies.
    block_v = block(V, 8192 if logits.element_size() <= 2 else 4096, 2048)
    num_warps = 4 if block_v <= 1024 else (8 if block_v <= 4096 else 16)
    return block_v, num_warps


def token_logprobs_forward(logits, labels, temperature, ignore_index, return_entropy):
    """logits [A, T, V] (any strides), labels [A*T] int64 -> (logprob, lse, entropy) fp32 [A*T];
    entropy is an empty tensor when not requested."""
    A, T, V = logits.shape
    n = A * T
    logprob = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(n if return_entropy else 0, dtype=torch.float32, device=logits.device)
    if n == 0:
        return logprob, lse, entropy
    block_v, num_warps = _config(logits)
    launch(_token_logprobs_fwd_kernel, (n,),
        logits, labels, logprob, lse, entropy if return_entropy else logprob,
        T, V,
        logits.stride(0), logits.stride(1), logits.stride(2),
        float(temperature), int(ignore_index),
        RETURN_ENTROPY=bool(return_entropy), BLOCK_V=block_v, VOCAB_CONTIG=logits.stride(2) == 1,
        num_warps=num_warps,
    )
    return logprob, lse, entropy


def token_logprobs_backward(grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature,
                            ignore_index):
    A, T, V = logits.shape
    n = A * T
    grad_logits = torch.empty((A, T, V), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad_logits
    has_lp = grad_logprob is not None
    has_ent = grad_entropy is not None and entropy.numel() == n
    g_lp = grad_logprob.contiguous() if has_lp else lse
    g_ent = grad_entropy.contiguous() if has_ent else lse
    block_v, num_warps = _config(logits)
    launch(_token_logprobs_bwd_kernel, (n,),
        g_lp, g_ent, logits, labels, lse, entropy if has_ent else lse, grad_logits,
        T, V,
        logits.stride(0), logits.stride(1), logits.stride(2),
        float(temperature), int(ignore_index),
        HAS_GRAD_LP=has_lp, HAS_GRAD_ENT=has_ent, BLOCK_V=block_v, SOFT_BF16=interpreting(),
        VOCAB_CONTIG=logits.stride(2) == 1, num_warps=num_warps,
    )
    return grad_logits


# ---------------------------------------------------------------------------------------------
# Registration with torch.library (opaque to torch.compile, with fake implementations)


@torch.library.custom_op(f"{NAMESPACE}::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                       return_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return token_logprobs_forward(logits, labels, temperature, ignore_index, return_entropy)


@token_logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, return_entropy):
    n = logits.shape[0] * logits.shape[1]
    return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n if return_entropy else 0, dtype=torch.float32))


@torch.library.custom_op(f"{NAMESPACE}::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(grad_logprob: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                       logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                       temperature: float, ignore_index: int) -> torch.Tensor:
    return token_logprobs_backward(grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature,
                                   ignore_index)


@token_logprobs_bwd.register_fake
def _(grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, return_entropy = inputs
    _, lse, entropy = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.return_entropy = return_entropy


def _backward(ctx, grad_logprob, grad_lse, grad_entropy):
    logits, labels, lse, entropy = ctx.saved_tensors
    if not ctx.return_entropy:
        grad_entropy = None
    grad = token_logprobs_bwd(grad_logprob, grad_entropy, logits, labels, lse, entropy, ctx.temperature,
                              ctx.ignore_index)
    return grad, None, None, None, None


token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Backend entry point (arguments already validated by rlhf_kernels._api)


def _as_3d(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> a [A, T, V] view without copying where the strides allow it."""
    lead = logits.shape[:-1]
    V = logits.shape[-1]
    if len(lead) == 0:
        return logits.unsqueeze(0).unsqueeze(0)
    if len(lead) == 1:
        return logits.unsqueeze(0)
    if len(lead) == 2:
        return logits
    try:
        return logits.view(-1, lead[-1], V)
    except RuntimeError:
        return logits.reshape(-1, lead[-1], V)  # leading dims that cannot be merged: one copy


@register_impl("triton", "token_logprobs")
def token_logprobs(logits, labels, temperature, ignore_index, return_entropy):
    """Same contract as :func:`rlhf_kernels.reference.token_logprobs`: returns (logprobs, entropy
    or None), each shaped like ``labels``."""
    logprob, _, entropy = token_logprobs_fwd(_as_3d(logits), labels.reshape(-1).long().contiguous(),
                                             float(temperature), int(ignore_index), bool(return_entropy))
    logprob = logprob.view(labels.shape)
    if return_entropy:
        return logprob, entropy.view(labels.shape)
    return logprob, None
