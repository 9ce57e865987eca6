"""How the compiled extension is built: sources, include dirs and flags, shared by setup.py (ahead
of time) and the just-in-time loader (:mod:`rlhf_kernels._extension`).  Imports nothing heavy so
setup.py can load it by path."""

from __future__ import annotations

import os

# Relative to the repository root (the folder holding csrc/).  Few translation units on purpose:
# the CPU build must stay short on a 2-core CI box.
CPU_SOURCES = (
    "csrc/ops/registration.cpp",
    "csrc/cpu/token_logprobs.cpp",
    "csrc/cpu/losses.cpp",
)
CUDA_SOURCES = (
    "csrc/ops/cuda_glue.cpp",
    "csrc/cuda/token_logprobs.cu",
    "csrc/cuda/losses.cu",
)
INCLUDE_DIRS = ("csrc/include",)
EXTENSION_NAME = "_C"  # rlhf_kernels._C
DEFAULT_CUDA_ARCHS = "80;90"


def cuda_archs() -> list[str]:
    """Compute capabilities from RLHF_KERNELS_CUDA_ARCH ("80;90" by default; "," also separates)."""
    raw = os.environ.get("RLHF_KERNELS_CUDA_ARCH", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    return archs or DEFAULT_CUDA_ARCHS.split(";")


def cxx_flags(torch_version: str, cuda_version: str | None) -> list[str]:
    flags = ["-O3", "-std=c++20", f'-DRLHF_KERNELS_TORCH_VERSION="{torch_version}"']
    if cuda_version:
        flags += ["-DRLHF_KERNELS_WITH_CUDA", f'-DRLHF_KERNELS_CUDA_VERSION="{cuda_version}"']
    return flags


def nvcc_flags() -> list[str]:
    flags = ["-O3", "-std=c++20", "-lineinfo"]
    for arch in cuda_archs():
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags
