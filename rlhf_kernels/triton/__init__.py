"""Triton backend: one module per op family.  ``OPS`` maps op name -> implementation.

Every op is a ``torch.library`` custom op under the ``rlhf_kernels_triton`` namespace (forward and
backward), with a fake implementation, so ``torch.compile(fullgraph=True)`` traces through it.
Kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from .gae import gae
from .kl import kl_penalty
from .logprobs import token_logprobs

OPS: dict = {
    "token_logprobs": token_logprobs,
    "kl_penalty": kl_penalty,
    "gae": gae,
}
