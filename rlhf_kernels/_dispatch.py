"""Backend registry and dispatch.

Each backend states, as data, what it can run: whether it is available on this machine at all
(``unavailable_reason``) and whether it supports one call's inputs (``unsupported_reason``: device,
dtype, missing op).  ``"auto"`` walks a per-device preference list and takes the first backend that
qualifies, falling back to the reference; an explicit backend that cannot run raises
:class:`BackendUnavailableError` listing why.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import _registry

BACKEND_NAMES = ("reference", "triton", "cuda", "cpu")
_ENV_VAR = "RLHF_KERNELS_BACKEND"

# Order in which "auto" tries backends, per device type.  On CUDA the Triton kernels are tried
# first; the CUDA C++ kernels next.  On CPU tensors each op states its order in its declaration
# (``_registry.public_op(cpu_auto_order=...)``, from measurement): the native C++ kernels first, or
# the reference where the compiled op's per-call cost makes it slower; Triton (only runnable there
# through its interpreter) is never picked automatically.
_CUDA_ORDER = ("triton", "cuda", "reference")


def auto_order(device_type: str, op: str) -> tuple[str, ...]:
    """Backends that ``backend="auto"`` tries for ``op`` on ``device_type`` tensors, in order."""
    if device_type == "cuda":
        return _CUDA_ORDER
    if device_type == "cpu":
        return _registry.op_spec(op).cpu_auto_order
    return _DEFAULT_ORDER


def __getattr__(name: str):
    # OPS is derived from the registry, which _api fills when it is imported (after this module),
    # so it is computed on access rather than at import.
    if name == "OPS":
        return _registry.ops()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_DEFAULT_ORDER = ("reference",)


class BackendUnavailableError(RuntimeError, ValueError):
    """An explicitly requested backend cannot run this call; the message says why."""


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    # Returns None when the backend can run on this machine, else the reason it cannot.
    unavailable_reason: Callable[[], str | None]
    # Returns {op_name: implementation} for the ops this backend has.
    load_ops: Callable[[], dict]
    # Device types and dtypes the implementations accept.
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    # Extra per-call condition (device, op) -> reason or None.
    extra_check: Callable[[torch.device, str], str | None] | None = None

    def ops(self) -> dict:
        if self.unavailable_reason() is not None:
            return {}
        return _cached_ops(self.name)

    def unsupported_reason(self, op: str, device: torch.device, dtypes) -> str | None:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if op not in self.ops():
            return f"the {self.name} backend has no implementation of {op}"
        if device.type not in self.device_types:
            return f"the {self.name} backend runs on {'/'.join(self.device_types)} tensors, not {device.type}"
        for dt in dtypes:
            if dt not in self.dtypes:
                names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
                return f"the {self.name} backend supports {names} inputs, not {str(dt).replace('torch.', '')}"
        if self.extra_check is not None:
            return self.extra_check(device, op)
        return None


@functools.lru_cache(maxsize=None)
def _cached_ops(name: str) -> dict:
    return dict(_REGISTRY[name].load_ops())


# ---------------------------------------------------------------------------------------------
# The four backends


def _reference_ops():
    importlib.import_module("rlhf_kernels.reference")
    return _registry.impls("reference")


@functools.lru_cache(maxsize=None)
def _triton_unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    try:
        importlib.import_module("rlhf_kernels.triton")
    except Exception as exc:
        return f"rlhf_kernels.triton failed to import ({type(exc).__name__}: {exc})"
    return None


def _triton_ops():
    importlib.import_module("rlhf_kernels.triton")
    return _registry.impls("triton")


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_device_check(device: torch.device, op: str) -> str | None:
    if device.type == "cpu" and not _triton_interpreting():
        return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (the interpreter)"
    return None


def _extension_unavailable(device_type: str) -> str | None:
    from . import _extension

    return _extension.unavailable_reason(device_type)


def _extension_ops(device_type: str):
    from . import _extension

    return _extension.ops(device_type)


_LOW_AND_FP32 = (torch.float32, torch.bfloat16, torch.float16)
_ALL_FLOATS = _LOW_AND_FP32 + (torch.float64,)

_REGISTRY: dict[str, Backend] = {
    "reference": Backend(
        name="reference",
        description="eager PyTorch, fp32 math; the definition of every op",
        unavailable_reason=lambda: None,
        load_ops=_reference_ops,
        device_types=("cpu", "cuda", "mps", "xpu", "meta"),
        dtypes=_ALL_FLOATS,
    ),
    "triton": Backend(
        name="triton",
        description="Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)",
        unavailable_reason=_triton_unavailable,
        load_ops=_triton_ops,
        device_types=("cuda", "cpu"),
        dtypes=_LOW_AND_FP32,
        extra_check=_triton_device_check,
    ),
    "cuda": Backend(
        name="cuda",
        description="CUDA C++ kernels from csrc/cuda through the PyTorch dispatcher",
        unavailable_reason=lambda: _extension_unavailable("cuda"),
        load_ops=lambda: _extension_ops("cuda"),
        device_types=("cuda",),
        dtypes=_LOW_AND_FP32,
    ),
    "cpu": Backend(
        name="cpu",
        description="C++ CPU kernels from csrc/cpu through the PyTorch dispatcher",
        unavailable_reason=lambda: _extension_unavailable("cpu"),
        load_ops=lambda: _extension_ops("cpu"),
        device_types=("cpu",),
        dtypes=_LOW_AND_FP32,
    ),
}


def get_backend(name: str) -> Backend:
    return _REGISTRY[name]


def backends() -> dict[str, Backend]:
    return dict(_REGISTRY)


def _check_backend_name(backend) -> str:
    choices = ("auto",) + BACKEND_NAMES
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"backend must be one of {', '.join(repr(c) for c in choices)}; got {backend!r}")
    return backend


def resolve(op: str, backend: str, device: torch.device, dtypes) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for one call; returns (backend name, function).

    Under ``torch.compile`` the choice is made once, at trace time, outside the traced code (it
    imports modules and reads the environment), so the graph holds only the chosen op.
    """
    if torch.compiler.is_compiling():
        attr = _resolve_at_trace_time(op, backend, device, tuple(dtypes))
        return attr.split(":")[0], getattr(_TRACE_TIME_CHOICES, attr)
    return _resolve(op, backend, device, dtypes)


