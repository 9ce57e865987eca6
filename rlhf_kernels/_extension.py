"""Loader for the compiled extension built from ``csrc/`` (C++ CPU and CUDA kernels).

The extension registers its ops with the PyTorch dispatcher (``torch.ops.rlhf_kernels.*``).  It is
found, in order:

1. ``RLHF_KERNELS_LIBRARY``: path of a prebuilt shared library (only that is tried);
2. the ahead-of-time build ``rlhf_kernels/_C*.so`` made by ``setup.py`` at install time;
3. a just-in-time build with ninja from the ``csrc/`` sources into a cache directory
   (``RLHF_KERNELS_CACHE``, default ``~/.cache/rlhf_kernels/<torch, CUDA, python>``), unless
   ``RLHF_KERNELS_JIT=0``.  ``RLHF_KERNELS_VERBOSE=1`` prints the build logs.

Nothing here runs at import time, and nothing raises: a missing or broken build only makes
:func:`unavailable_reason` return why, which the dispatcher reports (once, at first use) before
going on with Triton or the reference.  The record of what a binary was built for (torch, CUDA,
compiler) is kept beside it and quoted when loading fails.
"""

from __future__ import annotations

import functools
import glob
import importlib.machinery
import json
import os
import sys
import threading
from dataclasses import dataclass, field

import torch

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_PKG_DIR)
_lock = threading.Lock()


@dataclass
class _State:
    loaded: bool = False
    how: str = ""  # "environment", "ahead of time", "just in time"
    path: str | None = None
    error: str | None = None
    built_for: dict = field(default_factory=dict)
    attempts: list = field(default_factory=list)


def _verbose() -> bool:
    return os.environ.get("RLHF_KERNELS_VERBOSE", "0") not in ("", "0")


def _already_registered() -> bool:
    try:
        torch.ops.rlhf_kernels.build_info  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _parse_build_info(text: str) -> dict:
    return dict(kv.split("=", 1) for kv in text.split(";") if "=" in kv)


def _sidecar(path: str) -> dict:
    """The .build.json written beside the binary by setup.py / the JIT build, if any."""
    candidate = os.path.join(os.path.dirname(path), "_C.build.json")
    try:
        with open(candidate) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _describe(built_for: dict) -> str:
    if not built_for:
        return ""
    keys = ("torch", "cuda", "compiler", "python")
    parts = [f"{k} {built_for[k]}" for k in keys if built_for.get(k)]
    return f" (it was built for {', '.join(parts)}; running torch {torch.__version__}, CUDA {torch.version.cuda})"


def _load_library(path: str, how: str, state: _State) -> bool:
    try:
        torch.ops.load_library(path)
    except Exception as exc:
        state.attempts.append(f"{how} build {path} failed to load: {type(exc).__name__}: {exc}{_describe(_sidecar(path))}")
        return False
    state.loaded, state.how, state.path = True, how, path
    return True


def _aot_candidates() -> list[str]:
    out = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        out += glob.glob(os.path.join(_PKG_DIR, "_C" + suffix))
    return sorted(set(out))


def cache_dir() -> str:
    base = os.environ.get("RLHF_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlhf_kernels")
    tag = f"torch-{torch.__version__}-cuda-{torch.version.cuda or 'none'}-py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(base, tag.replace("+", "_"))


def _jit_with_cuda() -> bool:
    from torch.utils import cpp_extension

    force = os.environ.get("RLHF_KERNELS_BUILD_CUDA")
    if force is not None:
        return force == "1"
    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and torch.cuda.is_available()


