"""The one registry of ops, enums and backend implementations.

- The enums (``KL_ESTIMATORS``, ``AGG_MODES``, ``LOSS_TYPES``) are defined here and nowhere else:
  the reference, the Triton kernels and the compiled extension take :func:`code` (the index of a
  name in its tuple) where they need an integer; ``csrc/include/rlhf_kernels/math.h`` lists the
  same names in the same order, and a test compares the two through ``torch.ops.rlhf_kernels.enum_names``.
- The op set is the public functions of :mod:`rlhf_kernels._api` declared with :func:`public_op`.
- Each backend module registers its own implementations with :func:`register_impl` when it is
  imported; :mod:`rlhf_kernels._dispatch` reads the tables here instead of keeping copies.

Imports nothing from the rest of the package, so every layer may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

# Enum name (as the compiled op rlhf_kernels::enum_names knows it) -> its values, in code order.
ENUMS: dict[str, tuple[str, ...]] = {
    "kl_estimator": KL_ESTIMATORS,
    "agg": AGG_MODES,
    "dpo_loss_type": LOSS_TYPES,
}


def code(enum: str, value: str) -> int:
    """Integer code of ``value`` in ``enum`` (its index), as the kernels take it."""
    return ENUMS[enum].index(value)


@dataclass(frozen=True)
class OpSpec:
    """One public op: its name (that of the public function and of every backend's impl), the family
    (the module name under reference/, triton/, _extension_ops/ and csrc/cpu|cuda/ that holds it) and
    the order in which ``backend="auto"`` tries backends on CPU tensors."""

    name: str
    family: str
    cpu_auto_order: tuple[str, ...] = ("cpu", "reference")


_OPS: dict[str, OpSpec] = {}
# backend name -> {op name: implementation with the reference signature}
_IMPLS: dict[str, dict[str, Callable]] = {}


def public_op(*, family: str, cpu_auto_order: tuple[str, ...] = ("cpu", "reference")):
    """Decorator for a public function of ``_api``: declares the op named after the function."""

    def decorate(fn: Callable) -> Callable:
        name = fn.__name__
        if name in _OPS and _OPS[name].family != family:  # a reload re-declares the same op
            raise RuntimeError(f"op {name!r} is declared twice, in families {_OPS[name].family!r} and {family!r}")
        _OPS[name] = OpSpec(name, family, tuple(cpu_auto_order))
        return fn

    return decorate


def ops() -> tuple[str, ...]:
    """Names of the public ops, in declaration order."""
    return tuple(_OPS)


def op_spec(name: str) -> OpSpec:
    return _OPS[name]


def register_impl(backends: str | tuple[str, ...], op: str):
    """Decorator: ``fn`` implements ``op`` (reference signature, validated arguments) on ``backends``."""
    names = (backends,) if isinstance(backends, str) else tuple(backends)

    def decorate(fn: Callable) -> Callable:
        for backend in names:
            _IMPLS.setdefault(backend, {})[op] = fn
        return fn

    return decorate


def impls(backend: str) -> dict[str, Callable]:
    """The implementations ``backend`` has registered so far (its modules must be imported)."""
    return dict(_IMPLS.get(backend, {}))


def import_family_modules(package: str, path) -> list[str]:
    """Import every module of a backend package (so each registers its impls); returns their names.

    Adding an op family to a backend is adding a module: no list in the package's ``__init__``.
    """
    import importlib
    import pkgutil

    names = sorted(m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
