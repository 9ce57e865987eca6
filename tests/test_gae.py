"""gae: advantages/returns and their gradients against a float64 textbook loop."""

import pytest
import torch

import rlhf_kernels as rk

from .utils import DEVICE, DTYPES, assert_all_finite, assert_close, grad_or_zero, leaf64, require


def truth(rewards, values, mask, gamma, lam):
    """Textbook GAE over the valid steps of each row, written independently: collect the valid
    indices, run the recursion over them only (skipped steps carry nothing), float64."""
    B, T = rewards.shape
    adv = [[torch.zeros((), dtype=torch.float64) for _ in range(T)] for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if bool(mask[b, t])]
        a_next = torch.zeros((), dtype=torch.float64)
        v_next = torch.zeros((), dtype=torch.float64)
        for t in reversed(idx):
            delta = rewards[b, t] + gamma * v_next - values[b, t]
            a_next = delta + gamma * lam * a_next
            v_next = values[b, t]
            adv[b][t] = a_next
    A = torch.stack([torch.stack(row) for row in adv]) if T else torch.zeros(B, 0, dtype=torch.float64)
    m = mask.bool()
    R = torch.where(m, A + torch.where(m, values, torch.zeros_like(values)), torch.zeros_like(A))
    return A, R


def make_mask(B, T, kind, g):
    if kind == "full":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "right_pad":
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    if kind == "interior":
        return torch.rand(B, T, generator=g) < 0.6
    if kind == "empty":
        return torch.zeros(B, T, dtype=torch.bool)
    raise ValueError(kind)


SHAPES = [(1, 1), (1, 7), (3, 1), (4, 33), (5, 130)]


def run_case(backend, B, T, dtype, kind, gamma, lam, nan_masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    m = make_mask(B, T, kind, g)
    r64, v64 = leaf64(r), leaf64(v)
    A64, R64 = truth(r64, v64, m, gamma, lam)
    if nan_masked:
        r = torch.where(m, r, torch.full_like(r, float("nan")))
        v = torch.where(m, v, torch.full_like(v, float("inf")))
    rr = r.to(DEVICE).requires_grad_(True)
    vv = v.to(DEVICE).requires_grad_(True)
    A, R = rk.gae(rr, vv, m.to(DEVICE), gamma=gamma, lam=lam, backend=backend)
    assert A.dtype == torch.float32 and R.dtype == torch.float32 and A.shape == (B, T)
    scale = max(1.0, T / 10)
    assert_close(A, A64, "advantages", scale=scale)
    assert_close(R, R64, "returns", scale=scale)
    assert bool((A.detach().cpu()[~m] == 0).all()) and bool((R.detach().cpu()[~m] == 0).all())
    gw = torch.Generator().manual_seed(seed + 1)
    wA = torch.randn(B, T, generator=gw, dtype=torch.float64)
    wR = torch.randn(B, T, generator=gw, dtype=torch.float64)
    ((A.double().cpu() * wA).sum() + (R.double().cpu() * wR).sum()).backward()
    ((A64 * wA).sum() + (R64 * wR).sum()).backward()
    grad_r = rr.grad if rr.grad is not None else torch.zeros_like(rr)
    grad_v = vv.grad if vv.grad is not None else torch.zeros_like(vv)
    assert_all_finite(grad_r, "d/drewards")
    assert_all_finite(grad_v, "d/dvalues")
    assert_close(grad_r, grad_or_zero(r64), "d/drewards", scale=scale)
    assert_close(grad_v, grad_or_zero(v64), "d/dvalues", scale=scale)
    return A, R


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("kind", ["full", "right_pad", "interior"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_and_grads(backend, B, T, kind, dtype):
    require(backend, "gae", dtype)
    run_case(backend, B, T, dtype, kind, gamma=0.99, lam=0.95)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.0), (0.0, 0.5), (0.5, 1.0)])
def test_gamma_lambda(backend, gamma, lam):
    require(backend, "gae")
    run_case(backend, 3, 17, torch.float32, "interior", gamma=gamma, lam=lam, seed=7)


def test_nan_at_masked_positions_does_not_leak(backend):
    require(backend, "gae")
    A, R = run_case(backend, 4, 23, torch.float32, "interior", 0.99, 0.95, nan_masked=True, seed=3)
    assert_all_finite(A, "advantages")
    assert_all_finite(R, "returns")


def test_empty_mask(backend):
    require(backend, "gae")
    A, R = run_case(backend, 3, 9, torch.float32, "empty", 0.99, 0.95)
    assert bool((A == 0).all()) and bool((R == 0).all())


def test_right_padding_equals_unpadded(backend):
    """Appending padding (with garbage values) to a sequence leaves its advantages unchanged."""
    require(backend, "gae")
    r = torch.randn(1, 10)
    v = torch.randn(1, 10)
    A1, R1 = rk.gae(r.to(DEVICE), v.to(DEVICE), torch.ones(1, 10, dtype=torch.bool, device=DEVICE),
                    gamma=0.97, lam=0.9, backend=backend)
    r2 = torch.cat([r, torch.full((1, 5), 1e6)], dim=1)
    v2 = torch.cat([v, torch.full((1, 5), -1e6)], dim=1)
    m2 = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], dim=1)
    A2, R2 = rk.gae(r2.to(DEVICE), v2.to(DEVICE), m2.to(DEVICE), gamma=0.97, lam=0.9, backend=backend)
    assert_close(A2[:, :10], A1, "padded advantages")
    assert_close(R2[:, :10], R1, "padded returns")


def test_float_and_int_masks(backend):
    require(backend, "gae")
    g = torch.Generator().manual_seed(5)
    r = torch.randn(2, 8, generator=g).to(DEVICE)
    v = torch.randn(2, 8, generator=g).to(DEVICE)
    m = (torch.rand(2, 8, generator=g) < 0.7).to(DEVICE)
    ref = rk.gae(r, v, m, backend=backend)
    for mm in (m.float(), m.long(), m.to(torch.uint8)):
        out = rk.gae(r, v, mm, backend=backend)
        assert_close(out[0], ref[0], f"advantages with {mm.dtype} mask")
