"""Masked reductions shared by the losses.  Masked entries are never read into a result."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is true; 0 where no entry is valid."""
    xm = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        total = xm.sum()
        count = mask.sum()
    else:
        total = xm.sum(dim=dim)
        count = mask.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) over the valid entries, with the unbiased variance (as TRL).

    With ``shift_mean=False`` the mean is added back, so only the scale changes.  Masked entries of
    the result are 0.
    """
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xm = torch.where(mask, x, zero)
    count = mask.sum().to(x.dtype)
    n = count.clamp(min=1)
    mean = xm.sum() / n
    centered = torch.where(mask, x - mean, zero)
    var = (centered * centered).sum() / n
    # Bessel's correction where there are at least two valid entries.
    var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), var)
    whitened = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, zero)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` (or any shape for token-mean) to a scalar.

    token-mean:           sum(loss * m) / sum(m)
    seq-mean-token-mean:  mean over sequences with any valid token of their token mean
    seq-mean-token-sum:   sum over all B sequences of their token sum, divided by B (as verl)
    Empty masks give 0.
    """
    lm = torch.where(mask, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    if agg == "token-mean":
        return lm.sum() / mask.sum().clamp(min=1).to(lm.dtype)
    if agg == "seq-mean-token-mean":
        tokens = mask.sum(dim=-1)
        seq_mean = lm.sum(dim=-1) / tokens.clamp(min=1).to(lm.dtype)
        has_tokens = tokens > 0
        return seq_mean.sum() / has_tokens.sum().clamp(min=1).to(lm.dtype)
    if agg == "seq-mean-token-sum":
        return lm.sum(dim=-1).sum() / max(lm.shape[0], 1)
    raise AssertionError(f"unvalidated agg {agg!r}")
