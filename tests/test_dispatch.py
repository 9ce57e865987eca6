"""Backend selection: explicit backends, "auto", the environment variable, and the report."""

import subprocess
import sys

import pytest
import torch

import rlhf_kernels as rk


def _args():
    return torch.randn(2, 5), torch.randint(0, 5, (2,))


def test_reference_always_available():
    for op in rk.OPS:
        assert rk.available_backends(op, "cpu")["reference"] is None


def test_unavailable_backend_raises_with_reason():
    logits, labels = _args()
    # CUDA kernels cannot run on CPU tensors, whatever is built.
    with pytest.raises(rk.BackendUnavailableError) as info:
        rk.token_logprobs(logits, labels, backend="cuda")
    msg = str(info.value)
    assert "cuda" in msg and "token_logprobs" in msg
    assert isinstance(info.value, RuntimeError)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = rk.available_backends("gae", "cpu")["triton"]
    assert reason is not None


def test_env_var_is_honoured_for_auto(monkeypatch):
    logits, labels = _args()
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    out = rk.token_logprobs(logits, labels)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    assert torch.allclose(out.double(), expected, atol=1e-6)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cuda")
    with pytest.raises(rk.BackendUnavailableError, match="RLHF_KERNELS_BACKEND"):
        rk.token_logprobs(logits, labels)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RLHF_KERNELS_BACKEND"):
        rk.token_logprobs(logits, labels)
    # An explicit backend argument wins over the environment.
    out = rk.token_logprobs(logits, labels, backend="reference")
    assert torch.allclose(out.double(), expected, atol=1e-6)


def test_auto_on_cpu_never_picks_triton_or_cuda(monkeypatch):
    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    from rlhf_kernels._dispatch import resolve

    for op in rk.OPS:
        name, _ = resolve(op, "auto", torch.device("cpu"), (torch.float32,))
        assert name in ("cpu", "reference")


def test_auto_on_cpu_uses_the_compiled_kernels_where_they_were_measured_faster(monkeypatch):
    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    from rlhf_kernels._dispatch import resolve

    if rk.available_backends("gae", "cpu", torch.float32)["cpu"] is not None:
        pytest.skip("the cpu backend is not built here")
    # Every op the cpu backend implements: derived from the op set, so a new op is covered unlisted.
    picked = {op: resolve(op, "auto", torch.device("cpu"), (torch.float32,))[0] for op in rk.OPS}
    assert picked == {op: "cpu" for op in rk.OPS}
    assert "token_logprobs" in picked and "gae" in picked  # the op set is not empty by accident


def test_auto_on_cuda_prefers_triton_when_it_qualifies():
    from rlhf_kernels._dispatch import auto_order

    for op in rk.OPS:
        order = auto_order("cuda", op)
        assert order[0] == "triton" and order[-1] == "reference"


def test_info_reports_every_op_and_backend():
    text = rk.info(file=open("/dev/null", "w"))
    for op in rk.OPS:
        assert op in text
    for name in rk.BACKEND_NAMES:
        assert name in text
    assert "torch" in text


def test_python_m_rlhf_kernels_runs():
    out = subprocess.run([sys.executable, "-m", "rlhf_kernels"], capture_output=True, text=True, check=True)
    assert "token_logprobs" in out.stdout and "reference" in out.stdout
