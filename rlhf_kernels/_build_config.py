"""How the compiled extension is built: sources, include dirs and flags, shared by setup.py (ahead
of time) and the just-in-time loader (:mod:`rlhf_kernels._extension`).  Imports nothing heavy so
setup.py can load it by path."""

from __future__ import annotations

import glob
import os

# Sources, relative to the repository root (the folder holding csrc/), found by globbing the family
# folders: adding an op family adds files there, not entries here.  csrc/*.cpp holds the library
# itself (TORCH_LIBRARY), csrc/cpu/<family>.cpp a family's schemas and CPU kernels, csrc/cuda/<family>.cu
# its CUDA kernels (nvcc alone) and csrc/cuda/<family>_glue.cpp the tensor glue that registers them.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources(*patterns: str) -> tuple[str, ...]:
    found = set()
    for pattern in patterns:
        found.update(os.path.relpath(p, _ROOT).replace(os.sep, "/") for p in glob.glob(os.path.join(_ROOT, pattern)))
    return tuple(sorted(found))


CPU_SOURCES = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
CUDA_SOURCES = _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
INCLUDE_DIRS = ("csrc/include",)
EXTENSION_NAME = "_C"  # rlhf_kernels._C
DEFAULT_CUDA_ARCHS = "80;90"


def cuda_archs() -> list[str]:
    """Compute capabilities from RLHF_KERNELS_CUDA_ARCH ("80;90" by default; "," also separates)."""
    raw = os.environ.get("RLHF_KERNELS_CUDA_ARCH", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    return archs or DEFAULT_CUDA_ARCHS.split(";")


def cxx_flags(torch_version: str, cuda_version: str | None) -> list[str]:
    return ["-O3", "-std=c++20"] + defines(torch_version, cuda_version)


def defines(torch_version: str, cuda_version: str | None) -> list[str]:
    # Numbers only in macros: string macros need shell quoting that differs between setuptools'
    # and torch.utils.cpp_extension.load's ninja files.
    parts = (torch_version.split("+")[0].split(".") + ["0", "0", "0"])[:3]
    nums = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts]
    flags = [f"-DRLHF_KERNELS_TORCH_MAJOR={nums[0]}",
             f"-DRLHF_KERNELS_TORCH_MINOR={nums[1]}", f"-DRLHF_KERNELS_TORCH_PATCH={nums[2]}"]
    if cuda_version:
        flags.append("-DRLHF_KERNELS_WITH_CUDA")
    return flags


def nvcc_flags() -> list[str]:
    flags = ["-O3", "-std=c++20", "-lineinfo"]
    for arch in cuda_archs():
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags
