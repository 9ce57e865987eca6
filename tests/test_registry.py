"""The one registry: ops and enums defined once, every backend's table derived from it, C++ in
step with Python, names that agree across layers, and a repository that explains itself."""

from __future__ import annotations

import importlib
import os
import re
import subprocess

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _dispatch, _registry

from .utils import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH_H = os.path.join(ROOT, "csrc", "include", "rlhf_kernels", "math.h")
# C++ name table in math.h -> the enum it lists (as rlhf_kernels::enum_names and _registry name it).
CXX_NAME_TABLES = {"kKlEstimatorNames": "kl_estimator", "kAggNames": "agg", "kDpoLossNames": "dpo_loss_type"}


def _cxx_names(table: str) -> list[str]:
    text = open(MATH_H).read()
    m = re.search(table + r"\[\]\s*=\s*\{([^}]*)\}", text)
    assert m, f"{table} not found in math.h"
    return re.findall(r'"([^"]*)"', m.group(1))


def _cxx_enumerators(enum: str) -> list[tuple[str, int]]:
    text = open(MATH_H).read()
    m = re.search(r"enum " + enum + r"\s*:\s*int\s*\{([^}]*)\}", text)
    assert m, f"enum {enum} not found in math.h"
    return [(name, int(val)) for name, val in re.findall(r"(\w+)\s*=\s*(\d+)", m.group(1))]


@pytest.mark.parametrize("table", sorted(CXX_NAME_TABLES))
def test_math_h_enum_names_match_the_python_enums(table):
    assert _cxx_names(table) == list(_registry.ENUMS[CXX_NAME_TABLES[table]])


@pytest.mark.parametrize("enum,table", [("KlEstimator", "kKlEstimatorNames"), ("Agg", "kAggNames"),
                                        ("DpoLoss", "kDpoLossNames")])
def test_math_h_enumerators_are_numbered_in_table_order(enum, table):
    values = [v for _, v in _cxx_enumerators(enum)]
    assert values == list(range(len(_cxx_names(table))))


def test_compiled_enum_names_match_the_python_enums():
    require("cpu", "gae", device="cpu")
    for name, values in _registry.ENUMS.items():
        assert list(torch.ops.rlhf_kernels.enum_names(name)) == list(values), name
    with pytest.raises(RuntimeError, match="unknown enum"):
        torch.ops.rlhf_kernels.enum_names("nope")


def test_codes_are_indices_of_the_one_tuple():
    assert rk.reference.KL_ESTIMATORS is _registry.KL_ESTIMATORS
    assert rk.reference.AGG_MODES is _registry.AGG_MODES
    assert rk.reference.LOSS_TYPES is _registry.LOSS_TYPES
    for enum, values in _registry.ENUMS.items():
        assert [_registry.code(enum, v) for v in values] == list(range(len(values)))


def test_op_set_is_the_declared_public_functions():
    assert rk.OPS == _registry.ops() == _dispatch.OPS
    for op in rk.OPS:
        assert callable(getattr(rk, op))
        assert op in rk.__all__


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
def test_every_backend_registers_every_op(backend):
    require(backend, "gae", device="cpu")
    table = _dispatch.get_backend(backend).ops()
    assert set(table) == set(rk.OPS)


def test_family_files_exist_on_every_layer():
    # The checklist of docs/architecture.md: one file per family on each layer.
    for op in rk.OPS:
        family = _registry.op_spec(op).family
        for module in ("reference", "triton", "_extension_ops"):
            importlib.util.find_spec(f"rlhf_kernels.{module}.{family}") or pytest.fail(f"no {module}/{family}.py")
        for rel in (f"csrc/cpu/{family}.cpp", f"csrc/cuda/{family}.cu", f"csrc/cuda/{family}_glue.cpp"):
            assert os.path.exists(os.path.join(ROOT, rel)), rel


def test_names_agree_across_layers():
    # torch.ops <op>_fwd / <op>_bwd in both namespaces; Python launchers <op>_forward / <op>_backward.
    require("triton", "gae", device="cpu")
    require("cpu", "gae", device="cpu")
    for op in rk.OPS:
        family = _registry.op_spec(op).family
        triton_module = importlib.import_module(f"rlhf_kernels.triton.{family}")
        for suffix in ("forward", "backward"):
            assert callable(getattr(triton_module, f"{op}_{suffix}")), (op, suffix)
        for suffix in ("fwd", "bwd"):
            assert hasattr(torch.ops.rlhf_kernels_triton, f"{op}_{suffix}"), (op, suffix)
            assert hasattr(torch.ops.rlhf_kernels, f"{op}_{suffix}"), (op, suffix)
        glue = open(os.path.join(ROOT, "csrc", "cuda", f"{family}_glue.cpp")).read()
        cu = open(os.path.join(ROOT, "csrc", "cuda", f"{family}.cu")).read()
        for suffix in ("forward", "backward"):
            assert f"int {op}_{suffix}(" in glue and f"int {op}_{suffix}(" in cu, (op, suffix)
        for suffix in ("fwd", "bwd"):
            assert f'm.impl("{op}_{suffix}"' in glue, (op, suffix)


def test_sources_are_globbed_from_the_family_folders():
    from rlhf_kernels import _build_config as cfg

    families = {_registry.op_spec(op).family for op in rk.OPS}
    assert {f"csrc/cpu/{f}.cpp" for f in families} <= set(cfg.CPU_SOURCES)
    assert {f"csrc/cuda/{f}.cu" for f in families} | {f"csrc/cuda/{f}_glue.cpp" for f in families} <= set(
        cfg.CUDA_SOURCES)


# ------------------------------------------------------------------------------------------------
# masked_mean / masked_whiten: the backend argument is checked like the other functions'


@pytest.mark.parametrize("fn", ["masked_mean", "masked_whiten"])
def test_masked_backend_is_validated(fn, monkeypatch):
    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    x, mask = torch.randn(3, 4), torch.rand(3, 4) > 0.3
    f = getattr(rk, fn)
    with pytest.raises(ValueError, match="backend must be one of"):
        f(x, mask, backend="nope")
    with pytest.raises(rk.BackendUnavailableError, match=f"backend 'cuda'.*cannot run {fn}"):
        f(x, mask, backend="cuda")  # CPU tensors
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cuda")
    with pytest.raises(rk.BackendUnavailableError, match="RLHF_KERNELS_BACKEND"):
        f(x, mask)
    monkeypatch.delenv("RLHF_KERNELS_BACKEND")
    expected = f(x, mask, backend="reference")
    for backend in ("auto", "cpu"):
        if backend == "cpu" and rk.available_backends("gae", "cpu")["cpu"] is not None:
            continue
        torch.testing.assert_close(f(x, mask, backend=backend), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# The repository explains itself: no file points at a design document outside it.


def test_no_tracked_file_points_outside_the_repository():
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    # Spelled in pieces so this file does not match itself.
    needles = ("../" + "shared", "DESIGN" + ".md")
    offenders = []
    for rel in filter(None, files.decode().split("\0")):
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:
            continue
        text = data.decode("utf-8", "replace")
        offenders += [f"{rel}: {n}" for n in needles if n in text]
    assert not offenders, "files pointing at a design document outside the repository:\n" + "\n".join(offenders)
