"""Argument checks for the public API.

Every error names the argument and says what was expected.  Checks that need the data's values
(the label range) run only on CPU tensors, or on GPU when ``RLHF_KERNELS_DEBUG=1``: on the GPU hot
path they would force a host synchronisation.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FLOAT_NAMES = "float32, bfloat16, float16 or float64"


def debug_checks_enabled() -> bool:
    return os.environ.get("RLHF_KERNELS_DEBUG", "0") not in ("", "0", "false", "False")


def check_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x) -> torch.Tensor:
    check_tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor ({_FLOAT_NAMES}), got {x.dtype}")
    return x


def check_mask(name: str, mask, shape: torch.Size, like_name: str) -> torch.Tensor:
    """Accept bool, integer or floating 0/1 masks of exactly ``shape``; return a bool tensor.

    A non-bool mask must hold exactly 0 and 1 (a float 0.5 is not "true"): checked by
    :func:`check_mask_values` where that costs no host sync.
    """
    check_tensor(name, mask)
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or 0/1 integer/float tensor, got {mask.dtype}")
    check_shape(name, mask, shape, like_name)
    if mask.dtype == torch.bool:
        return mask
    check_mask_values(name, mask)
    return mask != 0


def check_mask_values(name: str, mask: torch.Tensor) -> None:
    """A non-bool mask must contain only 0 and 1.  Like the label check, this reads the data, so it
    runs on CPU tensors always and on GPU tensors only with ``RLHF_KERNELS_DEBUG=1`` (elsewhere it
    would force a host synchronisation)."""
    if mask.dtype == torch.bool or mask.numel() == 0:
        return
    if mask.device.type != "cpu" and not debug_checks_enabled():
        return
    if torch.compiler.is_compiling():
        return  # a data-dependent branch: it would break the graph (and sync on a GPU)
    bad = (mask != 0) & (mask != 1)  # NaN is neither
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} must be bool or hold only 0 and 1 (a {mask.dtype} mask); found {mask[idx].item()!r} "
            f"at index {idx}"
        )


# 1 / temperature must be a finite float32 (kernels compute z = logits * (1 / T) or logits / T in
# fp32), and T itself a normal float32: GPUs flush fp32 subnormals to zero, so a subnormal T would
# divide by zero there.  Both hold exactly for T in [float32 tiny, float32 max].
TEMPERATURE_MIN = float(torch.finfo(torch.float32).tiny)  # 1.1754943508222875e-38
TEMPERATURE_MAX = float(torch.finfo(torch.float32).max)


def check_temperature(value) -> float:
    """temperature: a real number in [1.18e-38, 3.4e38], so that it and its reciprocal are finite
    normal float32 numbers (1e-40 would make every logit / T overflow to inf, and the result NaN)."""
    value = check_range("temperature", value, 0.0, None, low_open=True)
    if not (TEMPERATURE_MIN <= value <= TEMPERATURE_MAX):
        raise ValueError(
            f"temperature must be in [{TEMPERATURE_MIN:.6g}, {TEMPERATURE_MAX:.6g}] (a normal float32 "
            f"whose reciprocal is finite in float32), got {value!r}"
        )
    return value


def check_shape(name: str, x: torch.Tensor, shape, like_name: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have the same shape as {like_name} {tuple(shape)}, got {tuple(x.shape)}"
        )


def check_same_device(named: dict) -> None:
    items = list(named.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensor arguments must be on the same device"
            )


def check_number(name: str, value, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a real number or None" if allow_none else "a real number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def check_range(name: str, value, low=None, high=None, *, low_open=False, high_open=False,
                allow_none=False):
    value = check_number(name, value, allow_none=allow_none)
    if value is None:
        return None
    bad = (
        (low is not None and (value < low or (low_open and value == low)))
        or (high is not None and (value > high or (high_open and value == high)))
        or math.isinf(value)
    )
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int, vocab_name: str = "logits.shape[-1]") -> None:
    """Labels must lie in [0, V) or equal ignore_index.  Value check only where it costs no sync.
    ``vocab_name`` says where V comes from in the caller's arguments (for the message)."""
    if labels.device.type != "cpu" and not debug_checks_enabled():
        return
    if torch.compiler.is_compiling():
        return  # a data-dependent branch: it would break the graph (and sync on a GPU)
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        value = int(labels[idx])
        raise ValueError(
            f"labels must be in [0, {vocab}) (the vocabulary size, {vocab_name}) or equal "
            f"ignore_index={ignore_index}; found {value} at index {idx}"
        )
