"""Kernel edge cases across backends: ignored rows of -inf/NaN logits, temperatures whose reciprocal
overflows float32, and masks that are neither bool nor exactly 0/1.  Expected values are computed
here in float64 from the formulas, not by the package."""

import pytest
import torch

import rlhf_kernels as rk

from .utils import DEVICE, assert_close, require

IGNORE = -100


# -------------------------------------------------------------------------------------------------
# An ignored row whose logits are all -inf or NaN: zero gradient on every backend


@pytest.mark.parametrize("fill", [float("-inf"), float("nan")], ids=["neg_inf", "nan"])
@pytest.mark.parametrize("return_entropy", [False, True], ids=["lp", "lp+ent"])
def test_ignored_row_of_nonfinite_logits_gets_zero_gradient(backend, fill, return_entropy):
    require(backend, "token_logprobs")
    V = 13
    x = torch.randn(4, V, dtype=torch.float64)
    x[1] = fill
    x[3, :] = fill  # a second ignored row of the same kind, last in the batch
    labels = torch.tensor([2, IGNORE, 7, IGNORE])
    logits = x.float().to(DEVICE).requires_grad_(True)
    out = rk.token_logprobs(logits, labels.to(DEVICE), ignore_index=IGNORE, return_entropy=return_entropy,
                            backend=backend)
    lp, ent = out if return_entropy else (out, None)
    g_lp = torch.randn(4, dtype=torch.float64)
    g_ent = torch.randn(4, dtype=torch.float64)
    loss = (lp * g_lp.float().to(DEVICE)).sum()
    if return_entropy:
        loss = loss + (ent * g_ent.float().to(DEVICE)).sum()
    loss.backward()
    grad = logits.grad.detach().cpu()
    assert torch.equal(grad[[1, 3]], torch.zeros(2, V)), f"{backend}: ignored rows' gradient {grad[[1, 3]]}"
    assert torch.equal(lp.detach().cpu()[[1, 3]], torch.zeros(2))
    # The valid rows are untouched by their neighbours: (onehot - p) * g (+ entropy term).
    z = x[[0, 2]]
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1)
    onehot = torch.nn.functional.one_hot(labels[[0, 2]], V).double()
    expected = (onehot - p) * g_lp[[0, 2], None]
    if return_entropy:
        h = -(p * logp).sum(-1, keepdim=True)
        expected = expected + (-p * (logp + h)) * g_ent[[0, 2], None]
    assert_close(grad[[0, 2]], expected.float(), f"{backend} valid rows' gradient")


# -------------------------------------------------------------------------------------------------
# Temperatures: 1 / T must be a finite float32


@pytest.mark.parametrize("temperature", [1e-40, 5e-39, 1e-45, 1e39])
def test_temperature_outside_float32_range_is_rejected(backend, temperature):
    require(backend, "token_logprobs")
    logits = torch.randn(2, 3, 11, device=DEVICE)
    labels = torch.randint(0, 11, (2, 3), device=DEVICE)
    with pytest.raises(ValueError, match="temperature"):
        rk.token_logprobs(logits, labels, temperature=temperature, backend=backend)


def test_smallest_allowed_temperature_gives_finite_results(backend):
    """At the bound (the smallest normal float32) every backend still computes the right,
    finite answer for moderate logits: the rejection is not wider than it must be."""
    require(backend, "token_logprobs")
    from rlhf_kernels._validation import TEMPERATURE_MIN

    T = TEMPERATURE_MIN * 4
    x = torch.tensor([[0.5, -0.25, 0.125, 0.0], [-1.0, 0.75, 0.5, -0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    lp = rk.token_logprobs(x.float().to(DEVICE), labels.to(DEVICE), temperature=T, backend=backend)
    z = x / T  # about 1e37: finite in float32 too
    truth = z.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
    assert torch.isfinite(lp).all(), lp
    # Row 0: the label is the argmax, log-prob 0; row 1: z[2] - z[1] = -0.25 / T.
    assert_close(lp.cpu(), truth.float(), f"{backend} logprob at T={T:.3g}")


# -------------------------------------------------------------------------------------------------
# Masks must be bool or exactly 0/1


def _mask_calls(backend, mask):
    r, v, a = (torch.randn(2, 4, device=DEVICE) for _ in range(3))
    return {
        "gae": lambda: rk.gae(r, v, mask, backend=backend),
        "ppo_policy_loss": lambda: rk.ppo_policy_loss(r, v, a, mask, backend=backend),
        "ppo_value_loss": lambda: rk.ppo_value_loss(r, v, a, mask, backend=backend),
        "masked_mean": lambda: rk.masked_mean(r, mask, backend=backend),
        "masked_whiten": lambda: rk.masked_whiten(r, mask, backend=backend),
    }


OPS_WITH_MASK = ["gae", "ppo_policy_loss", "ppo_value_loss", "masked_mean", "masked_whiten"]
BAD_MASKS = {
    "float_half": lambda: torch.tensor([[1.0, 0.5, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]),
    "float_nan": lambda: torch.tensor([[1.0, float("nan"), 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]),
    "float_neg": lambda: torch.tensor([[1.0, 1.0, -1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]),
    "int_two": lambda: torch.tensor([[1, 1, 1, 0], [1, 2, 0, 0]]),
    "uint8_255": lambda: torch.tensor([[1, 1, 1, 0], [1, 255, 0, 0]], dtype=torch.uint8),
}


@pytest.mark.skipif(DEVICE != "cpu", reason="on GPU tensors the mask values are checked only with "
                    "RLHF_KERNELS_DEBUG=1 (no host sync on the hot path)")
@pytest.mark.parametrize("kind", list(BAD_MASKS))
@pytest.mark.parametrize("op", OPS_WITH_MASK)
def test_mask_not_zero_one_is_rejected(backend, op, kind):
    if op in ("gae", "ppo_policy_loss", "ppo_value_loss"):
        require(backend, op)
    mask = BAD_MASKS[kind]().to(DEVICE)
    with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1"):
        _mask_calls(backend, mask)[op]()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.uint8, torch.int32])
@pytest.mark.parametrize("op", OPS_WITH_MASK)
def test_zero_one_mask_of_any_dtype_equals_bool_mask(backend, op, dtype):
    # masked_mean/masked_whiten have no kernel, but an explicit backend that cannot run here raises
    # like any op's: skip where the backend's kernels are not available (gae stands in for them).
    require(backend, op if op in ("gae", "ppo_policy_loss", "ppo_value_loss") else "gae")
    bool_mask = torch.tensor([[True, False, True, True], [True, True, False, False]], device=DEVICE)
    torch.manual_seed(1)
    expected = _mask_calls(backend, bool_mask)[op]()
    torch.manual_seed(1)
    got = _mask_calls(backend, bool_mask.to(dtype))[op]()
    flat_e = expected if isinstance(expected, tuple) else (expected,)
    flat_g = got if isinstance(got, tuple) else (got,)
    for e, g in zip(flat_e, flat_g):
        if isinstance(e, dict):
            for k in e:
                assert torch.equal(e[k], g[k]), k
        else:
            assert torch.equal(e, g)
