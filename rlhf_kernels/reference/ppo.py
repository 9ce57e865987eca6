"""Reference PPO clipped policy loss and clipped value loss (Schulman et al., 2017).

Policy:  ratio = exp(clamp(logprobs - old_logprobs, -20, 20))
         pg = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
         dual clip (Ye et al., 2020), c > 1, where A < 0:  pg = min(pg, -A * c)
Value:   v_clip = old_values + clamp(values - old_values, -clip, clip)
         loss = 0.5 * agg(max((values - R)^2, (v_clip - R)^2))

Stats are token means over the mask, as verl logs them: ``clipfrac`` (the clipped branch is the
larger one), ``clipfrac_lower`` (the dual clip bound is active), ``approx_kl`` (mean of
old_logprobs - logprobs, verl's ``ppo_kl``).
"""

from __future__ import annotations

import torch

from .._registry import register_impl
from .masked import aggregate, masked_mean


@register_impl("reference", "ppo_policy_loss")
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg):
    zero = 0.0
    # Sanitize masked entries first: torch.where's backward would otherwise multiply a zero
    # gradient by a NaN derivative at masked positions.
    lp = torch.where(mask, logprobs.float(), zero)
    old = torch.where(mask, old_logprobs.float(), zero)
    adv = torch.where(mask, advantages.float(), zero)

    log_ratio = torch.clamp(lp - old, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        lower = (adv < 0) & (pg > pg3)
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    else:
        lower = torch.zeros_like(clipped)
    loss = aggregate(pg, mask, agg)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(clipped.float(), mask),
            "clipfrac_lower": masked_mean(lower.float(), mask),
            "approx_kl": masked_mean(old - lp, mask),
        }
    return loss, stats


@register_impl("reference", "ppo_value_loss")
def ppo_value_loss(values, old_values, returns, mask, clip, agg):
    zero = 0.0
    v = torch.where(mask, values.float(), zero)
    old = torch.where(mask, old_values.float(), zero)
    ret = torch.where(mask, returns.float(), zero)
    loss1 = (v - ret) ** 2
    if clip is None:
        vf = loss1
        clipped = torch.zeros_like(mask)
    else:
        v_clip = old + torch.clamp(v - old, -clip, clip)
        loss2 = (v_clip - ret) ** 2
        vf = torch.maximum(loss1, loss2)
        clipped = loss2 > loss1
    loss = 0.5 * aggregate(vf, mask, agg)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean(clipped.float(), mask)}
    return loss, stats
