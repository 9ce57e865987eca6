"""The compiled extension itself: dispatcher registration (torch.library.opcheck: schema, fake
implementation, autograd registration), the loader's reporting, and a few edges that the shared
suites do not reach (rows whose first chunks are all -inf, rows longer than a chunk)."""

import os
import subprocess
import sys

import pytest
import torch

import rlhf_kernels as rk

from .utils import DEVICE, REQUIRED, assert_close, leaf64, require


def _need_extension(device="cpu"):
    backend = "cpu" if device == "cpu" else "cuda"
    require(backend, "gae", device=device)


def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    B, T = 3, 5
    mask = (torch.rand(B, T, generator=g) < 0.7).to(device)
    logits = r(6, 37)
    labels = torch.tensor([0, 5, -100, 36, 2, 7], device=device)
    ops = torch.ops.rlhf_kernels
    return [
        ("token_logprobs_fwd", ops.token_logprobs_fwd, (logits.requires_grad_(), labels, 0.7, -100, True)),
        ("token_logprobs_fwd bf16", ops.token_logprobs_fwd,
         (r(4, 9, dtype=torch.bfloat16).requires_grad_(), labels[:4] % 9, 1.0, -100, False)),
        ("kl_penalty_fwd", ops.kl_penalty_fwd, (r(B, T).requires_grad_(), r(B, T).requires_grad_(), 2)),
        ("gae_fwd", ops.gae_fwd, (r(B, T).requires_grad_(), r(B, T).requires_grad_(), mask, 0.99, 0.95)),
        ("ppo_policy_loss_fwd", ops.ppo_policy_loss_fwd,
         (r(B, T).requires_grad_(), r(B, T).requires_grad_(), r(B, T).requires_grad_(), mask, 0.2, 0.28, 3.0, 1)),
        ("ppo_value_loss_fwd", ops.ppo_value_loss_fwd,
         (r(B, T).requires_grad_(), r(B, T).requires_grad_(), r(B, T).requires_grad_(), mask, 0.2, 2)),
        ("ppo_value_loss_fwd noclip", ops.ppo_value_loss_fwd,
         (r(B, T).requires_grad_(), r(B, T), r(B, T), mask, None, 0)),
        ("dpo_loss_fwd", ops.dpo_loss_fwd, tuple(r(7).requires_grad_() for _ in range(4)) + (0.1, 0, 0.1)),
        # CPU only: the training forwards (no autograd of their own: the wrappers' Function holds it)
        ("kl_penalty_fwd_dx", ops.kl_penalty_fwd_dx, (r(B, T), r(B, T, dtype=torch.bfloat16), 2)),
        ("ppo_policy_loss_fwd_dx", ops.ppo_policy_loss_fwd_dx, (r(B, T), r(B, T), r(B, T), mask, 0.2, 0.28, 3.0, 1)),
        ("ppo_value_loss_fwd_dx", ops.ppo_value_loss_fwd_dx,
         (r(B, T, dtype=torch.float16), r(B, T), r(B, T), mask, 0.2, 2)),
        ("dpo_loss_fwd_dx", ops.dpo_loss_fwd_dx, tuple(r(7) for _ in range(4)) + (0.1, 3, 0.1)),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck(case):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of each op."""
    _need_extension(DEVICE)
    if case >= 8 and DEVICE != "cpu":
        pytest.skip("the _fwd_dx training forwards are CPU ops")
    _name, op, args = _opcheck_cases(DEVICE)[case]
    torch.library.opcheck(op, args)


def test_op_rejects_out_of_range_labels():
    """Called directly (bypassing the public API's checks), the op refuses bad labels instead of
    reading out of bounds."""
    _need_extension()
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.rlhf_kernels.token_logprobs_fwd(torch.randn(2, 5), torch.tensor([1, 7]), 1.0, -100, False)


def test_build_info_matches_running_torch():
    _need_extension()
    info = rk._extension.build_info()
    assert info["status"] == "loaded", info
    assert info["built for torch"] == torch.__version__.split("+")[0], info


def test_token_logprobs_rows_with_leading_minus_inf_chunks():
    """The online log-sum-exp starts from -inf for whole chunks, then rescales."""
    require("cpu", "token_logprobs")
    V = 3000
    logits = torch.randn(3, V, dtype=torch.float64).float() * 4
    logits[0, :2500] = float("-inf")  # two full chunks of -inf before any mass
    logits[1, :1024] = float("-inf")
    logits[2, 1500:] = float("-inf")  # mass only in the first chunks
    labels = torch.tensor([2600, 2000, 10])
    x = logits.clone().requires_grad_(True)
    lp, ent = rk.token_logprobs(x, labels, return_entropy=True, backend="cpu")
    x64 = leaf64(logits)
    logp = torch.log_softmax(x64, -1)
    lp64 = logp.gather(-1, labels[:, None]).squeeze(-1)
    p = logp.exp()
    ent64 = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    assert_close(lp, lp64, "logprobs")
    assert_close(ent, ent64, "entropy", scale=float(ent64.detach().abs().max()))
    (lp.sum() + ent.sum()).backward()
    (lp64.sum() + ent64.sum()).backward()
    assert_close(x.grad, x64.grad, "grad")
    assert bool(torch.isfinite(x.grad).all())


def _run_python(code: str, **env):
    full = dict(os.environ, **env)
    full.pop("RLHF_TEST_REQUIRE_BACKENDS", None)
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=full, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_broken_library_falls_back_and_says_why_once():
    """A library that cannot load never breaks import; 'auto' warns once with the reason and runs
    the reference; an explicit backend='cpu' raises with the reason."""
    code = """
import warnings, torch, rlhf_kernels as rk
reason = rk.available_backends('gae', 'cpu')['cpu']
print('REASON', reason)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    r = torch.randn(2, 3); m = torch.ones(2, 3, dtype=torch.bool)
    a1, _ = rk.gae(r, r, m)
    a2, _ = rk.gae(r, r, m)
    ref, _ = rk.gae(r, r, m, backend='reference')
print('WARNINGS', sum('cpu backend is not available' in str(x.message) for x in w))
print('EQUAL', bool(torch.equal(a1, ref)))
try:
    rk.gae(r, r, m, backend='cpu')
except rk.BackendUnavailableError as e:
    print('RAISES', 'does_not_exist.so' in str(e))
"""
    out = _run_python(code, RLHF_KERNELS_LIBRARY="/nonexistent/does_not_exist.so", RLHF_KERNELS_JIT="0")
    assert out.returncode == 0, out.stderr
    assert "REASON" in out.stdout and "does_not_exist.so" in out.stdout and "RLHF_KERNELS_LIBRARY" in out.stdout
    assert "WARNINGS 1" in out.stdout, out.stdout
    assert "EQUAL True" in out.stdout and "RAISES True" in out.stdout


def test_jit_disabled_without_aot_build_says_so(tmp_path):
    """With no ahead-of-time build visible and RLHF_KERNELS_JIT=0 the reason names both."""
    code = """
import rlhf_kernels._extension as e
e._aot_candidates = lambda: []
print('REASON', e.unavailable_reason('cpu'))
"""
    out = _run_python(code, RLHF_KERNELS_JIT="0", RLHF_KERNELS_LIBRARY="")
    assert out.returncode == 0, out.stderr
    assert "RLHF_KERNELS_JIT=0" in out.stdout and "ahead-of-time" in out.stdout, out.stdout


def test_cpu_backend_is_required_in_ci():
    """Where CI requires the cpu backend, the extension must have loaded (not a silent skip)."""
    if "cpu" not in REQUIRED:
        pytest.skip("RLHF_TEST_REQUIRE_BACKENDS does not list cpu")
    assert rk._extension.unavailable_reason("cpu") is None, rk._extension.build_info()
