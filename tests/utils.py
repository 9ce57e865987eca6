"""Test helpers: backend gating, dtype tolerances, and verbose comparisons against float64 truth.

Ground truths are computed here, in float64, from the formulas of the public docstrings
(rlhf_kernels/_api.py, docs/architecture.md), independently of the package's own reference code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import rlhf_kernels as rk

ALL_BACKENDS = ["reference", "triton", "cpu", "cuda"]
DEVICE = os.environ.get("RLHF_TEST_DEVICE", "cpu")
# Backends listed here must run: an unsupported-backend skip becomes a failure, so a CI that lost
# its compiled extension or its Triton kernels turns red instead of silently skipping.
REQUIRED = {b for b in os.environ.get("RLHF_TEST_REQUIRE_BACKENDS", "").split(",") if b}


def require(backend: str, op: str, dtype: torch.dtype = torch.float32, device: str = DEVICE) -> None:
    """Skip (or fail, for required backends) when ``backend`` cannot run ``op`` here."""
    reason = rk.available_backends(op, device, dtype)[backend]
    if reason is None:
        return
    if backend in REQUIRED and not (backend == "cuda" and device == "cpu") and not (
        backend == "cpu" and device != "cpu"
    ):
        pytest.fail(f"backend {backend} is required (RLHF_TEST_REQUIRE_BACKENDS) but: {reason}")
    pytest.skip(f"{backend}: {reason}")


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


# Tolerance for a result stored in this dtype (kernels compute in fp32; fp64 results of the
# reference are also computed in fp32).
TOL = {
    torch.float64: Tol(2e-5, 2e-5),
    torch.float32: Tol(2e-5, 2e-5),
    torch.bfloat16: Tol(1e-3, 1.6e-2),
    torch.float16: Tol(1e-4, 2e-3),
}

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, tol: Tol | None = None,
                 scale: float = 1.0) -> None:
    """Elementwise |actual - expected| <= atol * scale + rtol * |expected|, with infinities and
    NaNs required to match; on failure print where and by how much."""
    assert isinstance(actual, torch.Tensor), f"{name}: expected a tensor, got {type(actual)}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    tol = tol or TOL[actual.dtype]
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    same_special = (a == e) | (torch.isnan(a) & torch.isnan(e))
    diff = (a - e).abs()
    allowed = tol.atol * scale + tol.rtol * e.abs()
    bad = ~(same_special | (diff <= allowed))
    if bool(bad.any()):
        n_bad = int(bad.sum())
        d = torch.where(bad, diff.nan_to_num(float("inf")), torch.zeros_like(diff))
        flat = int(d.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {n_bad} of {a.numel()} elements differ; worst at {idx}: actual {a[idx].item()!r}, "
            f"expected {e[idx].item()!r}, |diff| {diff[idx].item():.3g} > allowed {allowed[idx].item():.3g} "
            f"(atol={tol.atol}*{scale}, rtol={tol.rtol})"
        )


def assert_error_bounded(actual: torch.Tensor, truth64: torch.Tensor, name: str, factor: float = 2.0,
                         floor: float = 1e-6) -> None:
    """Low precision: max error of ``actual`` against float64 truth is at most ``factor`` times the
    error of PyTorch's own rounding of the truth to ``actual.dtype``, plus a small floor."""
    truth = truth64.detach().double().cpu()
    a = actual.detach().double().cpu()
    own = (truth.to(actual.dtype).double() - truth).abs().max().item() if truth.numel() else 0.0
    err = (a - truth).abs().max().item() if truth.numel() else 0.0
    assert err <= factor * own + floor * max(1.0, truth.abs().max().item() if truth.numel() else 1.0), (
        f"{name}: max error {err:.3g} exceeds {factor} x PyTorch's own {actual.dtype} rounding error "
        f"{own:.3g} (+ floor)"
    )


def assert_all_finite(t: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(t.detach())
    assert not bool(bad.any()), f"{name}: {int(bad.sum())} non-finite values, first at {bad.nonzero()[0].tolist()}"


def make(shape, dtype, device=DEVICE, scale=1.0, requires_grad=False, generator=None):
    """Random normal values rounded to ``dtype`` (so the float64 truth sees the same values)."""
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).to(device)
    return x.requires_grad_(requires_grad)


def leaf64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().cpu().requires_grad_(True)


def grad_or_zero(leaf: torch.Tensor) -> torch.Tensor:
    """The gradient of a leaf, or zeros when nothing reached it (an all-masked input)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
