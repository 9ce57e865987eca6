"""Report versions and, per op, which backends run on this machine and why the others do not."""

from __future__ import annotations

import platform
import sys

import torch

from ._dispatch import BACKEND_NAMES, auto_order, backends
from ._registry import ops as _ops


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    try:
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
    except Exception:  # a broken driver must not break the report
        pass
    return devices


def available_backends(op: str, device="cpu", dtype=torch.float32) -> dict[str, str | None]:
    """{backend: None if it can run ``op`` on ``device`` for ``dtype`` inputs, else the reason}."""
    device = torch.device(device)
    return {name: b.unsupported_reason(op, device, (dtype,)) for name, b in backends().items()}


def _versions() -> dict[str, str]:
    from . import __version__, _extension

    out = {
        "rlhf_kernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": str(torch.version.cuda),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:
        out["triton"] = f"not importable ({type(exc).__name__})"
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except Exception as exc:
        out["transformers"] = f"not importable ({type(exc).__name__})"
    out["extension"] = ", ".join(f"{k}={v}" for k, v in _extension.build_info().items())
    if _extension.build_info()["status"] == "loaded":
        # the SIMD copy the cpu backend's elementwise loops run (RLHF_KERNELS_CPU_ISA can lower it)
        out["cpu isa"] = torch.ops.rlhf_kernels.cpu_isa()
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        out[f"cuda:{i}"] = torch.cuda.get_device_name(i)
    return out


def info(file=None) -> str:
    """Print (and return) versions and the backend table for every op on every device here."""
    lines = ["rlhf_kernels environment", ""]
    for k, v in _versions().items():
        lines.append(f"  {k:<14} {v}")
    lines.append("")
    for device in _devices():
        lines.append(f"device {device.type}: 'auto' tries {', '.join(auto_order(device.type, _ops()[0]))}")
        for op in _ops():
            table = available_backends(op, device)
            chosen = next((n for n in auto_order(device.type, op) if table[n] is None), "reference")
            lines.append(f"  {op}  (auto -> {chosen})")
            for name in BACKEND_NAMES:
                reason = table[name]
                lines.append(f"    {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        lines.append("")
    text = "\n".join(lines)
    print(text, file=file)
    return text
