"""Triton token log-probs and entropy: one pass over each row of logits, forward and backward.

Forward, one program per row (token), fp32 math in base 2: every logit is multiplied by the
host-computed ``scale = log2(e) / temperature`` (no division, no ``exp`` fix-ups), so
``y = z * log2(e)`` with ``z = logit / temperature``.  Each element position of the ``BLOCK_V``
block keeps its own online state across the iterations (no reduction inside the loop):

    m = running max of y,   s = sum 2^(y - m),   w = sum 2^(y - m) * (y - m)   (entropy only)

updated with ONE ``exp2`` per element: with ``d = y - m`` and ``e = 2^-|d|``, a new maximum
(``d > 0``) gives ``s = e s + 1, w = e w - e d s`` and any other value ``s = s + e, w = w + e d``.
The ``BLOCK_V`` states merge once per row at the end (one max and two sums), then

    lse = ln2 (M + log2 S),   logprob = ln2 (y[label] - M - log2 S),   entropy = ln2 (log2 S - W / S).

Keeping ``w`` relative to the running max avoids computing the entropy as lse - sum(p * z), a
difference of two large numbers for peaked rows.  ``-|d|`` is clamped at -256 (2^-256 is 0 in
fp32), so ``-inf`` logits (masked lanes too) contribute exactly nothing and never form 0 * inf;
the max and the clamp propagate NaN, so a NaN logit gives a NaN row as the reference does.

On a GPU ``exp2`` is ``ex2.approx.ftz.f32`` (one MUFU instruction; PTX ISA: maximum relative error
2^-22 over the full range; results below 2^-126 flush to zero, i.e. terms under 2^-126 of the row's
largest, which contribute below fp32 resolution to a sum that holds at least 1).  Under the
interpreter it is ``tl.exp2``.

The main loop over a contiguous row reads whole blocks without a mask, starting at the first
16-byte-aligned element of the row (the compiler is told so, which gives 16-byte vector loads
for any V and any row stride); the unaligned head (fewer than 16 bytes) and the tail that does not
fill a block go through one masked block at the end.  The block size and warp count are autotuned
on the GPU (key: V, dtype); the interpreter uses one fixed configuration, so tests are fast and
deterministic.

Backward re-reads the row with the saved lse (and entropy) and writes the logits gradient directly,
in the logits dtype: no fp32 ``[N, V]`` temporary exists at any point.  Per element it is one FMA,
one ``exp2`` and two more FMAs: ``p = 2^(y - lse log2 e)``, ``g = onehot g_lp - p (c0 + c1 (y - lse2))``
with the per-row ``c0 = (g_lp + g_ent H) / T`` and ``c1 = g_ent ln2 / T``.  Rows whose label is
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

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._registry import register_impl
from ._launch import NAMESPACE, block, cast_to, interpreting, launch

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)

# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _exp2(x, FAST_EXP2: tl.constexpr):
    """2^x: one ``ex2.approx.ftz.f32`` on a GPU; ``tl.exp2`` under the interpreter."""
    if FAST_EXP2:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _lse_update(y, m, s, w, RETURN_ENTROPY: tl.constexpr, FAST_EXP2: tl.constexpr):
    """One element per lane into the lanes' online states (base 2, see the module docstring)."""
    d = y - m
    a = tl.maximum(-tl.abs(d), -256.0, propagate_nan=tl.PropagateNan.ALL)  # = -|d|, 2^-256 == 0
    e = _exp2(a, FAST_EXP2)
    new_max = d > 0
    if RETURN_ENTROPY:
        ea = e * a
        w = tl.where(new_max, e * w + ea * s, w + ea)
    s = tl.where(new_max, e * s + 1.0, s + e)
    m = tl.maximum(m, y, propagate_nan=tl.PropagateNan.ALL)
    return m, s, w


@triton.jit
def _token_logprobs_fwd_kernel(
    # pointers: logits [A, T, V] (strided), labels [A*T] int64, outputs [A*T] fp32
    logits_ptr, labels_ptr, logprob_ptr, lse_ptr, entropy_ptr,
    # shapes
    T, V,
    # strides of logits
    stride_a, stride_t, stride_v,
    # constants: scale = log2(e) / temperature
    scale, ignore_index,
    RETURN_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, VOCAB_CONTIG: tl.constexpr, ALIGN: tl.constexpr,
    FAST_EXP2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may exceed 2^31
    a = row // T
    t = row % T
    row_off = a * stride_a + t * stride_t
    row_ptr = logits_ptr + row_off
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    n_cols = tl.where(valid, V, 0)  # ignored rows read nothing

    r = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], -3.4028234663852886e38, tl.float32)  # -FLT_MAX: finite, so y - m is never inf - inf
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    w = tl.zeros([BLOCK_V], dtype=tl.float32)
    if VOCAB_CONTIG:
        # Aligned main loop: `head` elements up to the first ALIGN-element (16-byte) boundary of the row
        # (ALIGN = 1 when the tensor's base is not 16-byte aligned), then whole blocks, unmasked.
        head = ((ALIGN - row_off % ALIGN) % ALIGN).to(tl.int32)
        head = tl.minimum(head, n_cols)
        n_main = ((n_cols - head) // BLOCK_V) * BLOCK_V
        base = row_off + head  # a multiple of ALIGN: offsets from the (16-byte aligned) tensor base
        for start in range(0, n_main, BLOCK_V):
            offs = tl.multiple_of(base + start + r, ALIGN)
            x = tl.load(logits_ptr + offs)
            m, s, w = _lse_update(x.to(tl.float32) * scale, m, s, w, RETURN_ENTROPY, FAST_EXP2)
        # The head and the tail, masked (one block, two when head + tail > BLOCK_V).
        rem = n_cols - n_main
        for start in range(0, rem, BLOCK_V):
            c = start + r
            x = tl.load(row_ptr + tl.where(c < head, c, c + n_main), mask=c < rem, other=-float("inf"))
            m, s, w = _lse_update(x.to(tl.float32) * scale, m, s, w, RETURN_ENTROPY, FAST_EXP2)
    else:
        for start in range(0, n_cols, BLOCK_V):
            cols = start + r
            x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=cols < V, other=-float("inf"))
            m, s, w = _lse_update(x.to(tl.float32) * scale, m, s, w, RETURN_ENTROPY, FAST_EXP2)

    # The one merge of the row: every lane's state moved to the row max M.
    M = tl.max(m, axis=0)
    dm = tl.maximum(m - M, -256.0, propagate_nan=tl.PropagateNan.ALL)
    f = _exp2(dm, FAST_EXP2)
    S = tl.sum(s * f, axis=0)
    S = tl.where(valid, S, 1.0)  # ignored rows: nothing read
    log2_s = tl.log2(S)
    lse2 = M + log2_s  # lse / ln2
    # Out-of-range labels (only from callers that skipped the Python check) load nothing: NaN.
    in_range = (label >= 0) & (label < V)
    safe_label = tl.where(valid & in_range, label, 0)  # int64: safe_label * stride_v cannot wrap
    x_label = tl.load(row_ptr + safe_label * stride_v, mask=valid & in_range, other=0.0)
    logprob = tl.where(in_range, (x_label.to(tl.float32) * scale - lse2) * 0.6931471805599453, float("nan"))
    tl.store(logprob_ptr + row, tl.where(valid, logprob, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse2 * 0.6931471805599453, 0.0))
    if RETURN_ENTROPY:
        W = tl.sum((w + dm * s) * f, axis=0)
        tl.store(entropy_ptr + row, tl.where(valid, (log2_s - W / S) * 0.6931471805599453, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    # pointers: upstream grads [A*T], logits [A, T, V] (strided), labels, saved lse/entropy,
    # output grad_logits [A*T, V] contiguous
    grad_lp_ptr, grad_ent_ptr, logits_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_logits_ptr,
    # shapes
    T, V,
    # strides of logits
    stride_a, stride_t, stride_v,
    # constants: scale = log2(e) / temperature, inv_t = 1 / temperature
    scale, inv_t, ignore_index,
    HAS_GRAD_LP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr, BLOCK_V: tl.constexpr, SOFT_BF16: tl.constexpr,
    VOCAB_CONTIG: tl.constexpr, ALIGN: tl.constexpr, OUT_ALIGNED: tl.constexpr, FAST_EXP2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a = row // T
    t = row % T
    row_off = a * stride_a + t * stride_t
    row_ptr = logits_ptr + row_off
    out_ptr = grad_logits_ptr + row * V
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    lse2 = tl.load(lse_ptr + row) * 1.4426950408889634  # lse in base 2
    g_lp = 0.0
    if HAS_GRAD_LP:
        g_lp = tl.where(valid, tl.load(grad_lp_ptr + row).to(tl.float32), 0.0)
    g_ent = 0.0
    h = 0.0
    if HAS_GRAD_ENT:
        g_ent = tl.where(valid, tl.load(grad_ent_ptr + row).to(tl.float32), 0.0)
        h = tl.load(entropy_ptr + row)
    # d/dz = onehot(label) g_lp - p g_lp - g_ent p (log p + H), then / T.  With d = y - lse2 = log2 p:
    # g = onehot * c_lab - p * (c0 + c1 * d).  c_lab is formed in fp32 before the one rounding to the
    # logits dtype (in bf16, 1 - p would cancel as p -> 1).
    c_lab = g_lp * inv_t
    c0 = (g_lp + g_ent * h) * inv_t
    c1 = g_ent * (0.6931471805599453 * inv_t)
    n_read = tl.where(valid, V, 0)  # ignored rows load nothing (p = 0 everywhere), write zeros
    r = tl.arange(0, BLOCK_V)
    if VOCAB_CONTIG:
        head = ((ALIGN - row_off % ALIGN) % ALIGN).to(tl.int32)
        head = tl.minimum(head, V)
        n_main = ((V - head) // BLOCK_V) * BLOCK_V
        n_main_read = tl.where(valid, n_main, 0)
        base = row_off + head  # a multiple of ALIGN: offsets from the (16-byte aligned) tensor base
        out_base = row * V + head  # also a multiple of ALIGN when OUT_ALIGNED
        for start in range(0, n_main_read, BLOCK_V):
            x = tl.load(logits_ptr + tl.multiple_of(base + start + r, ALIGN))
            g = _grad_block(x, head + start + r, label, scale, lse2, c_lab, c0, c1, HAS_GRAD_ENT, FAST_EXP2)
            g = cast_to(g, grad_logits_ptr.dtype.element_ty, SOFT_BF16)
            if OUT_ALIGNED:
                tl.store(grad_logits_ptr + tl.multiple_of(out_base + start + r, ALIGN), g)
            else:
                tl.store(grad_logits_ptr + (out_base + start + r), g)
        # Ignored rows: zeros over the main part, nothing read.
        zero = tl.zeros([BLOCK_V], dtype=grad_logits_ptr.dtype.element_ty)
        for start in range(n_main_read, n_main, BLOCK_V):
            tl.store(grad_logits_ptr + (out_base + start + r), zero)
        # The head and the tail, masked.
        rem = V - n_main
        for start in range(0, rem, BLOCK_V):
            c = start + r
            cols = tl.where(c < head, c, c + n_main)
            x = tl.load(row_ptr + cols, mask=(c < rem) & (cols < n_read), other=-float("inf"))
            g = _grad_block(x, cols, label, scale, lse2, c_lab, c0, c1, HAS_GRAD_ENT, FAST_EXP2)
            tl.store(out_ptr + cols, cast_to(g, grad_logits_ptr.dtype.element_ty, SOFT_BF16), mask=c < rem)
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + r
            offs = cols.to(tl.int64) * stride_v  # int32 would wrap past 2^31
            x = tl.load(row_ptr + offs, mask=cols < n_read, other=-float("inf"))
            g = _grad_block(x, cols, label, scale, lse2, c_lab, c0, c1, HAS_GRAD_ENT, FAST_EXP2)
            tl.store(out_ptr + cols, cast_to(g, grad_logits_ptr.dtype.element_ty, SOFT_BF16), mask=cols < V)


@triton.jit
def _grad_block(x, cols, label, scale, lse2, c_lab, c0, c1, HAS_GRAD_ENT: tl.constexpr, FAST_EXP2: tl.constexpr):
    # d = log2 p, clamped at -256 (p = 0 there, and c1 * d stays finite: no 0 * inf); NaN propagates.
    d = tl.maximum(x.to(tl.float32) * scale - lse2, -256.0, propagate_nan=tl.PropagateNan.ALL)
    p = _exp2(d, FAST_EXP2)
    if HAS_GRAD_ENT:
        q = c0 + c1 * d
    else:
        q = c0
    return tl.where(cols == label, c_lab, 0.0) - p * q


# ---------------------------------------------------------------------------------------------
# Launchers

# GPU: BLOCK_V x num_warps, autotuned per (V, dtype).  8 to 32 elements per thread per iteration;
# 16 KiB of bf16 (8192 elements) in flight per program at most.
_GPU_CONFIGS = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]


def _prune(configs, named_args, **kwargs):
    """Drop blocks far larger than the row (keep the smallest config that covers it)."""
    V = named_args["V"]
    keep = [c for c in configs if c.kwargs["BLOCK_V"] <= max(2048, triton.next_power_of_2(V))]
    return keep or configs[:1]


def _autotuned(kernel, key):
    return triton.autotune(
        configs=[triton.Config({"BLOCK_V": b}, num_warps=w) for b, w in _GPU_CONFIGS],
        key=key,
        prune_configs_by={"early_config_prune": _prune},
    )(kernel)


_fwd_tuned = _autotuned(_token_logprobs_fwd_kernel, ["V", "RETURN_ENTROPY", "VOCAB_CONTIG", "ALIGN"])
_bwd_tuned = _autotuned(_token_logprobs_bwd_kernel, ["V", "HAS_GRAD_ENT", "VOCAB_CONTIG", "ALIGN"])


def gpu_config(kind: str, dtype: str):
    """The configuration a large-vocabulary row starts from on the GPU (used by the SASS count in
    benchmarks/sass_count.py; the autotuner picks among _GPU_CONFIGS)."""
    return (8192, 16) if dtype in ("bf16", "fp16") else (4096, 8)


def _interp_block(V: int) -> int:
    # Under the interpreter every program runs as numpy code on the host: a block of at most 512
    # elements keeps rows of a few thousand logits on the aligned main loop and the masked tail.
    return block(V, 512, 512)


def _align(logits: torch.Tensor) -> int:
    """Elements per 16 bytes when the row can be read with 16-byte loads from an aligned base, else 1."""
    if logits.stride(-1) != 1 or logits.data_ptr() % 16 != 0:
        return 1
    return 16 // logits.element_size()


def token_logprobs_forward(logits, labels, temperature, ignore_index, return_entropy, block_v=None):
    """logits [A, T, V] (any strides), labels [A*T] int64 -> (logprob, lse, entropy) fp32 [A*T];
    entropy is an empty tensor when not requested.  ``block_v`` fixes the block size (tests); by
    default it is autotuned on the GPU and fixed under the interpreter."""
    A, T, V = logits.shape
    n = A * T
    logprob = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(n if return_entropy else 0, dtype=torch.float32, device=logits.device)
    if n == 0:
        return logprob, lse, entropy
    args = (logits, labels, logprob, lse, entropy if return_entropy else logprob,
            T, V, logits.stride(0), logits.stride(1), logits.stride(2),
            LOG2E / float(temperature), int(ignore_index))
    consts = dict(RETURN_ENTROPY=bool(return_entropy), VOCAB_CONTIG=logits.stride(2) == 1, ALIGN=_align(logits),
                  FAST_EXP2=not interpreting())
    if block_v is None and not interpreting():
        launch(_fwd_tuned, (n,), *args, **consts)
    else:
        block_v = block_v or _interp_block(V)
        launch(_token_logprobs_fwd_kernel, (n,), *args, BLOCK_V=block_v, num_warps=4, **consts)
    return logprob, lse, entropy


def token_logprobs_backward(grad_logprob, grad_entropy, logits, labels, lse, entropy, temperature,
                            ignore_index, block_v=None):
    A, T, V = logits.shape
    n = A * T
    grad_logits = torch.empty((A, T, V), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad_logits
    has_lp = grad_logprob is not None
    has_ent = grad_entropy is not None and entropy.numel() == n
    g_lp = grad_logprob.contiguous() if has_lp else lse
    g_ent = grad_entropy.contiguous() if has_ent else lse
    align = _align(logits)
    # The output rows (contiguous [N, V]) start at the same offset modulo ALIGN as the input rows.
    out_aligned = (align > 1 and grad_logits.data_ptr() % 16 == 0 and (logits.stride(1) - V) % align == 0
                   and (logits.stride(0) - T * V) % align == 0)
    args = (g_lp, g_ent, logits, labels, lse, entropy if has_ent else lse, grad_logits,
            T, V, logits.stride(0), logits.stride(1), logits.stride(2),
            LOG2E / float(temperature), 1.0 / float(temperature), int(ignore_index))
    consts = dict(HAS_GRAD_LP=has_lp, HAS_GRAD_ENT=has_ent, SOFT_BF16=interpreting(),
                  VOCAB_CONTIG=logits.stride(2) == 1, ALIGN=align, OUT_ALIGNED=out_aligned,
                  FAST_EXP2=not interpreting())
    if block_v is None and not interpreting():
        launch(_bwd_tuned, (n,), *args, **consts)
    else:
        block_v = block_v or _interp_block(V)
        launch(_token_logprobs_bwd_kernel, (n,), *args, BLOCK_V=block_v, num_warps=4, **consts)
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
