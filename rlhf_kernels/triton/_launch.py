"""Launch helpers shared by the Triton op families: the one launch path (device guard), interpreter
detection and block sizes."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Every op of this backend is registered under this torch.library namespace.
NAMESPACE = "rlhf_kernels_triton"


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_guard(device: torch.device | None):
    """Make ``device`` the current CUDA device (so Triton launches on it, on its current stream);
    a no-op for CPU tensors (the interpreter) and when no tensor is given."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` on the device of its tensor arguments.

    Triton launches on ``torch.cuda.current_device()`` and that device's current stream, whatever
    device the pointers belong to: tensors on ``cuda:1`` while device 0 is current would run on the
    wrong device, unordered with the caller's stream.  Every kernel of this backend is launched
    through here, under :func:`device_guard` of the first tensor argument (the public API has
    already checked that all tensors share one device).
    """
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    with device_guard(device):
        return kernel[grid](*args, **kwargs)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block(n: int, gpu_max: int, interp_max: int, minimum: int = 16) -> int:
    """Power-of-two block covering ``n`` elements, capped at ``gpu_max`` on a GPU.

    Under the interpreter every program runs as numpy code on the host: large blocks cost host
    memory and time per program, so tests cap the block at ``interp_max`` instead.
    """
    cap = interp_max if interpreting() else gpu_max
    return max(minimum, min(next_pow2(max(n, 1)), cap))


def f32_empty(shape, device) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device)


@triton.jit
def cast_to(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even.

    On a GPU ``x.to(dtype)`` rounds to nearest even.  Triton's interpreter truncates fp32 -> bf16
    instead (an error of up to one bf16 ulp), so under the interpreter (``SOFT_BF16``) bf16 is
    rounded here with integer arithmetic, giving the same bits the GPU produces.
    """
    if SOFT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
