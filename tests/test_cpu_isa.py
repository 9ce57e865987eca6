"""The cpu backend's SIMD copies and its training forwards.

The elementwise loops of the C++ CPU kernels exist three times (baseline SSE2/NEON, AVX2+FMA,
AVX-512), picked at run time; ``RLHF_KERNELS_CPU_ISA=base|avx2`` lowers the choice, so every copy
this CPU can run is checked here against float64 truth, each in its own process (the choice is
read once).  The training forwards of kl_penalty, ppo_policy_loss, ppo_value_loss and dpo_loss
(``<op>_fwd_dx``: the derivative saved in the forward, the backward one multiply) must be the path
a training step takes, and must not be taken where they do not apply.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rlhf_kernels as rk

from .utils import require

ROOT = Path(__file__).resolve().parents[1]


def _isa_here() -> str:
    require("cpu", "kl_penalty")
    return torch.ops.rlhf_kernels.cpu_isa()


def test_cpu_isa_is_reported():
    isa = _isa_here()
    assert isa in ("avx512", "avx2", "base")
    with open(os.devnull, "w") as devnull:
        text = rk.info(file=devnull)
    assert any(line.split() == ["cpu", "isa", isa] for line in text.splitlines()), text[:2000]


# Run in a fresh process with RLHF_KERNELS_CPU_ISA set: each op of the cpu backend against a
# float64 computation of its formula (the same truths as tests/test_losses.py), shapes whose
# length is not a multiple of any vector width, values and gradients.
_CHECK = textwrap.dedent(
    """
    import sys, torch
    import rlhf_kernels as rk
    from tests.test_losses import kl_truth, policy_truth, value_truth, dpo_truth
    rk.kl_penalty(torch.zeros(1), torch.zeros(1), backend="cpu")  # loads the extension
    print("ISA", torch.ops.rlhf_kernels.cpu_isa())
    g = torch.Generator().manual_seed(0)
    B, T = 3, 53

    def close(a, b, what, tol=2e-5):
        err = float((a.double() - b.double()).abs().max())
        scale = max(1.0, float(b.double().abs().max()))
        assert err <= tol * scale, f"{what}: max error {err} (scale {scale})"

    def leaf(t):
        return t.clone().requires_grad_()

    lp = -torch.rand(B, T, generator=g) * 4
    ref = lp + 0.5 * torch.randn(B, T, generator=g)
    for est in ("k1", "k2", "k3", "abs"):
        a = leaf(lp)
        out = rk.kl_penalty(a, ref, estimator=est, backend="cpu")
        a64 = leaf(lp.double())
        t = kl_truth(a64, ref.double(), est)
        close(out, t, "kl " + est)
        w = torch.randn(B, T, generator=g)
        (out * w).sum().backward()
        (t * w.double()).sum().backward()
        close(a.grad, a64.grad, "kl grad " + est)

    old = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        for dual in (None, 3.0):
            a = leaf(lp)
            loss, stats = rk.ppo_policy_loss(a, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual,
                                             agg=agg, backend="cpu")
            a64 = leaf(lp.double())
            l64, cf64, kl64 = policy_truth(a64, old.double(), adv.double(), mask, 0.2, 0.28, dual, agg)
            close(loss, l64, "policy " + agg)
            close(stats["clipfrac"], cf64, "clipfrac")
            loss.backward()
            l64.backward()
            close(a.grad, a64.grad, "policy grad " + agg)
        for clip in (None, 0.2):
            v = leaf(adv)
            loss, stats = rk.ppo_value_loss(v, old, lp, mask, clip=clip, agg=agg, backend="cpu")
            v64 = leaf(adv.double())
            l64, cf64 = value_truth(v64, old.double(), lp.double(), mask, clip, agg)
            close(loss, l64, "value " + agg)
            loss.backward()
            l64.backward()
            close(v.grad, v64.grad, "value grad " + agg)

    pairs = [-torch.rand(37, generator=g) * 50 for _ in range(4)]
    for loss_type in ("sigmoid", "ipo", "hinge", "robust"):
        ls = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
        leaves = [leaf(t) for t in pairs[:2]]
        losses, cr, rr = rk.dpo_loss(*leaves, *pairs[2:], beta=0.1, loss_type=loss_type, label_smoothing=ls,
                                     backend="cpu")
        l64s = [leaf(t.double()) for t in pairs[:2]]
        tl, tc, tr = dpo_truth(*l64s, *[t.double() for t in pairs[2:]], 0.1, loss_type, ls)
        close(losses, tl, "dpo " + loss_type)
        close(cr, tc, "chosen rewards")
        losses.sum().backward()
        tl.sum().backward()
        for x, x64 in zip(leaves, l64s):
            close(x.grad, x64.grad, "dpo grad " + loss_type)

    logits = torch.randn(2 * T, 101, generator=g) * 3
    labels = torch.randint(0, 101, (2 * T,), generator=g)
    x = leaf(logits)
    lp_, ent = rk.token_logprobs(x, labels, return_entropy=True, backend="cpu")
    x64 = leaf(logits.double())
    t = torch.log_softmax(x64, -1)
    tlp = t.gather(-1, labels[:, None]).squeeze(-1)
    tent = -(t.exp() * t).sum(-1)
    close(lp_, tlp, "token_logprobs")
    close(ent, tent, "entropy")
    (lp_.sum() + ent.sum()).backward()
    (tlp.sum() + tent.sum()).backward()
    close(x.grad, x64.grad, "token_logprobs grad")
    print("OK")
    """
)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_simd_copy_against_float64(isa):
    here = _isa_here()
    order = ["base", "avx2", "avx512"]
    if order.index(isa) > order.index(here):
        pytest.skip(f"this CPU runs at most {here}")
    env = dict(os.environ, RLHF_KERNELS_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"ISA {isa}" in proc.stdout and "OK" in proc.stdout


def _dx_path(out) -> bool:
    return out.grad_fn is not None and "dx_autograd" in type(out.grad_fn).__name__


def test_training_forward_is_the_path_of_a_training_step():
    require("cpu", "kl_penalty")
    B, T = 2, 9
    lp = torch.randn(B, T, requires_grad=True)
    old, adv, mask = torch.randn(B, T), torch.randn(B, T), torch.ones(B, T, dtype=torch.bool)
    assert _dx_path(rk.kl_penalty(lp, old, estimator="k3", backend="cpu"))
    assert _dx_path(rk.ppo_policy_loss(lp, old, adv, mask, backend="cpu")[0])
    assert _dx_path(rk.ppo_value_loss(lp, old, adv, mask, clip=0.2, backend="cpu")[0])
    pc = torch.randn(B, requires_grad=True)
    assert _dx_path(rk.dpo_loss(pc, torch.randn(B), torch.randn(B), torch.randn(B), beta=0.1, backend="cpu")[0])
    # not where the saved derivative would not be the whole gradient, nor without autograd
    old_g = old.clone().requires_grad_()
    assert not _dx_path(rk.ppo_policy_loss(lp, old_g, adv, mask, backend="cpu")[0])
    assert not _dx_path(rk.ppo_value_loss(lp, old_g, adv, mask, clip=0.2, backend="cpu")[0])
    with torch.no_grad():
        assert rk.kl_penalty(lp, old, estimator="k3", backend="cpu").grad_fn is None
    # ... and both gradients are still right when old_logprobs needs one too (the _bwd op)
    loss, _ = rk.ppo_policy_loss(lp, old_g, adv, mask, backend="cpu")
    loss.backward()
    assert old_g.grad is not None and torch.allclose(old_g.grad, -lp.grad)
