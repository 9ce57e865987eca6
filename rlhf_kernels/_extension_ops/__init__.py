"""The compiled ops (``torch.ops.rlhf_kernels.*``) behind the ``cpu`` and ``cuda`` backends, one
module per op family (mirroring ``rlhf_kernels/triton/<family>.py`` and ``csrc/cpu|cuda/<family>``):
each registers its fake (meta) implementations and autograd with :mod:`torch.library`, and its thin
wrappers with the reference backend's signatures with the registry.  Imported by the loader only
after the library is loaded (:func:`register`).

Each public op is a forward op and a backward op in C++ (``<op>_fwd`` / ``<op>_bwd``); the backward
recomputes what it needs from the inputs and O(N) saved values (the per-row log-sum-exp and entropy
of token_logprobs, the per-row weights of the PPO aggregation) instead of saving large intermediates.

The elementwise losses (kl_penalty, ppo_policy_loss, ppo_value_loss, dpo_loss) also have a CPU-only
training forward, ``<op>_fwd_dx``: when a CPU input needs a gradient, it writes the derivative with
respect to that input (one fp32 tensor of the input's size) in the same pass, and the backward is
one multiply by the upstream gradient (:func:`dx_autograd`).  On a CPU the backward is otherwise
bound by re-evaluating the math (k3's and the policy ratio's exp, DPO's sigmoid) rather than by
memory, so saving the derivative is what torch.compile's backward does too; on a GPU these losses
are memory-bound and the ``_bwd`` ops recompute.
"""

from __future__ import annotations

import contextlib

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


# Inside our own autograd.Function the op's Autograd kernel has nothing to do: skip it (torch's
# own torch.library autograd wrapper does the same).
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


def fast_autograd(op, setup_context, backward):
    """A callable equal to ``op(*inputs)`` with the autograd of ``setup_context`` / ``backward``
    (the functions given to :func:`torch.library.register_autograd`), for the wrappers.

    The op keeps its ``register_autograd`` registration for direct ``torch.ops`` calls and
    ``opcheck``; the wrappers call this instead because that generic path costs tens of
    microseconds a call in Python (argument normalisation, a redispatch), which is most of the time
    of a small loss.  Without inputs that need a gradient it is the op call alone.
    """

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with _below_autograd():
                out = op(*inputs)
            setup_context(ctx, inputs, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    _Fn.__name__ = _Fn.__qualname__ = f"{getattr(op, '__name__', 'op')}_autograd"

    def call(*inputs):
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return _Fn.apply(*inputs)
        with _below_autograd():
            return op(*inputs)

    return call


def dx_autograd(op, setup_context, backward, name: str):
    """Like :func:`fast_autograd` for a *training forward* of the CPU backend: ``op`` also returns
    the derivative of the result with respect to the differentiable inputs, ``setup_context`` saves
    it (and drops it from the outputs it returns), and ``backward`` multiplies it by the upstream
    gradient.  The backward then reads one saved fp32 tensor instead of re-evaluating the loss math
    (the exp of a ratio, a sigmoid) from every input, as torch.compile's backward does with the
    intermediates it saves.  Called only when :func:`cpu_training` says so."""

    def forward(ctx, *inputs):
        with _below_autograd():
            out = op(*inputs)
        return setup_context(ctx, inputs, out)

    # Built with type() so the graph node's class is named after the op ("<op>_dx_autogradBackward").
    fn = type(f"{name}_dx_autograd", (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(lambda ctx, *grads: backward(ctx, *grads))})
    return fn.apply


def cpu_training(first: torch.Tensor, *frozen: torch.Tensor) -> bool:
    """True when ``first`` is a CPU tensor that needs a gradient (grad mode on) and none of
    ``frozen`` does: the case the CPU training forwards (``<op>_fwd_dx``) cover."""
    return (
        first.device.type == "cpu"
        and first.requires_grad
        and torch.is_grad_enabled()
        and not any(t.requires_grad for t in frozen)
    )


_registered = False


def register() -> None:
    """Import every family module once (each registers its fakes, autograd and wrappers); the loader
    calls this right after loading the library."""
    global _registered
    if _registered:
        return
    import_family_modules(__name__, __path__)
    _registered = True
