"""Build script.  Metadata lives in pyproject.toml; this file adds the compiled extension
``rlhf_kernels._C`` from csrc/ when it can:

- the C++ CPU kernels whenever PyTorch is importable at build time and a C++ compiler is found;
- the CUDA kernels too when PyTorch has CUDA and nvcc is found, or when RLHF_KERNELS_BUILD_CUDA=1
  (RLHF_KERNELS_BUILD_CUDA=0 turns them off); architectures from RLHF_KERNELS_CUDA_ARCH ("80;90").

A failed or impossible build never fails ``pip install``: the package then builds the extension just
in time on first use (ninja), or runs on Triton and the reference, and says why once.
Set RLHF_KERNELS_BUILD_EXT=0 to skip the ahead-of-time build.  Install with
``--no-build-isolation`` so the build sees the installed torch.
"""

import importlib.util
import json
import os
import shutil
import sys
import traceback

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"rlhf-kernels setup: {msg}", file=sys.stderr, flush=True)


def _load_build_config():
    path = os.path.join(ROOT, "rlhf_kernels", "_build_config.py")
    spec = importlib.util.spec_from_file_location("_rlhf_kernels_build_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extension_setup():
    """Returns (ext_modules, cmdclass); empty when the extension cannot be built here."""
    if os.environ.get("RLHF_KERNELS_BUILD_EXT", "1") == "0":
        _log("RLHF_KERNELS_BUILD_EXT=0: not building the C++ extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # build isolation without torch, or a broken torch
        _log(f"PyTorch is not importable at build time ({exc}); the C++ extension will be built on first use")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        _log(f"no C++ compiler ({cxx!r}) found; skipping the C++ extension")
        return [], {}
    cfg = _load_build_config()
    force = os.environ.get("RLHF_KERNELS_BUILD_CUDA")
    nvcc_found = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    with_cuda = bool(torch.version.cuda) and nvcc_found if force is None else force == "1"
    cuda_version = torch.version.cuda if with_cuda else None
    sources = list(cfg.CPU_SOURCES) + (list(cfg.CUDA_SOURCES) if with_cuda else [])
    ext_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extra = {"cxx": cfg.cxx_flags(torch.__version__, cuda_version)}
    if with_cuda:
        extra["nvcc"] = cfg.nvcc_flags() + cfg.defines(torch.__version__, cuda_version)
    ext = ext_cls(
        name=f"rlhf_kernels.{cfg.EXTENSION_NAME}",
        sources=sources,
        include_dirs=[os.path.join(ROOT, d) for d in cfg.INCLUDE_DIRS],
        extra_compile_args=extra,
    )
    info = {
        "torch": torch.__version__,
        "cuda": cuda_version,
        "cuda_archs": cfg.cuda_archs() if with_cuda else [],
        "compiler": cxx,
        "python": sys.version.split()[0],
        "how": "ahead of time (setup.py)",
    }

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds the extension if it can; a failure is reported and never fails the install."""

        def build_extension(self, e):
            try:
                super().build_extension(e)
            except Exception as exc:
                _log(f"building {e.name} failed; rlhf_kernels will try a just-in-time build on first "
                     f"use, else run without it.\n{type(exc).__name__}: {exc}")
                if os.environ.get("RLHF_KERNELS_VERBOSE") == "1":
                    traceback.print_exc()
                return
            # What the binary was built for, beside it (and in the source tree, which is the
            # package in editable installs), so a load failure can say so.
            out_dir = os.path.dirname(self.get_ext_fullpath(e.name))
            for d in {out_dir, os.path.join(ROOT, "rlhf_kernels")}:
                if os.path.isdir(d):
                    with open(os.path.join(d, cfg.EXTENSION_NAME + ".build.json"), "w") as f:
                        json.dump(info, f, indent=1)

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # the setup of the build itself (compiler checks)
                _log(f"the C++ extension cannot be built here: {type(exc).__name__}: {exc}")

        def get_outputs(self):
            return [p for p in super().get_outputs() if os.path.exists(p)]

        def copy_extensions_to_source(self):
            try:
                super().copy_extensions_to_source()
            except Exception as exc:
                _log(f"could not copy the built extension into the source tree: {exc}")

    _log(f"building rlhf_kernels._C ({'CPU + CUDA ' + ','.join(info['cuda_archs']) if with_cuda else 'CPU'}) "
         f"against torch {torch.__version__}")
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_setup()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
