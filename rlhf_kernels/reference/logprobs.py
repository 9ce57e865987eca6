"""Reference token log-probs and entropy from logits.

Definition (z = logits / temperature, computed in fp32 whatever the input dtype):

    logprob[i] = z[i, label[i]] - logsumexp(z[i])
    entropy[i] = -sum_j p[i, j] * log p[i, j],   p = softmax(z[i])

Positions whose label equals ``ignore_index`` get 0 for both, and a zero gradient.

Memory: a naive ``log_softmax(logits.float()).gather(...)`` keeps an fp32 copy of the whole
``[N, V]`` log-softmax alive for backward.  This reference saves only the caller's logits (which
are alive anyway) and the per-row log-sum-exp (and entropy), and recomputes the softmax in backward,
processing rows in chunks so the fp32 temporaries stay bounded.
"""

from __future__ import annotations

import torch

from .._registry import register_impl

# Rows per chunk are chosen so an fp32 temporary of one chunk holds about this many elements.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(n_rows: int, vocab: int):
    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


def _forward_rows(z: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, want_entropy: bool):
    """z: [n, V] fp32 scaled logits; labels: [n] int64 (already safe to gather); valid: [n] bool."""
    # Shift by the row max: every term below is then small for a peaked distribution, so the
    # entropy H = log(s) - sum(e * zs) / s does not cancel two large numbers (lse - sum(p * z)).
    if not want_entropy:
        lse = torch.logsumexp(z, dim=-1)
        logprob = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
        return torch.where(valid, logprob, torch.zeros_like(logprob)), lse, None
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    zs = z - m
    e = torch.exp(zs)
    s = e.sum(-1)
    lse = torch.log(s) + m.squeeze(-1)
    logprob = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
    logprob = torch.where(valid, logprob, torch.zeros_like(logprob))
    entropy = None
    if want_entropy:
        # e * zs is 0 * -inf = nan for -inf logits: those entries carry no probability mass.
        ezs = torch.where(e > 0, e * zs, torch.zeros_like(e))
        entropy = torch.log(s) - ezs.sum(-1) / s
        entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logprob, lse, entropy


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy):
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        valid = flat_labels != ignore_index
        safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
        n = flat.shape[0]
        logprob = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy = torch.empty(n, dtype=torch.float32, device=logits.device) if return_entropy else None
        for s, e in _row_chunks(n, vocab):
            z = flat[s:e].float() / temperature
            lp, ls, ent = _forward_rows(z, safe_labels[s:e], valid[s:e], return_entropy)
            logprob[s:e] = lp
            lse[s:e] = ls
            if return_entropy:
                entropy[s:e] = ent
        ctx.save_for_backward(logits, safe_labels, valid, lse, entropy if return_entropy else None)
        ctx.temperature = temperature
        ctx.return_entropy = return_entropy
        out_lp = logprob.reshape(labels.shape)
        if return_entropy:
            out_ent = entropy.reshape(labels.shape)
            return out_lp, out_ent
        return out_lp

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy=None):
        logits, safe_labels, valid, lse, entropy = ctx.saved_tensors
        temperature = ctx.temperature
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        n = flat.shape[0]
        g_lp = grad_logprob.reshape(-1).float() if grad_logprob is not None else None
        g_ent = grad_entropy.reshape(-1).float() if (ctx.return_entropy and grad_entropy is not None) else None
        grad = torch.empty_like(logits).reshape(-1, vocab)
        for s, e in _row_chunks(n, vocab):
            z = flat[s:e].float() / temperature
            log_p = z - lse[s:e].unsqueeze(-1)
            p = torch.exp(log_p)
            v = valid[s:e].unsqueeze(-1)
            g = torch.zeros_like(z)
            if g_lp is not None:
                # d logprob / d z = onehot(label) - p
                gl = torch.where(v, g_lp[s:e].unsqueeze(-1), torch.zeros_like(g_lp[s:e].unsqueeze(-1)))
                g = g - p * gl
                g.scatter_add_(-1, safe_labels[s:e].unsqueeze(-1), gl)
            if g_ent is not None:
                # d H / d z = -p * (log p + H); entries with p == 0 contribute nothing.
                ge = torch.where(v, g_ent[s:e].unsqueeze(-1), torch.zeros_like(g_ent[s:e].unsqueeze(-1)))
                h = entropy[s:e].unsqueeze(-1)
                term = torch.where(p > 0, -p * (log_p + h), torch.zeros_like(p))
                g = g + term * ge
            # Ignored rows get exact zeros even when their logits are all -inf or NaN (there p and
            # lse are NaN, and NaN * 0 is NaN).
            g = torch.where(v, g, torch.zeros_like(g))
            grad[s:e] = (g / temperature).to(logits.dtype)
        return grad.reshape(logits.shape), None, None, None, None


@register_impl("reference", "token_logprobs")
def token_logprobs(logits, labels, temperature, ignore_index, return_entropy):
    """Reference implementation; arguments already validated by the public API."""
    out = _TokenLogprobs.apply(logits, labels, temperature, ignore_index, return_entropy)
    if return_entropy:
        return out
    return out, None
