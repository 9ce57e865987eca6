"""Reference DPO losses (Rafailov et al., 2023) and variants, with TRL's conventions.

h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
  sigmoid: -(1 - ls) * logsigmoid(beta h) - ls * logsigmoid(-beta h)       (cDPO label smoothing)
  ipo:     (h - 1 / (2 beta))^2                                             (Azar et al., 2023)
  hinge:   relu(1 - beta h)                                                 (SLiC, Zhao et al., 2023)
  robust:  (-(1 - ls) * logsigmoid(beta h) + ls * logsigmoid(-beta h)) / (1 - 2 ls)  (Chowdhury et al., 2024)
chosen_rewards = beta * (policy_chosen - ref_chosen), rejected likewise; detached, as TRL logs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._registry import register_impl


@register_impl("reference", "dpo_loss")
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    pc, pr = policy_chosen.float(), policy_rejected.float()
    rc, rr = ref_chosen.float(), ref_rejected.float()
    chosen_logratio = pc - rc
    rejected_logratio = pr - rr
    h = chosen_logratio - rejected_logratio
    ls = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1.0 - ls) * F.logsigmoid(beta * h) - ls * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    elif loss_type == "robust":
        losses = (-(1.0 - ls) * F.logsigmoid(beta * h) + ls * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * ls)
    else:
        raise AssertionError(f"unvalidated loss_type {loss_type!r}")
    chosen_rewards = (beta * chosen_logratio).detach()
    rejected_rewards = (beta * rejected_logratio).detach()
    return losses, chosen_rewards, rejected_rewards
