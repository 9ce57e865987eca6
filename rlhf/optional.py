"""Optional packages: one place that imports them and says, in one line, what is skipped without one.

The pipeline needs only torch, transformers and PyYAML.  Some features use more: plots (matplotlib),
``--report-to tensorboard`` / ``wandb``, LoRA (peft), Hub datasets and ``save_to_disk`` folders
(datasets).  When one is missing, :func:`optional` prints a notice and returns None, so the caller
skips the feature (never silently); :func:`required` raises a :class:`~rlhf.config.UserError` when
what the user asked for cannot proceed without it.

    plt = optional("matplotlib.pyplot", "plots skipped", package="matplotlib")
    wandb = required("wandb", "--report-to wandb")
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from .config import UserError

# The pip name of a module whose package is named differently.
PIP_NAMES = {"yaml": "PyYAML", "torch.utils.tensorboard": "tensorboard"}

_command = "rlhf"
_noticed: set[tuple[str, str]] = set()


def set_command(name: str) -> None:
    """Name the running command in notices (``rlhf sft: notice: ...``)."""
    global _command
    _command = f"rlhf {name}" if name else "rlhf"


def _import(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        # ModuleNotFoundError, and the ImportError that `sys.modules[name] = None` (a blocked module) gives
        return None


def _package(module: str, package: str | None) -> str:
    return package or PIP_NAMES.get(module, module.split(".")[0])


def optional(module: str, skipped: str, package: str | None = None, hint: str | None = None) -> ModuleType | None:
    """``module`` imported, or None after one line on stderr (once per module and feature):
    ``rlhf <command>: notice: <package> is not installed; <skipped> (pip install <package>)``."""
    mod = _import(module)
    if mod is None:
        pkg = _package(module, package)
        if (pkg, skipped) not in _noticed:
            _noticed.add((pkg, skipped))
            print(f"{_command}: notice: {pkg} is not installed; {skipped} ({hint or 'pip install ' + pkg})",
                  file=sys.stderr, flush=True)
    return mod


def required(module: str, feature: str, package: str | None = None, hint: str | None = None) -> ModuleType:
    """``module`` imported, or a :class:`UserError` ``<feature> needs <package>, which is not
    installed (pip install <package>)`` when the feature cannot go on without it."""
    mod = _import(module)
    if mod is None:
        pkg = _package(module, package)
        raise UserError(f"{feature} needs {pkg}, which is not installed ({hint or 'pip install ' + pkg})")
    return mod


require_optional = optional  # the name the other modules' callers may know it by