class _Choices:
    """Implementations picked at trace time, one attribute per "backend:op"."""


_TRACE_TIME_CHOICES = _Choices()


@torch.compiler.assume_constant_result
def _resolve_at_trace_time(op: str, backend: str, device: torch.device, dtypes: tuple) -> str:
    name, fn = _resolve(op, backend, device, dtypes)
    attr = f"{name}:{op}"
    setattr(_TRACE_TIME_CHOICES, attr, fn)
    return attr


def _requested(backend: str) -> tuple[str, str]:
    """The backend asked for (``backend``, or the environment variable under "auto") and where from."""
    _check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(_ENV_VAR, "").strip()
        if env and env != "auto":
            if env not in BACKEND_NAMES:
                raise ValueError(
                    f"environment variable {_ENV_VAR} must be one of 'auto', "
                    f"{', '.join(repr(c) for c in BACKEND_NAMES)}; got {env!r}"
                )
            return env, f"environment variable {_ENV_VAR}"
    return backend, "backend argument"


# Choices already made, by everything they depend on (the registry object too: tests swap it).  Only
# a choice of an available backend is kept: a backend that runs stays able to run, while one that
# could not (an extension still to be built) is asked again next time.  Small losses are a few
# microseconds of kernel, so the dozen checks behind a choice are worth skipping.
_CHOSEN: dict = {}


def _resolve(op: str, backend: str, device: torch.device, dtypes) -> tuple[str, Callable]:
    key = (op, backend, os.environ.get(_ENV_VAR, ""), device.type, tuple(dtypes), _triton_interpreting(),
           id(_REGISTRY))
    hit = _CHOSEN.get(key)
    if hit is not None:
        return hit
    choice = _resolve_uncached(op, backend, device, dtypes)
    if choice[0] != "reference" or _requested(backend)[0] == "reference":
        _CHOSEN[key] = choice
    return choice


def _resolve_uncached(op: str, backend: str, device: torch.device, dtypes) -> tuple[str, Callable]:
    backend, source = _requested(backend)
    if backend != "auto":
        impl = _REGISTRY[backend]
        reason = impl.unsupported_reason(op, device, dtypes)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {backend!r} (from the {source}) cannot run {op} here: {reason}"
            )
        return backend, impl.ops()[op]
    for name in auto_order(device.type, op):
        impl = _REGISTRY[name]
        if impl.unsupported_reason(op, device, dtypes) is None:
            return name, impl.ops()[op]
        if name in ("cpu", "cuda"):
            _warn_extension_once(name)
    ref = _REGISTRY["reference"]
    return "reference", ref.ops()[op]


_warned: set = set()


def _warn_extension_once(name: str) -> None:
    reason = _REGISTRY[name].unavailable_reason()
    if reason is None or name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"rlhf_kernels: the {name} backend is not available ({reason}); using the next backend. "
        "Run `python -m rlhf_kernels` for details.",
        RuntimeWarning,
        stacklevel=4,
    )


def check_composite(function: str, backend: str, device: torch.device) -> str:
    """Backend check for the functions built from a few PyTorch ops (masked_mean, masked_whiten).

    They have no kernels: every backend computes them with the same PyTorch ops, so ``"auto"``
    always runs.  An explicit backend (argument or environment variable) is honoured as for the
    other ops: it must be available on this machine and run on ``device``'s tensors, else
    :class:`BackendUnavailableError` says why.  Returns the backend name that was checked.
    """
    if torch.compiler.is_compiling():
        return _check_backend_name(backend)  # checked when the function last ran eagerly
    backend, source = _requested(backend)
    if backend == "auto":
        return backend
    impl = _REGISTRY[backend]
    reason = impl.unavailable_reason()
    if reason is None and device.type not in impl.device_types:
        reason = f"the {backend} backend runs on {'/'.join(impl.device_types)} tensors, not {device.type}"
    if reason is None and impl.extra_check is not None:
        reason = impl.extra_check(device, function)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} (from the {source}) cannot run {function} here: {reason}")
    return backend


def explain(op: str, device: torch.device, dtypes=(torch.float32,)) -> dict[str, str | None]:
    """For each backend, None if it could run ``op`` for these inputs, else the reason why not."""
    return {name: b.unsupported_reason(op, device, dtypes) for name, b in _REGISTRY.items()}
