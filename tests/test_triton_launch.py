"""Triton launch safety: every kernel runs under the inputs' device guard, out-of-range labels that
reach the kernel give NaN instead of an out-of-bounds read, and vocabulary strides other than 1
address in 64 bits.  On CPU the kernels run under TRITON_INTERPRET=1."""

import contextlib
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rlhf_kernels as rk

from .utils import DEVICE, assert_close, require

IGNORE = -100


def _triton_modules():
    require("triton", "token_logprobs")
    import rlhf_kernels.triton as tr
    from rlhf_kernels.triton import _launch, dpo, gae, kl, logprobs, ppo

    return tr, _launch, [dpo, gae, kl, logprobs, ppo]


def _kernels(modules):
    """Every kernel (a @triton.jit function taking pointers, launched with a grid) of the backend:
    module-level jit functions whose name ends in ``_kernel``."""
    import triton

    found = {}
    for mod in modules:
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and isinstance(obj, (triton.runtime.jit.JITFunction,
                                                             getattr(triton.runtime.interpreter,
                                                                     "InterpretedFunction", ()))):
                found[name] = obj
    return found


def _run_every_op(device):
    """Forward and backward of every op on the Triton backend, every aggregation mode and option
    that selects a different kernel."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(True)

    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    logits = leaf(3, 5, 17)
    labels = torch.randint(0, 17, (3, 5), generator=g).to(device)
    lp, ent = rk.token_logprobs(logits, labels, return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()
    a, b = leaf(3, 5), leaf(3, 5)
    rk.kl_penalty(a, b, backend="triton").sum().backward()
    r, v = leaf(3, 5), leaf(3, 5)
    adv, ret = rk.gae(r, v, mask, backend="triton")
    (adv.sum() + ret.sum()).backward()
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        x, y, z = leaf(3, 5), leaf(3, 5), leaf(3, 5)
        rk.ppo_policy_loss(x, y, z, mask, dual_clip=3.0, agg=agg, backend="triton")[0].backward()
        rk.ppo_value_loss(x, y, z, mask, agg=agg, backend="triton")[0].backward()
    pc, pr, rc, rr = (leaf(4) for _ in range(4))
    rk.dpo_loss(pc, pr, rc, rr, backend="triton")[0].sum().backward()


def test_every_triton_launch_goes_through_the_device_guard(monkeypatch):
    """Record the device the guard was entered with at each kernel launch: every launch of every
    kernel must happen inside ``_launch.device_guard(<the inputs' device>)``."""
    tr, _launch, modules = _triton_modules()
    kernels = _kernels(modules)
    assert len(kernels) >= 10, sorted(kernels)

    active = []  # stack of guarded devices
    launches = []  # (kernel name, guarded device or None)

    real_guard = _launch.device_guard

    @contextlib.contextmanager
    def recording_guard(device):
        active.append(device)
        try:
            with real_guard(device):
                yield
        finally:
            active.pop()

    monkeypatch.setattr(_launch, "device_guard", recording_guard)
    for name, k in kernels.items():
        real_run = k.run

        def run(*args, _name=name, _real=real_run, **kwargs):
            launches.append((_name, active[-1] if active else None))
            return _real(*args, **kwargs)

        monkeypatch.setattr(k, "run", run)

    _run_every_op(DEVICE)

    unguarded = sorted({n for n, d in launches if d is None})
    assert not unguarded, f"kernels launched outside the device guard: {unguarded}"
    want = torch.device(DEVICE)
    wrong = sorted({(n, str(d)) for n, d in launches if d.type != want.type})
    assert not wrong, f"kernels guarded with another device than the inputs' ({want}): {wrong}"
    never = sorted(set(kernels) - {n for n, _ in launches})
    assert not never, f"kernels this test did not launch (extend _run_every_op): {never}"


def test_no_direct_kernel_launch_in_the_sources():
    """Belt and braces for the recorded test above: no ``kernel[grid](...)`` outside the helper."""
    _, _launch, modules = _triton_modules()
    import re

    for mod in modules:
        src = inspect.getsource(mod)
        hits = re.findall(r"\w+_kernel\s*\[", src)
        assert not hits, f"{mod.__name__} launches {hits} directly instead of through _launch.launch"


def test_device_guard_is_a_noop_on_cpu_and_sets_the_cuda_device():
    _, _launch, _ = _triton_modules()
    with _launch.device_guard(torch.device("cpu")):
        pass
    with _launch.device_guard(None):
        pass
    if torch.cuda.is_available():
        with _launch.device_guard(torch.device("cuda", torch.cuda.device_count() - 1)):
            assert torch.cuda.current_device() == torch.cuda.device_count() - 1


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices: tensors on cuda:1 while cuda:0 is current")
def test_tensors_on_second_gpu_while_first_is_current():
    require("triton", "token_logprobs", device="cuda")
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x = torch.randn(64, 1000, device=dev, requires_grad=True)
    labels = torch.randint(0, 1000, (64,), device=dev)
    lp = rk.token_logprobs(x, labels, backend="triton")
    lp.sum().backward()
    ref_x = x.detach().double().cpu().requires_grad_(True)
    ref = torch.log_softmax(ref_x, -1).gather(-1, labels.cpu()[:, None]).squeeze(-1)
    ref.sum().backward()
    assert lp.device == dev and x.grad.device == dev
    assert_close(lp.cpu(), ref.float(), "logprob on cuda:1")
    assert_close(x.grad.cpu(), ref_x.grad.float(), "grad on cuda:1")
    y = torch.randn(8, 32, device=dev, requires_grad=True)
    m = torch.ones(8, 32, dtype=torch.bool, device=dev)
    adv, ret = rk.gae(y, y.detach(), m, backend="triton")
    adv.sum().backward()
    assert adv.device == dev and y.grad.device == dev
    assert torch.cuda.current_device() == 0


# -------------------------------------------------------------------------------------------------
# Out-of-range labels reaching the kernel (the Python check skipped): NaN, never an OOB read


def _truth(x64, labels, T):
    z = x64 / T
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    h = -(p * torch.log_softmax(z, -1)).sum(-1)
    return z, lse, p, h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_out_of_range_labels_give_nan_rows_in_the_triton_kernel(dtype):
    """Call the launchers directly (as a CUDA caller without RLHF_KERNELS_DEBUG=1 effectively
    does): rows whose label is outside [0, V) get a NaN log-prob, the others stay exact.  The bad
    labels are chosen so that an unmasked load stays inside the tensor's storage (it would read a
    neighbour's logit and return a wrong finite number, which is what this test catches)."""
    _, _, _ = _triton_modules()
    from rlhf_kernels.triton import logprobs as tl_mod

    V, T = 23, 0.7
    x64 = torch.randn(1, 7, V, dtype=torch.float64).to(dtype).double()
    labels = torch.tensor([3, -1, V, IGNORE, -5, V + 2, 0])
    bad = torch.tensor([False, True, True, False, True, True, False])
    logits = x64.to(dtype).to(DEVICE)
    lp, lse, ent = tl_mod.token_logprobs_forward(logits, labels.to(DEVICE), T, IGNORE, True)
    lp, lse, ent = lp.cpu(), lse.cpu(), ent.cpu()
    z, lse64, p, h = _truth(x64[0], labels, T)
    assert torch.isnan(lp[bad]).all(), f"rows with labels out of [0, {V}) must be NaN, got {lp[bad]}"
    good = torch.tensor([0, 6])
    want = z[good, labels[good]] - lse64[good]
    assert_close(lp[good], want.float(), "logprob of in-range rows")
    assert lp[3] == 0 and ent[3] == 0, "ignored row"
    keep = labels != IGNORE
    assert_close(ent[keep], h[keep].float(), "entropy (independent of the label)")
    assert_close(lse[keep], lse64[keep].float(), "lse")

    # Backward: (onehot - p) g / T for in-range rows, -p g / T for out-of-range rows, 0 ignored.
    g_lp = torch.randn(7)
    grad = tl_mod.token_logprobs_backward(g_lp.to(DEVICE), None, logits, labels.to(DEVICE), lse.to(DEVICE),
                                          ent.to(DEVICE), T, IGNORE).cpu()
    assert grad.shape == (1, 7, V)
    onehot = torch.zeros(7, V, dtype=torch.float64)
    onehot[good, labels[good]] = 1.0
    expected = (onehot - p) * g_lp.double()[:, None] / T
    expected[3] = 0.0
    assert torch.isfinite(grad.float()).all(), "backward of out-of-range rows must not be NaN"
    assert_close(grad[0], expected.to(dtype), "grad_logits with out-of-range labels")


# -------------------------------------------------------------------------------------------------
# Vocabulary strides other than 1


@pytest.mark.parametrize("layout", ["every_other_column", "transposed"])
def test_strided_vocab_equals_reference(layout):
    require("triton", "token_logprobs")
    V = 37
    g = torch.Generator().manual_seed(3)
    if layout == "every_other_column":
        big = torch.randn(2, 5, 2 * V, generator=g)
        logits = big[:, :, ::2]
    else:
        big = torch.randn(V, 10, generator=g)
        logits = big.t()  # [10, V] with stride (1, 10)
    assert logits.stride(-1) != 1
    labels = torch.randint(0, V, logits.shape[:-1], generator=g)
    labels.view(-1)[1] = IGNORE
    x = logits.to(DEVICE).requires_grad_(True)
    lp, ent = rk.token_logprobs(x, labels.to(DEVICE), temperature=0.9, return_entropy=True, backend="triton")
    gl, ge = torch.randn(lp.shape, generator=g), torch.randn(lp.shape, generator=g)
    ((lp * gl.to(DEVICE)).sum() + (ent * ge.to(DEVICE)).sum()).backward()

    x64 = logits.detach().double().requires_grad_(True)
    z = x64 / 0.9
    logp = torch.log_softmax(z, -1)
    keep = labels != IGNORE
    lp64 = torch.where(keep, logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ent64 = torch.where(keep, -(logp.exp() * logp).sum(-1), 0.0)
    ((lp64 * gl.double()).sum() + (ent64 * ge.double()).sum()).backward()
    assert_close(lp.detach().cpu(), lp64.float(), f"{layout} logprob")
    assert_close(ent.detach().cpu(), ent64.float(), f"{layout} entropy")
    assert_close(x.grad.cpu(), x64.grad.float(), f"{layout} grad")


_HUGE_STRIDE_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from rlhf_kernels.triton import logprobs as m
    V, stride = 4, 1 << 30           # cols * stride reaches 3 * 2^30: wraps in int32
    try:
        storage = torch.empty((V - 1) * stride + 1, dtype=torch.float16)  # 6 GiB, never touched
    except RuntimeError as e:
        print("SKIP", e); sys.exit(0)
    logits = storage.as_strided((1, 1, V), (V * stride, V * stride, stride))
    vals = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float16)
    logits.copy_(vals.view(1, 1, V))   # touches 4 pages
    labels = torch.tensor([2])
    lp, lse, ent = m.token_logprobs_forward(logits, labels, 1.0, -100, True)
    grad = m.token_logprobs_backward(torch.ones(1), None, logits, labels, lse, ent, 1.0, -100)
    print("RESULT", lp.item(), ent.item(), *grad.view(-1).tolist())
""")


def test_vocab_stride_offsets_are_64_bit():
    """A vocabulary stride of 2^30 on V = 4: column 3 lies 3 * 2^30 elements into the storage, past
    int32.  The storage is 6 GiB of untouched virtual memory (only 4 values are written), so this
    runs in a child process that may crash if the offsets wrap."""
    require("triton", "token_logprobs")
    if DEVICE != "cpu":
        pytest.skip("the 6 GiB sparse storage trick is for the CPU interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _HUGE_STRIDE_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    out = proc.stdout + proc.stderr
    if "SKIP" in proc.stdout:
        pytest.skip(f"cannot reserve 6 GiB of virtual memory here: {proc.stdout.strip()}")
    assert proc.returncode == 0, f"kernel with vocab stride 2^30 failed (rc {proc.returncode}):\n{out[-2000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, out[-2000:]
    got = torch.tensor([float(v) for v in line[0].split()[1:]], dtype=torch.float64)
    x = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    onehot = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    want = torch.cat([logp[2:3], -(p * logp).sum().view(1), onehot - p])
    assert torch.allclose(got, want, rtol=2e-3, atol=2e-3), f"got {got.tolist()}, want {want.tolist()}"
