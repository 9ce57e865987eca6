"""The compiled ops (``torch.ops.rlhf_kernels.*``) behind the ``cpu`` and ``cuda`` backends, one
module per op family (mirroring ``rlhf_kernels/triton/<family>.py`` and ``csrc/cpu|cuda/<family>``):
each registers its fake (meta) implementations and autograd with :mod:`torch.library`, and its thin
wrappers with the reference backend's signatures with the registry.  Imported by the loader only
after the library is loaded (:func:`register`).

Each public op is a forward op and a backward op in C++ (``<op>_fwd`` / ``<op>_bwd``); the backward
recomputes what it needs from the inputs and O(N) saved values (the per-row log-sum-exp and entropy
of token_logprobs, the per-row weights of the PPO aggregation) instead of saving large intermediates.
"""

from __future__ import annotations

import torch

from .._registry import import_family_modules

NAMESPACE = "rlhf_kernels"
# Both compiled backends run the same wrappers: the dispatcher picks the CPU or CUDA kernel.
BACKENDS = ("cpu", "cuda")


def f32_like(t: torch.Tensor, *shape) -> torch.Tensor:
    """An empty fp32 tensor of ``shape`` on ``t``'s device (fake implementations)."""
    return t.new_empty(shape, dtype=torch.float32)


def zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def as_rows(t: torch.Tensor) -> torch.Tensor:
    # The [B, T] kernels take token-mean inputs of any shape as one row of all tokens (same weights).
    return t if t.dim() == 2 else t.reshape(1, -1)


_registered = False


def register() -> None:
    """Import every family module once (each registers its fakes, autograd and wrappers); the loader
    calls this right after loading the library."""
    global _registered
    if _registered:
        return
    import_family_modules(__name__, __path__)
    _registered = True
