"""Triton linear token log-probs: the LM-head matmul fused with the log-softmax fold.

With ``y = hidden @ weight.T (+ bias)``, ``z = logit_scale * y``, then (soft-cap ``c > 0``)
``z = c * tanh(z / c)``, then ``z = z / temperature``, each valid row gets

    lse = logsumexp(z),  logprob = z[label] - lse,  entropy = H(softmax(z)),
    mean_logit = mean(z),  is_top1 = (argmax(z) == label)  (first index wins a tie),

and the ``[N, V]`` logits never exist in global memory.

Valid rows (``label != ignore_index``) are compacted on the device without a host sync: a stable
argsort puts their indices first and their count stays a device scalar that every kernel loads.
A program whose token tile starts past the count does no matmul work, so ignored rows cost nothing
beyond that check.

Forward (``_fwd_kernel``), one program per tile of ``BLOCK_M`` compacted rows: for each vocabulary
tile of ``BLOCK_N`` columns the logits tile is computed with ``tl.dot`` over ``BLOCK_K`` chunks of H
(fp32 accumulator; bf16/fp16 operands fed to the tensor cores as they are, fp32 operands in IEEE
precision, not TF32), scaled / soft-capped / divided by the temperature in registers, and folded
into per-row running statistics: max ``m``, ``s = sum exp(z - m)``, ``w = sum exp(z - m) (z - m)``
(entropy = log s - w / s, rescaled when the max moves), ``sum z``, the label logit and a running
argmax (strictly greater replaces, so the earlier tile wins a tie; inside a tile the smallest
column among the maxima).

Backward recomputes the logits tiles.  The vocabulary is processed in chunks of ``C`` columns (a
host loop); for each chunk three kernels run, each deterministic (no atomics, a fixed summation
order):

1. ``_gy_kernel`` (grid: token tiles x vocabulary tiles of the chunk) recomputes z and writes
   ``g_y = dL/dy`` for the chunk into an fp32 buffer ``[N, C]`` (rows in compacted order);
2. ``_grad_hidden_kernel`` (grid: token tiles x H tiles) adds ``g_y @ weight[chunk]`` into an fp32
   ``[N, H]`` accumulator (the hidden gradient itself for fp32 inputs);
3. ``_grad_weight_kernel`` (grid: vocabulary tiles of the chunk x H tiles) writes
   ``weight.grad[chunk] = g_y.T @ hidden[valid]``, summing over all valid tokens in registers; the
   bias gradient of the chunk is the fp32 column sum of the buffer.

Extra memory: ``4 * N * C`` bytes for the ``g_y`` buffer (C is chosen so this stays near 128 MiB on
a GPU, whatever V), plus an fp32 ``[N, H]`` accumulator for bf16/fp16 inputs, plus O(N) for the
row index, lse and entropy: O(N * (H + C)), independent of V.  The g_y operand is rounded to the
input dtype before the two gradient matmuls (as the logits gradient of the unfused computation
would be); the products accumulate in fp32 across vocabulary chunks and token tiles.

Opt-in gradient filtering (``filter_eps > 0`` in :func:`linear_token_logprobs_backward`; the
registered op always runs the exact path): ``_gy_kernel`` flags each ``BLOCK_M x BLOCK_N`` block
whose probabilities are all below ``filter_eps`` and that holds no label, writes zeros for it, and
the two gradient kernels skip the flagged blocks' products (one int8 flag per block of a chunk).

Labels out of ``[0, V)`` (only from callers that skip the Python check) give a NaN log-prob for
that row, like ``token_logprobs``; its gradient has no one-hot term.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._registry import ops as _declared_ops
from .._registry import register_impl
from ._launch import NAMESPACE, cast_to, interpreting, launch

# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tanh(x):
    """tanh through exp2, saturating cleanly: exp2 overflows to inf for large x (-> 1) and
    underflows to 0 for very negative x (-> -1)."""
    e = tl.exp2(x * 2.8853900817779268)  # exp(2x) = 2^(2x / ln 2)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32.  Triton's interpreter mishandles bf16 operands of tl.dot, so under it
    (``UPCAST``) the operands are widened first: a bf16/fp16 product is exact in fp32, so the
    result is the one the tensor cores give."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, H, stride_h, stride_w,
                 logit_scale, softcap, temperature,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """z for rows x cols (fp32 [BLOCK_M, BLOCK_N]) and the tanh of the soft-cap (1.0 without it).
    ``rows`` and ``cols`` are int64 row indices of hidden and weight."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_mask[None, :] & k_mask[:, None],
                    other=0.0)
        acc = _dot(a, b, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = acc * logit_scale
    t = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
    if SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    return z / temperature, t


@triton.jit
def _fwd_kernel(
    # pointers: hidden [N, H], weight [V, H], bias [V], labels [N] int64, compacted row order [N]
    # int64, valid-row count [1], outputs [N]
    h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr,
    logprob_ptr, lse_ptr, entropy_ptr, mean_ptr, top1_ptr,
    H, V, stride_h, stride_w,
    logit_scale, softcap, temperature,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_EXTRAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    n_valid = tl.load(count_ptr)
    offs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs < n_valid
    rows = tl.load(order_ptr + offs, mask=row_mask, other=0)
    label = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    n_cols = tl.where(pid * BLOCK_M < n_valid, V, 0)  # tiles of ignored rows do no work

    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    w = tl.zeros((BLOCK_M,), tl.float32)
    z_sum = tl.zeros((BLOCK_M,), tl.float32)
    z_label = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    best_idx = tl.full((BLOCK_M,), -1, tl.int64)
    for n0 in range(0, n_cols, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < V
        z, _ = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, H, stride_h, stride_w,
                            logit_scale, softcap, temperature, HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K,
                            PRECISION, UPCAST)
        z = tl.where(col_mask[None, :], z, -float("inf"))
        tile_max = tl.max(z, axis=1)
        m_new = tl.maximum(m, tile_max)
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref[:, None])
        if WITH_ENTROPY:
            # sum e'(z - m') over the old columns = alpha * (w + (m - m') * s)
            shift = tl.where(s > 0, (m - m_ref) * s, 0.0)
            ez = tl.where(e > 0, e * (z - m_ref[:, None]), 0.0)
            w = alpha * (w + shift) + tl.sum(ez, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        z_label += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
        if WITH_EXTRAS:
            z_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
            tile_idx = tl.min(tl.where(z == tile_max[:, None], cols[None, :], V), axis=1)
            better = tile_max > best  # strictly: an earlier tile keeps a tie
            best_idx = tl.where(better, tile_idx, best_idx)
            best = tl.where(better, tile_max, best)

    log_s = tl.log(tl.where(row_mask, s, 1.0))
    lse = tl.where(m == -float("inf"), 0.0, m) + log_s
    in_range = (label >= 0) & (label < V)
    logprob = tl.where(in_range, z_label - lse, float("nan"))
    tl.store(logprob_ptr + rows, logprob, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, log_s - w / tl.where(row_mask, s, 1.0), mask=row_mask)
    if WITH_EXTRAS:
        tl.store(mean_ptr + rows, z_sum / V, mask=row_mask)
        tl.store(top1_ptr + rows, (best_idx == label).to(tl.int8), mask=row_mask)


@triton.jit
def _gy_kernel(
    # g_y for the columns [c0, c0 + C) of the compacted rows, into gy [N, C] fp32 (compacted order)
    grad_lp_ptr, grad_ent_ptr, h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr, lse_ptr, entropy_ptr,
    gy_ptr, keep_ptr,
    H, V, C, c0, stride_h, stride_w, n_tiles_n,
    logit_scale, softcap, temperature, filter_eps,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_valid = tl.load(count_ptr)
    if pid_m * BLOCK_M < n_valid:
        offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs < n_valid
        rows = tl.load(order_ptr + offs, mask=row_mask, other=0)
        label = tl.load(labels_ptr + rows, mask=row_mask, other=0)
        local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = c0 + local.to(tl.int64)
        in_chunk = local < C
        col_mask = in_chunk & (cols < V)
        z, t = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, H, stride_h, stride_w,
                            logit_scale, softcap, temperature, HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K,
                            PRECISION, UPCAST)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        g_lp = tl.load(grad_lp_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        log_p = z - lse[:, None]
        p = tl.exp(log_p)
        g = tl.where(cols[None, :] == label[:, None], g_lp[:, None], 0.0) - p * g_lp[:, None]
        if HAS_GRAD_ENT:
            g_ent = tl.load(grad_ent_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            ent = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
            g += tl.where(p > 0, -p * (log_p + ent[:, None]), 0.0) * g_ent[:, None]
        # dz/dy = logit_scale * (1 - tanh^2) / temperature
        g = g * (logit_scale / temperature)
        if SOFTCAP:
            g = g * (1.0 - t * t)
        g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
        if FILTER:
            # Opt-in: drop the block when every probability in it is below filter_eps and it holds
            # no label; the grad kernels then skip its products (flag 0).
            live = row_mask[:, None] & col_mask[None, :]
            p_max = tl.max(tl.max(tl.where(live, p, 0.0), axis=1), axis=0)
            n_label = tl.sum(tl.sum(tl.where(live & (cols[None, :] == label[:, None]), 1, 0), axis=1), axis=0)
            keep = (p_max >= filter_eps) | (n_label > 0)
            g = tl.where(keep, g, 0.0)
            tl.store(keep_ptr + pid_m * n_tiles_n + pid_n, keep.to(tl.int8))
        tl.store(gy_ptr + offs.to(tl.int64)[:, None] * C + local[None, :], g,
                 mask=row_mask[:, None] & in_chunk[None, :])


@triton.jit
def _grad_hidden_kernel(
    # acc[rows, :] += gy[:, :Cc] @ weight[c0:c0 + Cc, :]   (acc fp32 [N, H], indexed by original row)
    gy_ptr, w_ptr, order_ptr, count_ptr, acc_ptr, keep_ptr,
    H, C, Cc, c0, stride_w, n_tiles_n,
    LOW: tl.constexpr, SOFT_BF16: tl.constexpr, FILTER: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_valid = tl.load(count_ptr)
    if pid_m * BLOCK_M < n_valid:
        offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs < n_valid
        rows = tl.load(order_ptr + offs, mask=row_mask, other=0)
        hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = hs < H
        out = acc_ptr + rows[:, None] * H + hs[None, :]
        o_mask = row_mask[:, None] & h_mask[None, :]
        acc = tl.load(out, mask=o_mask, other=0.0)
        for k0 in range(0, Cc, BLOCK_K):
            keep = 1
            if FILTER:  # the g_y block (this token tile x vocabulary tile k0 // TILE_N) was kept?
                keep = tl.load(keep_ptr + pid_m * n_tiles_n + k0 // TILE_N).to(tl.int32)
            if keep != 0:
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < Cc
                g = tl.load(gy_ptr + offs.to(tl.int64)[:, None] * C + ks[None, :],
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                wt = tl.load(w_ptr + (c0 + ks.to(tl.int64))[:, None] * stride_w + hs[None, :],
                             mask=k_mask[:, None] & h_mask[None, :], other=0.0)
                if LOW:
                    g = cast_to(g, w_ptr.dtype.element_ty, SOFT_BF16)
                acc = _dot(g, wt, acc, PRECISION, UPCAST)
        tl.store(out, acc, mask=o_mask)


@triton.jit
def _grad_weight_kernel(
    # grad_weight[c0 + j, :] = sum over valid tokens k of gy[k, j] * hidden[order[k], :]
    gy_ptr, h_ptr, order_ptr, count_ptr, gw_ptr, keep_ptr,
    H, C, Cc, c0, stride_h, n_tiles_n,
    LOW: tl.constexpr, SOFT_BF16: tl.constexpr, FILTER: tl.constexpr, TILE_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_valid = tl.load(count_ptr)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = local < Cc
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = hs < H
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, n_valid, BLOCK_K):
        keep = 1
        if FILTER:  # the g_y block (token tile k0 // TILE_M x this vocabulary tile) was kept?
            keep = tl.load(keep_ptr + (k0 // TILE_M) * n_tiles_n + pid_n).to(tl.int32)
        if keep != 0:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < n_valid
            rows = tl.load(order_ptr + ks, mask=k_mask, other=0)
            g = tl.load(gy_ptr + ks.to(tl.int64)[None, :] * C + local[:, None],
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
            x = tl.load(h_ptr + rows[:, None] * stride_h + hs[None, :], mask=k_mask[:, None] & h_mask[None, :],
                        other=0.0)  # [BLOCK_K, BLOCK_H]
            if LOW:
                g = cast_to(g, h_ptr.dtype.element_ty, SOFT_BF16)
            acc = _dot(g, x, acc, PRECISION, UPCAST)
    out = gw_ptr + (c0 + local.to(tl.int64))[:, None] * H + hs[None, :]
    tl.store(out, cast_to(acc, gw_ptr.dtype.element_ty, SOFT_BF16), mask=n_mask[:, None] & h_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands: full IEEE products (TF32 would cost ~3 decimal digits of the logits).
    return "ieee" if dtype == torch.float32 else "tf32"


def _fwd_config(dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). tl.dot needs every tile dimension >= 16."""
    if interpreting():
        return 16, 32, 16, 4
    return (64, 128, 64, 8) if dtype != torch.float32 else (64, 64, 32, 8)


def _bwd_config(dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_H, num_warps)."""
    if interpreting():
        return 16, 32, 16, 32, 4
    return (64, 128, 64, 128, 8) if dtype != torch.float32 else (64, 64, 32, 64, 8)


def _chunk_columns(n: int, V: int, block_n: int) -> int:
    """Vocabulary columns per backward chunk: a multiple of ``block_n`` with the fp32 g_y buffer
    [n, C] near 128 MiB on a GPU (2 tiles under the interpreter, so tests cross chunk edges)."""
    if interpreting():
        c = 2 * block_n
    else:
        c = max(block_n, min(8192, ((32 << 20) // max(n, 1)) // block_n * block_n))
    return min(c, triton.cdiv(V, block_n) * block_n)


def _compact(labels: torch.Tensor, ignore_index: int):
    """Indices of the valid rows first (stable), and their count as a device int32 scalar: no host
    sync, unlike ``nonzero``."""
    ignored = labels == ignore_index
    order = torch.argsort(ignored.to(torch.int8), stable=True)
    count = (~ignored).sum(dtype=torch.int32).reshape(1)
    return order, count


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def linear_token_logprobs_forward(hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index,
                                  with_entropy, with_extras):
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 -> (logprobs, lse, entropy,
    mean_logit, is_top1), [N] each (fp32; is_top1 bool), empty where not requested."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    logprob = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    entropy = torch.zeros(N if with_entropy else 0, dtype=torch.float32, device=dev)
    mean = torch.zeros(N if with_extras else 0, dtype=torch.float32, device=dev)
    top1 = torch.zeros(N if with_extras else 0, dtype=torch.int8, device=dev)
    if N > 0 and V > 0:
        hidden, weight = _rows_2d(hidden), _rows_2d(weight)
        labels = labels.contiguous()
        order, count = _compact(labels, ignore_index)
        bm, bn, bk, warps = _fwd_config(hidden.dtype)
        launch(_fwd_kernel, (triton.cdiv(N, bm),),
               hidden, weight, bias if bias is not None else hidden, labels, order, count,
               logprob, lse, entropy if with_entropy else lse, mean if with_extras else lse,
               top1 if with_extras else labels,
               H, V, hidden.stride(0), weight.stride(0),
               float(logit_scale), float(softcap) if softcap > 0 else 1.0, float(temperature),
               HAS_BIAS=bias is not None, SOFTCAP=softcap > 0, WITH_ENTROPY=bool(with_entropy),
               WITH_EXTRAS=bool(with_extras), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
               PRECISION=_precision(hidden.dtype), UPCAST=interpreting(), num_warps=warps)
    return logprob, lse, entropy, mean, top1.view(torch.bool)


def linear_token_logprobs_backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                                   logit_scale, softcap, temperature, ignore_index, output_mask, filter_eps=0.0):
    """Gradients to hidden, weight and bias (empty tensors where ``output_mask`` is False).

    ``filter_eps > 0`` (opt-in, off in the registered op) skips the gradient of every
    ``BLOCK_M x BLOCK_N`` block of (token, vocabulary) pairs whose probabilities are all below
    ``filter_eps`` and that holds no label (as Cut Cross-Entropy does).  Each dropped entry of
    dL/dy is at most ``(logit_scale / temperature) * eps * (|g_logprob| + |g_entropy| * (|log eps| +
    entropy))`` in magnitude (for eps < 1/e, with p |log p| <= eps |log eps|), so the hidden-state
    gradient of a row moves by at most that times ``sum over dropped columns of |weight[v, :]|``."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    want_h, want_w, want_b = (bool(x) for x in output_mask)
    want_b = want_b and bias is not None
    low = hidden.dtype != torch.float32
    acc_h = None
    if want_h:
        acc_h = torch.zeros((N, H), dtype=torch.float32, device=dev)
    grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format) if want_w else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if want_b else None
    if N > 0 and V > 0 and H > 0 and (want_h or want_w or want_b):
        hidden, weight = _rows_2d(hidden), _rows_2d(weight)
        labels = labels.contiguous()
        order, count = _compact(labels, ignore_index)
        has_ent = grad_entropy is not None and entropy.numel() == N
        g_lp = grad_logprobs.contiguous()
        g_ent = grad_entropy.contiguous() if has_ent else g_lp
        bm, bn, bk, bh, warps = _bwd_config(hidden.dtype)
        C = _chunk_columns(N, V, bn)
        gy = torch.zeros((N, C), dtype=torch.float32, device=dev)  # rows past the valid count stay 0
        filt = filter_eps > 0
        # a flag covers whole BLOCK_K steps of both gradient kernels
        assert bn % bk == 0 and bm % bk == 0, (bm, bn, bk)
        n_tn = triton.cdiv(C, bn)
        # one flag per (token tile, vocabulary tile) block of the chunk: 1 = its g_y block is kept
        keep = torch.ones((triton.cdiv(N, bm), n_tn) if filt else (1,), dtype=torch.int8, device=dev)
        prec = _precision(hidden.dtype)
        soft = interpreting()
        for c0 in range(0, V, C):
            Cc = min(C, V - c0)
            launch(_gy_kernel, (triton.cdiv(N, bm), triton.cdiv(Cc, bn)),
                   g_lp, g_ent, hidden, weight, bias if bias is not None else hidden, labels, order, count, lse,
                   entropy if has_ent else lse, gy, keep,
                   H, V, C, c0, hidden.stride(0), weight.stride(0), n_tn,
                   float(logit_scale), float(softcap) if softcap > 0 else 1.0, float(temperature),
                   float(filter_eps),
                   HAS_BIAS=bias is not None, SOFTCAP=softcap > 0, HAS_GRAD_ENT=has_ent, FILTER=filt,
                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=prec, UPCAST=soft, num_warps=warps)
            if want_h:
                launch(_grad_hidden_kernel, (triton.cdiv(N, bm), triton.cdiv(H, bh)),
                       gy, weight, order, count, acc_h, keep, H, C, Cc, c0, weight.stride(0), n_tn,
                       LOW=low, SOFT_BF16=soft, FILTER=filt, TILE_N=bn, BLOCK_M=bm, BLOCK_H=bh, BLOCK_K=bk, PRECISION=prec,
                       UPCAST=soft, num_warps=warps)
            if want_w:
                launch(_grad_weight_kernel, (triton.cdiv(Cc, bn), triton.cdiv(H, bh)),
                       gy, hidden, order, count, grad_w, keep, H, C, Cc, c0, hidden.stride(0), n_tn,
                       LOW=low, SOFT_BF16=soft, FILTER=filt, TILE_M=bm, BLOCK_N=bn, BLOCK_H=bh, BLOCK_K=bk, PRECISION=prec,
                       UPCAST=soft, num_warps=warps)
            if want_b:
                grad_b[c0:c0 + Cc] = gy[:, :Cc].sum(dim=0)  # fixed-order reduction, fp32
    return (acc_h.to(hidden.dtype) if want_h else hidden.new_empty(0),
            grad_w if want_w else weight.new_empty(0),
            grad_b.to(bias.dtype) if want_b else hidden.new_empty(0))


# ---------------------------------------------------------------------------------------------
# Registration with torch.library (opaque to torch.compile, with fake implementations)

_FWD_SCHEMA = ("(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float logit_scale, float softcap, "
               "float temperature, int ignore_index, bool with_entropy, bool with_extras) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, "
               "Tensor labels, Tensor lse, Tensor entropy, float logit_scale, float softcap, float temperature, "
               "int ignore_index, bool[3] output_mask) -> (Tensor, Tensor, Tensor)")


@torch.library.custom_op(f"{NAMESPACE}::linear_token_logprobs_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def linear_token_logprobs_fwd(hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index,
                              with_entropy, with_extras):
    return linear_token_logprobs_forward(hidden, weight, bias, labels, logit_scale, softcap, temperature,
                                         ignore_index, with_entropy, with_extras)


@linear_token_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index, with_entropy, with_extras):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty(n, **f32), hidden.new_empty(n, **f32),
            hidden.new_empty(n if with_entropy else 0, **f32), hidden.new_empty(n if with_extras else 0, **f32),
            hidden.new_empty(n if with_extras else 0, dtype=torch.bool))


@torch.library.custom_op(f"{NAMESPACE}::linear_token_logprobs_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def linear_token_logprobs_bwd(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                              logit_scale, softcap, temperature, ignore_index, output_mask):
    return linear_token_logprobs_backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                                          logit_scale, softcap, temperature, ignore_index, output_mask)


@linear_token_logprobs_bwd.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy, logit_scale, softcap, temperature,
      ignore_index, output_mask):
    want_b = output_mask[2] and bias is not None
    return (hidden.new_empty(hidden.shape if output_mask[0] else (0,)),
            weight.new_empty(weight.shape if output_mask[1] else (0,)),
            bias.new_empty(bias.shape) if want_b else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index, with_entropy, _ = inputs
    _, lse, entropy, _, _ = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.args = (float(logit_scale), float(softcap), float(temperature), int(ignore_index))
    ctx.with_entropy = bool(with_entropy)


def _backward(ctx, grad_logprobs, grad_lse, grad_entropy, grad_mean, grad_top1):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    if bias is None:
        mask[2] = False
    none = (None,) * 7
    if not any(mask):
        return (None, None, None) + none
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if not ctx.with_entropy:
        grad_entropy = None
    gh, gw, gb = linear_token_logprobs_bwd(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse,
                                           entropy, *ctx.args, mask)
    return (gh if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None) + none


linear_token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Backend entry point (arguments already validated by rlhf_kernels._api)


def linear_token_logprobs(hidden, weight, labels, bias, logit_scale, softcap, temperature, ignore_index,
                          return_entropy, return_mean_logit, return_is_top1):
    """hidden [..., H], labels [...] -> (logprobs, entropy or None, mean_logit or None, is_top1 or
    None), each shaped like ``labels``; ``softcap`` 0.0 (or None) means no soft-cap.  The argument
    order is the one every backend of this op takes (see the public function)."""
    shape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    extras = bool(return_mean_logit or return_is_top1)
    lp, _, ent, mean, top1 = linear_token_logprobs_fwd(
        h2, weight, bias, labels.reshape(-1).long(), float(logit_scale), float(softcap or 0.0), float(temperature),
        int(ignore_index), bool(return_entropy), extras)
    return (lp.view(shape), ent.view(shape) if return_entropy else None,
            mean.view(shape) if return_mean_logit else None, top1.view(shape) if return_is_top1 else None)


# The public op is declared in rlhf_kernels._api; register the backend entry point only once it is
# (registering an undeclared op would add a name to this backend that the op set does not have).
if "linear_token_logprobs" in _declared_ops():
    register_impl("triton", "linear_token_logprobs")(linear_token_logprobs)
