"""Triton backend: one module per op family.  ``OPS`` maps op name -> implementation.

Every op is a ``torch.library`` custom op under the ``rlhf_kernels_triton`` namespace (forward and
backward), with a fake implementation, so ``torch.compile(fullgraph=True)`` traces through it.
Kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from .dpo import dpo_loss
from .gae import gae
from .kl import kl_penalty
from .logprobs import token_logprobs
from .ppo import ppo_policy_loss, ppo_value_loss

OPS: dict = {
    "token_logprobs": token_logprobs,
    "kl_penalty": kl_penalty,
    "gae": gae,
    "ppo_policy_loss": ppo_policy_loss,
    "ppo_value_loss": ppo_value_loss,
    "dpo_loss": dpo_loss,
}
