"""kl_penalty, ppo_policy_loss, ppo_value_loss, dpo_loss: values, stats and every gradient of
every backend against float64 truth written from the formulas of the public docstrings
(rlhf_kernels/_api.py) and docs/architecture.md."""

import math

import pytest
import torch
import torch.nn.functional as F

import rlhf_kernels as rk

from .utils import DEVICE, DTYPES, assert_all_finite, assert_close, grad_or_zero, leaf64, require

# ------------------------------------------------------------------------------------------------
# float64 truths


def kl_truth(lp, ref, estimator):
    d = lp - ref
    return {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) - 1 + d, "abs": d.abs()}[estimator]


def agg_truth(x, m, agg):
    """Aggregation over [B, T] by explicit loops over rows (independent of the package)."""
    m = m.bool()
    if agg == "token-mean":
        n = int(m.sum())
        return x[m].sum() / n if n else x.sum() * 0
    B = x.shape[0]
    rows = []
    for b in range(B):
        n = int(m[b].sum())
        if agg == "seq-mean-token-mean":
            if n:
                rows.append(x[b][m[b]].sum() / n)
        else:  # seq-mean-token-sum
            rows.append(x[b][m[b]].sum())
    if agg == "seq-mean-token-mean":
        return torch.stack(rows).mean() if rows else x.sum() * 0
    return torch.stack(rows).sum() / B


def policy_truth(lp, old, adv, m, clip_low, clip_high, dual_clip, agg):
    mb = m.bool()
    lp = torch.where(mb, lp, torch.zeros_like(lp))
    old = torch.where(mb, old, torch.zeros_like(old))
    adv = torch.where(mb, adv, torch.zeros_like(adv))
    ratio = torch.exp(torch.clamp(lp - old, -20, 20))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    n = max(int(mb.sum()), 1)
    clipfrac = ((pg2 > pg1) & mb).sum().double() / n
    approx_kl = torch.where(mb, old - lp, torch.zeros_like(lp)).sum() / n
    return agg_truth(pg, mb, agg), clipfrac, approx_kl.detach()


def value_truth(v, old, ret, m, clip, agg):
    mb = m.bool()
    v = torch.where(mb, v, torch.zeros_like(v))
    old = torch.where(mb, old, torch.zeros_like(old))
    ret = torch.where(mb, ret, torch.zeros_like(ret))
    l1 = (v - ret) ** 2
    if clip is None:
        return 0.5 * agg_truth(l1, mb, agg), torch.zeros((), dtype=torch.float64)
    vc = old + torch.clamp(v - old, -clip, clip)
    l2 = (vc - ret) ** 2
    n = max(int(mb.sum()), 1)
    return 0.5 * agg_truth(torch.maximum(l1, l2), mb, agg), ((l2 > l1) & mb).sum().double() / n


def dpo_truth(pc, pr, rc, rr, beta, loss_type, ls):
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = -(1 - ls) * F.logsigmoid(beta * h) - ls * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (-(1 - ls) * F.logsigmoid(beta * h) + ls * F.logsigmoid(-beta * h)) / (1 - 2 * ls)
    return losses, beta * (pc - rc), beta * (pr - rr)


def rand(shape, dtype, g, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def mask_of(shape, kind, g):
    if kind == "full":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "random":
        m = torch.rand(shape, generator=g) < 0.7
        if len(shape) == 2 and shape[0] > 1:
            m[-1] = False  # a row with no valid token
        return m
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool)
    raise ValueError(kind)


def backend_inputs(tensors, requires_grad=True):
    return [t.to(DEVICE).requires_grad_(requires_grad) for t in tensors]


def check_grads(outs, leaves, truth_leaves, names):
    for leaf, t64, name in zip(leaves, truth_leaves, names):
        g = grad_or_zero(leaf)
        assert g.dtype == leaf.dtype, f"{name}: gradient dtype {g.dtype} != input dtype {leaf.dtype}"
        assert_all_finite(g, f"d/d{name}")
        assert_close(g, grad_or_zero(t64), f"d/d{name}", scale=max(1.0, float(grad_or_zero(t64).abs().max())))


