"""masked_mean / masked_whiten against float64 truth computed over the selected entries."""

import pytest
import torch

import rlhf_kernels as rk

from .utils import DEVICE, assert_close, leaf64


def test_masked_mean_all_and_dim():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    m = torch.rand(4, 6, generator=g) < 0.5
    m[2] = False
    xn = torch.where(m, x, torch.full_like(x, float("nan")))
    out = rk.masked_mean(xn.to(DEVICE), m.to(DEVICE))
    assert_close(out, x.double()[m].mean(), "masked_mean")
    rows = rk.masked_mean(xn.to(DEVICE), m.to(DEVICE), dim=1)
    expected = torch.stack([x.double()[b][m[b]].mean() if m[b].any() else torch.tensor(0.0, dtype=torch.float64)
                            for b in range(4)])
    assert_close(rows, expected, "masked_mean dim=1")


def test_masked_mean_empty_is_zero_with_zero_grad():
    x = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    out = rk.masked_mean(x, torch.zeros(3, 4, dtype=torch.bool, device=DEVICE))
    assert out.item() == 0.0
    out.backward()
    assert bool((x.grad == 0).all())


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, generator=g) * 3 + 2
    m = torch.rand(5, 7, generator=g) < 0.6
    xn = torch.where(m, x, torch.full_like(x, float("nan")))
    out = rk.masked_whiten(xn.to(DEVICE), m.to(DEVICE), shift_mean=shift_mean)
    sel = x.double()[m]
    mean, var = sel.mean(), sel.var(unbiased=True)
    expected = (x.double() - mean) / torch.sqrt(var + 1e-8)
    if not shift_mean:
        expected = expected + mean
    expected = torch.where(m, expected, torch.zeros_like(expected))
    assert_close(out, expected, "masked_whiten", scale=3.0)
    assert bool(torch.isfinite(out).all())
    whitened = out.cpu().double()[m]
    if shift_mean:
        assert abs(whitened.mean().item()) < 1e-5 and abs(whitened.std().item() - 1) < 1e-4


def test_masked_whiten_grad_and_empty():
    x = torch.randn(2, 5, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    xl = x.clone().to(DEVICE).float().requires_grad_(True)
    w = torch.randn(2, 5, dtype=torch.float64)
    (rk.masked_whiten(xl, m.to(DEVICE)).double().cpu() * w).sum().backward()
    x64 = leaf64(x)
    sel = x64[m]
    e = (x64 - sel.mean()) / torch.sqrt(sel.var() + 1e-8)
    (torch.where(m, e, torch.zeros_like(e)) * w).sum().backward()
    assert_close(xl.grad, x64.grad, "masked_whiten grad", scale=10)
    empty = rk.masked_whiten(torch.randn(2, 3, device=DEVICE), torch.zeros(2, 3, device=DEVICE))
    assert bool((empty == 0).all())
