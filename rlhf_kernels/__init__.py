"""rlhf_kernels: fused kernels for the hot spots of RLHF training.

Public API (see each function's docstring for shapes, dtypes and formulas)::

    token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False)
    linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, return_mean_logit=False, return_is_top1=False,
                          logit_scale=1.0, softcap=None)
    kl_penalty(logprobs, ref_logprobs, *, estimator="k3")
    gae(rewards, values, mask, *, gamma=1.0, lam=0.95)
    ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None,
                    dual_clip=None, agg="token-mean")
    ppo_value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean")
    dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0)
    masked_mean(x, mask, dim=None), masked_whiten(x, mask, shift_mean=True)

Every function takes ``backend="auto" | "reference" | "triton" | "cuda" | "cpu"``; with "auto" the
environment variable ``RLHF_KERNELS_BACKEND`` is honoured.  ``python -m rlhf_kernels`` prints which
backends run on this machine.
"""

from . import _api
from ._api import *  # noqa: F403  (every op declared with @public_op, masked_mean, masked_whiten)
from ._dispatch import BACKEND_NAMES, BackendUnavailableError
from ._info import available_backends, info
from ._registry import ops as _declared_ops

# The public ops, in declaration order (the functions of _api declared with @public_op).
OPS = _declared_ops()
__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "OPS",
    "__version__",
    "available_backends",
    "info",
    *_api.__all__,
]
