"""Eager PyTorch reference implementations: the definition of every op.

These functions take already-validated arguments (the public API in ``rlhf_kernels`` checks them)
and compute in fp32.  Every other backend is tested against them.  Each module registers its ops
with the registry (``_registry.register_impl``); importing this package imports every module.
"""

from .._registry import AGG_MODES, KL_ESTIMATORS, LOSS_TYPES, import_family_modules
from .dpo import dpo_loss
from .gae import gae
from .kl import kl_penalty
from .logprobs import token_logprobs
from .masked import aggregate, masked_mean, masked_whiten
from .ppo import ppo_policy_loss, ppo_value_loss

import_family_modules(__name__, __path__)

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
