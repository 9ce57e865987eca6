"""The CUDA glue (csrc/cuda/*_glue.cpp) cannot run without a GPU; these checks read its source so a
direct torch.ops.rlhf_kernels.* call keeps its guarantees: every op function first constructs
``Args`` (csrc/cuda/glue.h) over ALL its tensor arguments, which checks that each is a defined CUDA
tensor on one device and holds that device's CUDAGuard; the launch uses that device's stream
(``Args::stream``), never the bare current stream; optional tensors are checked too.  The glue's
compilation itself is checked by .ci/nvcc_check.sh (g++ -fsyntax-only against the torch headers)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLUES = sorted((ROOT / "csrc" / "cuda").glob("*_glue.cpp"))
_FUNC = re.compile(r"^(?:Tensor\d?|Tensor)\s+(\w+)\(([^)]*)\)\s*\{(.*?)^\}", re.S | re.M)


def _functions(path):
    text = path.read_text()
    return [(m.group(1), m.group(2), m.group(3)) for m in _FUNC.finditer(text)]


def test_every_family_has_glue():
    assert {p.stem.replace("_glue", "") for p in GLUES} >= {"logprobs", "kl", "gae", "ppo", "dpo"}


@pytest.mark.parametrize("path", GLUES, ids=[p.name for p in GLUES])
def test_glue_functions_check_every_tensor_under_the_device_guard(path):
    funcs = _functions(path)
    impls = re.findall(r'm\.impl\("(\w+)",\s*&rlhf_kernels::cuda::(\w+)\)', path.read_text())
    assert impls, f"{path.name}: no TORCH_LIBRARY_IMPL registrations found"
    by_name = {name: (params, body) for name, params, body in funcs}
    for op, fn in impls:
        assert fn in by_name, f"{path.name}: {fn} not parsed"
        params, body = by_name[fn]
        tensors = re.findall(r"const Tensor&\s+(\w+)", params)
        optionals = re.findall(r"const std::optional<Tensor>&\s+(\w+)", params)
        first = body.strip().split(";")[0]
        m = re.match(r'Args\s+\w+\("(\w+)",\s*\{(.*)\}\)$', first, re.S)
        assert m, f"{path.name}:{fn}: the first statement must construct Args, got {first[:80]!r}"
        assert m.group(1) == op, f"{path.name}:{fn}: Args names {m.group(1)!r}, the op is {op!r}"
        listed = re.findall(r'\{"(\w+)",\s*&(\w+)\}', m.group(2))
        assert {v for _, v in listed} == set(tensors), (
            f"{path.name}:{fn}: Args checks {sorted(v for _, v in listed)}, tensor arguments are {sorted(tensors)}")
        for opt in optionals:
            assert re.search(rf'\.optional\("\w+",\s*{opt}\)', body), f"{path.name}:{fn}: optional {opt} unchecked"
        assert "CUDAGuard guard(" not in body, f"{path.name}:{fn}: a second guard outside Args"
        assert re.search(r"\w+\.stream\(\)", body), f"{path.name}:{fn}: launch must use Args::stream()"
        assert not re.search(r"[^.\w]stream\(\)", body), f"{path.name}:{fn}: bare stream() (current device's)"


def test_glue_header_checks_device_and_uses_the_device_stream():
    glue_h = (ROOT / "csrc" / "cuda" / "glue.h").read_text()
    assert "getCurrentCUDAStream(device.index())" in glue_h
    assert "is_cuda()" in glue_h and "t->device() == first->second->device()" in glue_h
    assert "guard_.emplace(device_)" in glue_h


def test_logits_read_in_place_with_their_row_stride():
    """A [N, V] view with a row stride != V and a unit last stride goes to the kernel as is."""
    src = (ROOT / "csrc" / "cuda" / "logprobs_glue.cpp").read_text()
    assert "logits_in.stride(1) == 1" in src and "row_stride" in src
    cu = (ROOT / "csrc" / "cuda" / "logprobs.cu").read_text()
    assert "row * row_stride" in cu and "const int64_t row = blockIdx.x" in cu  # 64-bit row offsets