# ------------------------------------------------------------------------------------------------
# kl_penalty


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 1), (4, 37), (2, 3, 5)])
def test_kl_penalty(backend, estimator, dtype, shape):
    require(backend, "kl_penalty", dtype)
    g = torch.Generator().manual_seed(0)
    lp, ref = rand(shape, dtype, g, 2.0, -3.0), rand(shape, dtype, g, 2.0, -3.0)
    a, b = backend_inputs([lp, ref])
    out = rk.kl_penalty(a, b, estimator=estimator, backend=backend)
    assert out.dtype == torch.float32 and out.shape == shape
    lp64, ref64 = leaf64(lp), leaf64(ref)
    t = kl_truth(lp64, ref64, estimator)
    assert_close(out, t, f"kl {estimator}", scale=max(1.0, float(t.detach().abs().max())))
    w = torch.randn(shape, dtype=torch.float64)
    (out.double().cpu() * w).sum().backward()
    (t * w).sum().backward()
    check_grads(out, [a, b], [lp64, ref64], ["logprobs", "ref_logprobs"])


def test_kl_extremes_finite(backend):
    require(backend, "kl_penalty")
    lp = torch.tensor([-30.0, 0.0, -1e-3, -15.0], device=DEVICE)
    ref = torch.tensor([-10.0, -30.0, -1e-3, 0.0], device=DEVICE)
    for est in ("k1", "k2", "k3", "abs"):
        out = rk.kl_penalty(lp, ref, estimator=est, backend=backend)
        assert_all_finite(out, est)
        assert_close(out, kl_truth(lp.double().cpu(), ref.double().cpu(), est), est,
                     scale=float(kl_truth(lp.double().cpu(), ref.double().cpu(), est).abs().max()))
    k3 = rk.kl_penalty(lp, ref, estimator="k3", backend=backend)
    assert bool((k3 >= 0).all()), "k3 must be non-negative"


# ------------------------------------------------------------------------------------------------
# ppo_policy_loss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
POLICY_CLIPS = [
    pytest.param(dict(clip_low=0.2), id="sym"),
    pytest.param(dict(clip_low=0.2, clip_high=0.28), id="clip-higher"),
    pytest.param(dict(clip_low=0.2, dual_clip=3.0), id="dual"),
]


def run_policy(backend, shape, dtype, kind, clip_kwargs, agg, nan_masked=False, seed=0, lp_scale=0.3,
               only_first=False):
    g = torch.Generator().manual_seed(seed)
    old = rand(shape, dtype, g, 1.0, -2.0)
    lp = (old.double() + torch.randn(shape, generator=g, dtype=torch.float64) * lp_scale).to(dtype)
    adv = rand(shape, dtype, g)
    m = mask_of(shape, kind, g)
    lp64, old64, adv64 = leaf64(lp), leaf64(old), leaf64(adv)
    kw = dict(clip_low=0.2, clip_high=None, dual_clip=None)
    kw.update(clip_kwargs)
    ch = kw["clip_high"] if kw["clip_high"] is not None else kw["clip_low"]
    loss64, cf64, kl64 = policy_truth(lp64, old64, adv64, m, kw["clip_low"], ch, kw["dual_clip"], agg)
    if nan_masked:
        lp = torch.where(m, lp, torch.full_like(lp, float("nan")))
        old = torch.where(m, old, torch.full_like(old, float("nan")))
        adv = torch.where(m, adv, torch.full_like(adv, float("inf")))
    # only_first: logprobs alone needs a gradient (a PPO step), the case of the cpu backend's
    # training forward, which saves d loss / d logprobs instead of recomputing it in backward.
    leaves = backend_inputs([lp]) + backend_inputs([old, adv], requires_grad=not only_first)
    loss, stats = rk.ppo_policy_loss(*leaves, m.to(DEVICE), agg=agg, backend=backend, **clip_kwargs)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert {"clipfrac", "approx_kl"} <= set(stats)
    assert_close(loss, loss64, "policy loss")
    assert_close(stats["clipfrac"], cf64, "clipfrac")
    assert_close(stats["approx_kl"], kl64, "approx_kl")
    loss.backward()
    if loss64.requires_grad:
        loss64.backward()
    n = 1 if only_first else 3
    check_grads(loss, leaves[:n], [lp64, old64, adv64][:n], ["logprobs", "old_logprobs", "advantages"][:n])
    return loss, stats, leaves


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_kwargs", POLICY_CLIPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (4, 37)])
def test_ppo_policy_loss(backend, agg, clip_kwargs, dtype, shape):
    require(backend, "ppo_policy_loss", dtype)
    run_policy(backend, shape, dtype, "random", clip_kwargs, agg)


