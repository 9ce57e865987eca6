"""Reference linear_token_logprobs: per-token log-probs straight from hidden states.

Definition (fp32 math whatever the input dtype; ``h`` one row of hidden, ``W`` the [V, H] head)::

    y = h @ W.T + bias                 z = logit_scale * y
    z = softcap * tanh(z / softcap)    (only with a soft-cap)
    z = z / temperature
    logprob = z[label] - logsumexp(z),   entropy = -sum_v p_v log p_v  (p = softmax(z))
    mean_logit = mean_v z_v,             is_top1 = argmax_v z_v == label (first index wins a tie)

Rows whose label is ``ignore_index`` give zeros (is_top1 False) and a zero gradient, and are never
projected: the valid rows are gathered first, and only they meet the head.

The ``[N, V]`` logits never exist, even here.  The valid rows are cut into token chunks and the
vocabulary into vocabulary chunks; each (token chunk, vocabulary chunk) tile of logits is computed
in fp32 (``h.float() @ W_chunk.float().T``, so bf16/fp16 products accumulate in fp32), folded into
running per-row statistics with an online log-sum-exp, and dropped.  Backward recomputes every tile
and accumulates the three gradients in fp32 in a fixed order (vocabulary chunks outside, token
chunks inside), so two runs give the same bits.  Extra memory: the gathered valid rows and the
hidden-gradient accumulator in fp32 (O(N * H)), per-row statistics (O(N)), one tile.
"""

from __future__ import annotations

import torch

from .._registry import register_impl

# Tile shape: rows of hidden x vocabulary entries (module attributes so tests can shrink them).
TOKEN_CHUNK = 512
VOCAB_CHUNK = 4096


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _logits_tile(h32, weight, bias, v0, v1, logit_scale, softcap, temperature):
    """The fp32 tile z[rows, v0:v1] and dz/dy on it (the chain factor of the backward)."""
    y = h32 @ weight[v0:v1].float().T
    if bias is not None:
        y = y + bias[v0:v1].float()
    z = logit_scale * y
    if softcap:
        t = torch.tanh(z / softcap)
        z = softcap * t
        dz_dy = (logit_scale / temperature) * (1.0 - t * t)
    else:
        dz_dy = logit_scale / temperature  # a constant
    return z / temperature, dz_dy