def _jit_build(state: _State) -> bool:
    from . import _build_config as cfg

    missing = [s for s in cfg.CPU_SOURCES if not os.path.exists(os.path.join(_REPO_ROOT, s))]
    if missing or not cfg.CPU_SOURCES:
        what = f"{missing[0]} missing" if missing else f"no csrc/ folder in {_REPO_ROOT}"
        state.attempts.append(f"just-in-time build impossible: the csrc/ sources are not installed ({what})")
        return False
    try:
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
    except Exception as exc:
        state.attempts.append(f"just-in-time build impossible: ninja is not available ({exc})")
        return False
    with_cuda = _jit_with_cuda()
    cuda_version = torch.version.cuda if with_cuda else None
    sources = list(cfg.CPU_SOURCES) + (list(cfg.CUDA_SOURCES) if with_cuda else [])
    build_dir = cache_dir()
    os.makedirs(build_dir, exist_ok=True)
    print(f"rlhf_kernels: building the C++ extension just in time into {build_dir} "
          "(first use only; RLHF_KERNELS_JIT=0 disables this)", file=sys.stderr, flush=True)
    try:
        path = cpp_extension.load(
            name="rlhf_kernels_C",
            sources=[os.path.join(_REPO_ROOT, s) for s in sources],
            extra_include_paths=[os.path.join(_REPO_ROOT, d) for d in cfg.INCLUDE_DIRS],
            extra_cflags=cfg.cxx_flags(torch.__version__, cuda_version),
            extra_cuda_cflags=(cfg.nvcc_flags() + cfg.defines(torch.__version__, cuda_version)) if with_cuda else None,
            build_directory=build_dir,
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=_verbose(),
        )
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        # Quote the first compiler error, not only ninja's "subcommand failed".
        first = next((ln.strip() for ln in lines if "error" in ln.lower() and "ninja" not in ln.lower()),
                     lines[-1] if lines else "")
        hint = "" if _verbose() else " (set RLHF_KERNELS_VERBOSE=1 for the build log)"
        state.attempts.append(f"just-in-time build in {build_dir} failed: {type(exc).__name__}: {first}{hint}")
        return False
    state.loaded, state.how, state.path = True, "just in time", path if isinstance(path, str) else build_dir
    try:
        with open(os.path.join(build_dir, "_C.build.json"), "w") as f:
            json.dump({"torch": torch.__version__, "cuda": cuda_version, "how": "just in time",
                       "python": sys.version.split()[0]}, f)
    except OSError:
        pass
    return True


@functools.cache
def _state() -> _State:
    with _lock:
        state = _State()
        if _already_registered():
            state.loaded, state.how = True, "already registered"
        elif os.environ.get("RLHF_KERNELS_LIBRARY"):
            _load_library(os.environ["RLHF_KERNELS_LIBRARY"], "RLHF_KERNELS_LIBRARY", state)
        else:
            for path in _aot_candidates():
                if _load_library(path, "ahead of time", state):
                    break
            if not state.loaded:
                if not state.attempts:
                    state.attempts.append("no ahead-of-time build (rlhf_kernels/_C*.so) is installed")
                if os.environ.get("RLHF_KERNELS_JIT", "1") == "0":
                    state.attempts.append("just-in-time build disabled by RLHF_KERNELS_JIT=0")
                else:
                    _jit_build(state)
        if state.loaded:
            try:
                state.built_for = _parse_build_info(torch.ops.rlhf_kernels.build_info())
                from . import _extension_ops

                _extension_ops.register()
            except Exception as exc:  # a stale library without our ops
                state.loaded = False
                state.attempts.append(f"the loaded library {state.path} is not usable: {type(exc).__name__}: {exc}")
        if not state.loaded:
            state.error = "; ".join(state.attempts)
        return state


def unavailable_reason(device_type: str) -> str | None:
    """None when the compiled kernels for ``device_type`` ("cpu" or "cuda") can run, else why not."""
    state = _state()
    if not state.loaded:
        return f"the compiled extension is not available: {state.error}"
    if device_type == "cuda":
        if state.built_for.get("cuda", "none") == "none":
            return "the compiled extension was built without its CUDA kernels (PyTorch without CUDA, or no nvcc at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    return None


def ops(device_type: str) -> dict:
    """{op name: implementation with the reference backend's signature}, or {} when unavailable."""
    if unavailable_reason(device_type) is not None:
        return {}
    from . import _extension_ops, _registry

    _extension_ops.register()
    return _registry.impls(device_type)


def build_info() -> dict:
    state = _state()
    if not state.loaded:
        return {"status": "not available", "reason": state.error}
    info = {"status": "loaded", "how": state.how, "path": state.path}
    info.update({f"built for {k}": v for k, v in state.built_for.items()})
    return info
