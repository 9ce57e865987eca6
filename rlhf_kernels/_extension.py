"""Loader for the compiled extension built from ``csrc/`` (C++ CPU and CUDA kernels).

Placeholder until the extension exists: it reports why the cpu and cuda backends are missing.
"""

from __future__ import annotations


def unavailable_reason(device_type: str) -> str | None:
    return "the compiled extension (csrc/) is not part of this version of rlhf-kernels yet"


def ops(device_type: str) -> dict:
    return {}


def build_info() -> dict:
    return {"status": "not built", "reason": unavailable_reason("cpu")}