def _forward_rows(h32, labels, weight, bias, logit_scale, softcap, temperature):
    """Statistics of one chunk of valid rows: fold the vocabulary tiles one at a time."""
    rows, vocab = h32.shape[0], weight.shape[0]
    dev = h32.device
    m = torch.full((rows,), float("-inf"), device=dev)  # running max of z
    s = torch.zeros(rows, device=dev)  # sum exp(z - m)
    u = torch.zeros(rows, device=dev)  # sum exp(z - m) * (z - m), for the entropy
    z_sum = torch.zeros(rows, device=dev)
    best = torch.full((rows,), float("-inf"), device=dev)
    best_index = torch.zeros(rows, dtype=torch.long, device=dev)
    z_label = torch.zeros(rows, device=dev)
    for v0, v1 in _chunks(vocab, VOCAB_CHUNK):
        z, _ = _logits_tile(h32, weight, bias, v0, v1, logit_scale, softcap, temperature)
        tile_max, tile_arg = z.max(dim=1)  # first index of the tile's max
        # Only a strictly larger value moves the argmax to a later tile: the first index wins a tie.
        later = tile_max > best
        best_index = torch.where(later, tile_arg + v0, best_index)
        best = torch.where(later, tile_max, best)
        # Online log-sum-exp: move the sums to the new max, then add this tile.
        new_m = torch.maximum(m, tile_max)
        shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
        scale_old = torch.exp(m - shift)  # exp(-inf) = 0 while nothing has been seen
        u = scale_old * (u + torch.where(s > 0, s * (m - shift), torch.zeros_like(s)))
        s = scale_old * s
        d = z - shift[:, None]
        e = torch.exp(d)
        s = s + e.sum(dim=1)
        u = u + torch.where(e > 0, e * d, torch.zeros_like(e)).sum(dim=1)  # no mass at z = -inf
        m = new_m
        z_sum = z_sum + z.sum(dim=1)
        here = (labels >= v0) & (labels < v1)
        col = (labels - v0).clamp(0, v1 - v0 - 1)
        z_label = torch.where(here, z.gather(1, col[:, None]).squeeze(1), z_label)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = shift + torch.log(s)
    logprob = z_label - lse
    entropy = torch.log(s) - u / s
    return logprob, lse, entropy, z_sum / vocab, best_index == labels


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, logit_scale, softcap, temperature, ignore_index):
        n, dev = hidden.shape[0], hidden.device
        rows = (labels != ignore_index).nonzero().squeeze(1)  # the only rows ever projected
        h32 = hidden.index_select(0, rows).float()
        lab = labels.index_select(0, rows)
        outs = [torch.zeros(n, device=dev) for _ in range(4)]  # logprob, lse, entropy, mean_logit
        top1 = torch.zeros(n, dtype=torch.bool, device=dev)
        for t0, t1 in _chunks(rows.numel(), TOKEN_CHUNK):
            *stats, is_top1 = _forward_rows(h32[t0:t1], lab[t0:t1], weight, bias, logit_scale, softcap, temperature)
            for out, value in zip(outs, stats):
                out[rows[t0:t1]] = value
            top1[rows[t0:t1]] = is_top1
        logprob, lse, entropy, mean_logit = outs
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse, entropy)
        ctx.constants = (logit_scale, softcap, temperature)
        ctx.mark_non_differentiable(mean_logit, top1)
        return logprob, entropy, mean_logit, top1

    @staticmethod
    def backward(ctx, g_logprob, g_entropy, _g_mean, _g_top1):
        hidden, weight, bias, labels, rows, lse, entropy = ctx.saved_tensors
        logit_scale, softcap, temperature = ctx.constants
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        vocab, width = weight.shape
        dev = hidden.device
        h32 = hidden.index_select(0, rows).float()
        lab = labels.index_select(0, rows)
        # Upstream gradients of the ignored rows are never read (NaN there must not leak).
        g_lp = g_logprob.index_select(0, rows).float() if g_logprob is not None else torch.zeros(rows.numel(), device=dev)
        g_ent = g_entropy.index_select(0, rows).float() if g_entropy is not None else None
        row_lse, row_ent = lse.index_select(0, rows), entropy.index_select(0, rows)
        grad_h32 = torch.zeros(rows.numel(), width, device=dev)  # fp32 accumulator of the valid rows
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        # Vocabulary chunks outside, token chunks inside: the weight (and bias) gradient of a chunk is
        # summed over every token chunk in fp32 before it is rounded; the hidden gradient accumulates
        # over vocabulary chunks in the fp32 accumulator.  A fixed order: the same bits every run.
        for v0, v1 in _chunks(vocab, VOCAB_CHUNK):
            w32 = weight[v0:v1].float()
            gw32 = torch.zeros(v1 - v0, width, device=dev)
            gb32 = torch.zeros(v1 - v0, device=dev)
            for t0, t1 in _chunks(rows.numel(), TOKEN_CHUNK):
                h = h32[t0:t1]
                z, dz_dy = _logits_tile(h, weight, bias, v0, v1, logit_scale, softcap, temperature)
                log_p = z - row_lse[t0:t1, None]
                p = torch.exp(log_p)
                # d(g_lp * logprob + g_ent * entropy)/dz = g_lp * (onehot - p) - g_ent * p * (log p + H)
                g_z = -p * g_lp[t0:t1, None]
                here = (lab[t0:t1] >= v0) & (lab[t0:t1] < v1)
                col = (lab[t0:t1] - v0).clamp(0, v1 - v0 - 1)
                g_z.scatter_add_(1, col[:, None], torch.where(here, g_lp[t0:t1], torch.zeros_like(g_lp[t0:t1]))[:, None])
                if g_ent is not None:
                    term = torch.where(p > 0, p * (log_p + row_ent[t0:t1, None]), torch.zeros_like(p))
                    g_z = g_z - g_ent[t0:t1, None] * term
                g_y = g_z * dz_dy  # through the temperature, the soft-cap and the scale
                if need_h:
                    grad_h32[t0:t1] += g_y @ w32
                if need_w:
                    gw32 += g_y.T @ h
                if need_b:
                    gb32 += g_y.sum(dim=0)
            if need_w:
                grad_w[v0:v1] = gw32.to(weight.dtype)
            if need_b:
                grad_b[v0:v1] = gb32.to(bias.dtype)
        grad_h = None
        if need_h:
            grad_h = torch.zeros_like(hidden)
            grad_h[rows] = grad_h32.to(hidden.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


@register_impl("reference", "linear_token_logprobs")
def linear_token_logprobs(hidden, weight, labels, bias, logit_scale, softcap, temperature, ignore_index,
                          return_entropy, return_mean_logit, return_is_top1):
    """Reference implementation; arguments already validated by the public API (softcap 0.0: none)."""
    logprob, entropy, mean_logit, top1 = _LinearTokenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1),
        float(logit_scale), float(softcap), float(temperature), int(ignore_index),
    )
    shape = labels.shape
    return (
        logprob.view(shape),
        entropy.view(shape) if return_entropy else None,
        mean_logit.view(shape) if return_mean_logit else None,
        top1.view(shape) if return_is_top1 else None,
    )