def test_ppo_policy_large_ratio_clamped(backend):
    """log-ratios beyond +-20 are clamped: finite loss, zero gradient through the clamp."""
    require(backend, "ppo_policy_loss")
    lp = torch.tensor([[0.0, -50.0, -1.0]], device=DEVICE, requires_grad=True)
    old = torch.tensor([[-40.0, 0.0, -1.0]], device=DEVICE)
    adv = torch.tensor([[-1.0, 1.0, 1.0]], device=DEVICE)
    m = torch.ones(1, 3, dtype=torch.bool, device=DEVICE)
    loss, _ = rk.ppo_policy_loss(lp, old, adv, m, backend=backend)
    # token 0: ratio e^20 (clamped), A < 0 -> pg = e^20; token 1: ratio e^-20, A > 0 -> pg = -e^-20
    # (the unclipped term is the larger); token 2: ratio 1 -> pg = -1.
    expected = (math.exp(20.0) - math.exp(-20.0) - 1.0) / 3
    assert math.isfinite(loss.item())
    assert_close(loss, torch.tensor(expected, dtype=torch.float64), "clamped loss")
    loss.backward()
    # The clamp stops the gradient at tokens 0 and 1; token 2 gets -A * ratio / 3.
    assert_close(lp.grad, torch.tensor([[0.0, 0.0, -1.0 / 3]], dtype=torch.float64), "clamped grad")
    assert_all_finite(lp.grad, "grad")


@pytest.mark.parametrize("agg", AGGS)
def test_ppo_policy_empty_mask(backend, agg):
    require(backend, "ppo_policy_loss")
    loss, stats, leaves = run_policy(backend, (3, 5), torch.float32, "empty", {}, agg, nan_masked=True)
    assert loss.item() == 0.0
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    for leaf in leaves:
        assert bool((grad_or_zero(leaf) == 0).all())


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_kwargs", POLICY_CLIPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,nan_masked", [("random", False), ("random", True), ("empty", True)])
def test_ppo_policy_loss_logprobs_grad_only(backend, agg, clip_kwargs, dtype, kind, nan_masked):
    require(backend, "ppo_policy_loss", dtype)
    loss, _, leaves = run_policy(backend, (4, 37), dtype, kind, clip_kwargs, agg, nan_masked=nan_masked,
                                 lp_scale=0.6, only_first=True)
    if kind == "empty":
        assert loss.item() == 0.0 and bool((grad_or_zero(leaves[0]) == 0).all())


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_kwargs", POLICY_CLIPS)
def test_ppo_policy_nan_masked(backend, agg, clip_kwargs):
    require(backend, "ppo_policy_loss")
    loss, stats, leaves = run_policy(backend, (4, 9), torch.float32, "random", clip_kwargs, agg,
                                     nan_masked=True, seed=2, lp_scale=1.0)
    assert_all_finite(loss, "loss")
    for v in stats.values():
        assert_all_finite(v, "stat")


def test_ppo_policy_clipping_actually_happens(backend):
    """Large policy moves: the clipfrac is non-trivial, so the clipped branches are exercised."""
    require(backend, "ppo_policy_loss")
    _, stats, _ = run_policy(backend, (4, 50), torch.float32, "full", {"dual_clip": 2.0}, "token-mean",
                             seed=4, lp_scale=1.0)
    assert 0.2 < stats["clipfrac"].item() < 0.9
    assert stats["clipfrac_lower"].item() > 0.0


# ------------------------------------------------------------------------------------------------
# ppo_value_loss


