"""Eager PyTorch reference implementations: the definition of every op.

These functions take already-validated arguments (the public API in ``rlhf_kernels`` checks them)
and compute in fp32.  Every other backend is tested against them.
"""

from .dpo import LOSS_TYPES, dpo_loss
from .gae import gae
from .kl import kl_penalty
from .logprobs import token_logprobs
from .masked import AGG_MODES, aggregate, masked_mean, masked_whiten
from .ppo import ppo_policy_loss, ppo_value_loss

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "aggregate",
    "dpo_loss",
    "gae",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "token_logprobs",
]
