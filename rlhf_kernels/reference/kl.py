"""Reference per-token KL estimators (Schulman, "Approximating KL divergence", 2020).

With d = logprobs - ref_logprobs (log pi - log pi_ref, computed in fp32):
    k1  = d
    k2  = d^2 / 2
    k3  = exp(-d) - 1 + d
    abs = |d|
"""

from __future__ import annotations

import torch

from .._registry import register_impl


@register_impl("reference", "kl_penalty")
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    d = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(-d) - 1.0 + d
    if estimator == "abs":
        return d.abs()
    raise AssertionError(f"unvalidated estimator {estimator!r}")
