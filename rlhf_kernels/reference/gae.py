"""Reference Generalized Advantage Estimation (Schulman et al., 2016) with skip-masking.

Scanning t = T-1 .. 0 with A_next = 0 and V_next = 0 past the end:
    valid step:  delta_t = r_t + gamma * V_next - V_t
                 A_t = delta_t + gamma * lam * A_next;   returns_t = A_t + V_t
                 A_next <- A_t;   V_next <- V_t
    masked step: A_t = returns_t = 0, and A_next, V_next carry over unchanged.

On a right-padded batch this is the textbook GAE; at valid steps it equals verl's masked GAE, and
interior masks (tool output inside a multi-turn response) are skipped over.
"""

from __future__ import annotations

import torch

from .._registry import register_impl


@register_impl("reference", "gae")
def gae(rewards, values, mask, gamma: float, lam: float):
    # Masked entries may hold NaN or garbage: replace them before any arithmetic so that neither
    # the result nor the gradient can see them.
    r = torch.where(mask, rewards.float(), 0.0)
    v = torch.where(mask, values.float(), 0.0)
    B, T = r.shape
    adv_next = r.new_zeros(B)
    v_next = r.new_zeros(B)
    advs = [None] * T
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        delta = r[:, t] + gamma * v_next - v[:, t]
        a = delta + gamma * lam * adv_next
        advs[t] = torch.where(m, a, 0.0)
        adv_next = torch.where(m, a, adv_next)
        v_next = torch.where(m, v[:, t], v_next)
    advantages = torch.stack(advs, dim=1) if T > 0 else r.new_zeros(B, 0)
    returns = torch.where(mask, advantages + v, 0.0)
    return advantages, returns
