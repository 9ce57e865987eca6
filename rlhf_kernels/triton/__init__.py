"""Triton backend: one module per op family, each registering its ops with the registry.

Every op is a ``torch.library`` custom op under the ``rlhf_kernels_triton`` namespace (forward and
backward), with a fake implementation, so ``torch.compile(fullgraph=True)`` traces through it.
Kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.  Importing this
package imports every family module; ``OPS`` (op name -> implementation) is what they registered.
"""

from .._registry import impls, import_family_modules

import_family_modules(__name__, __path__)

OPS: dict = impls("triton")