def run_value(backend, shape, dtype, kind, clip, agg, nan_masked=False, seed=0, only_first=False):
    g = torch.Generator().manual_seed(seed)
    old = rand(shape, dtype, g)
    v = (old.double() + torch.randn(shape, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    ret = rand(shape, dtype, g)
    m = mask_of(shape, kind, g)
    v64, old64, ret64 = leaf64(v), leaf64(old), leaf64(ret)
    loss64, cf64 = value_truth(v64, old64, ret64, m, clip, agg)
    if nan_masked:
        v = torch.where(m, v, torch.full_like(v, float("nan")))
        old = torch.where(m, old, torch.full_like(old, float("nan")))
        ret = torch.where(m, ret, torch.full_like(ret, float("-inf")))
    leaves = backend_inputs([v]) + backend_inputs([old, ret], requires_grad=not only_first)
    loss, stats = rk.ppo_value_loss(*leaves, m.to(DEVICE), clip=clip, agg=agg, backend=backend)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and "clipfrac" in stats
    assert_close(loss, loss64, "value loss")
    assert_close(stats["clipfrac"], cf64, "value clipfrac")
    loss.backward()
    if loss64.requires_grad:
        loss64.backward()
    n = 1 if only_first else 3
    check_grads(loss, leaves[:n], [v64, old64, ret64][:n], ["values", "old_values", "returns"][:n])
    return loss, stats, leaves


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [0.2, 0.0, None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (4, 37)])
def test_ppo_value_loss(backend, agg, clip, dtype, shape):
    require(backend, "ppo_value_loss", dtype)
    run_value(backend, shape, dtype, "random", clip, agg)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,nan_masked", [("random", False), ("random", True), ("empty", True)])
def test_ppo_value_loss_values_grad_only(backend, agg, clip, dtype, kind, nan_masked):
    require(backend, "ppo_value_loss", dtype)
    loss, _, leaves = run_value(backend, (4, 37), dtype, kind, clip, agg, nan_masked=nan_masked, only_first=True)
    if kind == "empty":
        assert loss.item() == 0.0 and bool((grad_or_zero(leaves[0]) == 0).all())


@pytest.mark.parametrize("agg", AGGS)
def test_ppo_value_empty_and_nan(backend, agg):
    require(backend, "ppo_value_loss")
    loss, stats, leaves = run_value(backend, (3, 4), torch.float32, "empty", 0.2, agg, nan_masked=True)
    assert loss.item() == 0.0 and stats["clipfrac"].item() == 0.0
    for leaf in leaves:
        assert bool((grad_or_zero(leaf) == 0).all())
    loss, _, _ = run_value(backend, (4, 11), torch.float32, "random", 0.2, agg, nan_masked=True, seed=5)
    assert_all_finite(loss, "loss")


# ------------------------------------------------------------------------------------------------
# dpo_loss


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0),
                                          ("robust", 0.0), ("robust", 0.2)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 7, 33])
def test_dpo_loss(backend, loss_type, ls, beta, dtype, B):
    require(backend, "dpo_loss", dtype)
    g = torch.Generator().manual_seed(B)
    ins = [rand((B,), dtype, g, 5.0, -40.0) for _ in range(4)]
    leaves = backend_inputs(ins)
    losses, cr, rr = rk.dpo_loss(*leaves, beta=beta, loss_type=loss_type, label_smoothing=ls, backend=backend)
    for t in (losses, cr, rr):
        assert t.shape == (B,) and t.dtype == torch.float32
    l64 = [leaf64(t) for t in ins]
    tl, tc, tr = dpo_truth(*l64, beta, loss_type, ls)
    scale = max(1.0, float(tl.detach().abs().max()))
    assert_close(losses, tl, f"dpo {loss_type}", scale=scale)
    assert_close(cr, tc, "chosen_rewards", scale=max(1.0, float(tc.detach().abs().max())))
    assert_close(rr, tr, "rejected_rewards", scale=max(1.0, float(tr.detach().abs().max())))
    w = torch.randn(B, dtype=torch.float64)
    (losses.double().cpu() * w).sum().backward()
    (tl * w).sum().backward()
    check_grads(losses, leaves, l64, ["policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"])


def test_dpo_extreme_margins_finite(backend):
    require(backend, "dpo_loss")
    pc = torch.tensor([1e4, -1e4, 0.0], device=DEVICE, requires_grad=True)
    z = torch.zeros(3, device=DEVICE)
    for lt in ("sigmoid", "robust", "hinge"):
        losses, _, _ = rk.dpo_loss(pc, z, z, z, beta=1.0, loss_type=lt, label_smoothing=0.1 if lt != "hinge" else 0.0,
                                   backend=backend)
        assert_all_finite(losses, lt)
        losses.sum().backward()
        assert_all_finite(pc.grad, lt)
        pc.grad = None


def test_outputs_have_no_grad_into_rewards(backend):
    """chosen/rejected rewards are logging values, detached as in TRL."""
    require(backend, "dpo_loss")
    x = [torch.randn(4, device=DEVICE, requires_grad=True) for _ in range(4)]
    _, cr, rr = rk.dpo_loss(*x, backend=backend)
    assert not cr.requires_grad and not rr.requires_grad
