"""token_logprobs: values and logits gradients of every backend against float64 truth."""

import pytest
import torch

import rlhf_kernels as rk

from .utils import DEVICE, DTYPES, TOL, assert_all_finite, assert_close, assert_error_bounded, leaf64, require

IGNORE = -100

# (leading shape, V): odd vocabularies (not a multiple of any block size), T = 1, one row.
SHAPES = [
    ((1,), 5),
    ((2, 3), 37),
    ((3, 1), 129),
    ((5,), 1000),
    ((1, 4), 2),
    ((2, 2), 4099),
]


def truth(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int = IGNORE):
    """float64 log-prob and entropy from the definition, with autograd for the gradients."""
    z = logits / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    # p log p -> 0 as p -> 0; mask the log first so -inf logits give no NaN in the gradient either.
    ent = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    zero = torch.zeros((), dtype=lp.dtype)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


def make_case(lead, V, dtype, scale=3.0, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, lead, generator=g)
    drop = torch.rand(lead, generator=g) < ignore_frac
    labels = torch.where(drop, torch.full_like(labels, IGNORE), labels)
    return logits, labels


def run_and_check(backend, logits_cpu, labels_cpu, temperature, return_entropy, name):
    dtype = logits_cpu.dtype
    logits = logits_cpu.to(DEVICE).requires_grad_(True)
    labels = labels_cpu.to(DEVICE)
    before = logits.detach().clone()
    out = rk.token_logprobs(logits, labels, temperature=temperature, ignore_index=IGNORE,
                            return_entropy=return_entropy, backend=backend)
    lp, ent = out if return_entropy else (out, None)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    x64 = leaf64(logits_cpu)
    lp64, ent64 = truth(x64, labels_cpu, temperature)
    assert_close(lp, lp64, f"{name} logprobs")
    g = torch.Generator().manual_seed(1)
    g_lp = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    g_ent = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    loss = (lp.double().cpu() * g_lp).sum()
    loss64 = (lp64 * g_lp).sum()
    if return_entropy:
        assert ent.dtype == torch.float32 and ent.shape == labels.shape
        assert_close(ent, ent64, f"{name} entropy", scale=max(1.0, float(ent64.detach().abs().max())))
        loss = loss + (ent.double().cpu() * g_ent).sum()
        loss64 = loss64 + (ent64 * g_ent).sum()
    loss.backward()
    loss64.backward()
    assert logits.grad.dtype == dtype and logits.grad.shape == logits.shape
    assert_close(logits.grad, x64.grad, f"{name} d/dlogits")
    if dtype != torch.float32:
        assert_error_bounded(logits.grad, x64.grad, f"{name} d/dlogits")
    # Ignored positions get exactly zero gradient; the caller's logits are never written.
    ignored = labels_cpu == IGNORE
    assert bool((logits.grad.cpu()[ignored] == 0).all()), f"{name}: gradient leaked into ignored rows"
    assert torch.equal(logits.detach(), before), f"{name}: logits were modified in place"
    return lp, ent


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,V", SHAPES, ids=[f"{'x'.join(map(str, s))}xV{v}" for s, v in SHAPES])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("return_entropy", [False, True], ids=["lp", "lp+ent"])
def test_values_and_grads(backend, dtype, lead, V, temperature, return_entropy):
    require(backend, "token_logprobs", dtype)
    logits, labels = make_case(lead, V, dtype)
    run_and_check(backend, logits, labels, temperature, return_entropy, f"{backend}/{dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits(backend, dtype):
    """±1e4 logits and -inf entries (not at the label): results finite and equal to the truth."""
    require(backend, "token_logprobs", dtype)
    logits, labels = make_case((4, 3), 67, dtype, seed=3)
    logits[0, 0, :] = -1e4
    logits[0, 0, 5] = 1e4
    logits[1, :, ::3] = float("-inf")
    logits[2, 1, :] = 1e4  # a flat row of huge values
    logits[3, 2, 7] = -1e4
    labels[1] = torch.where(labels[1] % 3 == 0, labels[1] + 1, labels[1])  # labels avoid -inf entries
    labels[0, 0] = 5
    lp, ent = run_and_check(backend, logits, labels, 1.0, True, f"{backend}/{dtype} extreme")
    assert_all_finite(lp, "logprobs")
    assert_all_finite(ent, "entropy")


def test_all_ignored_gives_zeros(backend):
    require(backend, "token_logprobs")
    logits = torch.randn(3, 11, device=DEVICE, requires_grad=True)
    labels = torch.full((3,), IGNORE, device=DEVICE)
    lp, ent = rk.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert bool((lp == 0).all()) and bool((ent == 0).all())
    (lp.sum() + ent.sum()).backward()
    assert bool((logits.grad == 0).all())


def test_custom_ignore_index_and_int32_labels(backend):
    require(backend, "token_logprobs")
    logits, labels = make_case((6,), 19, torch.float32, ignore_frac=0.0)
    labels[2] = 3
    labels[4] = 3
    lp = rk.token_logprobs(logits.to(DEVICE), labels.to(DEVICE).int(), ignore_index=3, backend=backend)
    lp64, _ = truth(logits.double(), labels, 1.0, ignore_index=3)
    assert_close(lp, lp64, "ignore_index=3")
    assert lp[2].item() == 0 and lp[4].item() == 0


def test_non_contiguous_logits(backend):
    """A strided view (every other vocab column of a wider tensor, transposed batch)."""
    require(backend, "token_logprobs")
    base = torch.randn(7, 3, 2 * 33, dtype=torch.float64).float().to(DEVICE)
    logits = base[..., ::2].transpose(0, 1)  # [3, 7, 33], non-contiguous
    assert not logits.is_contiguous()
    labels = torch.randint(0, 33, (3, 7)).to(DEVICE)
    logits_leaf = logits.detach().clone().requires_grad_(True)
    view = logits_leaf.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    lp, ent = rk.token_logprobs(view, labels, return_entropy=True, backend=backend)
    x64 = leaf64(logits)
    lp64, ent64 = truth(x64, labels.cpu(), 1.0)
    assert_close(lp, lp64, "strided logprobs")
    assert_close(ent, ent64, "strided entropy")
    (lp.sum() + 2 * ent.sum()).backward()
    (lp64.sum() + 2 * ent64.sum()).backward()
    assert_close(logits_leaf.grad, x64.grad, "strided grad")


def test_grad_of_entropy_only(backend):
    """Backward through the entropy alone (the log-prob output unused)."""
    require(backend, "token_logprobs")
    logits, labels = make_case((4,), 50, torch.float32)
    x = logits.to(DEVICE).requires_grad_(True)
    _, ent = rk.token_logprobs(x, labels.to(DEVICE), temperature=0.5, return_entropy=True, backend=backend)
    ent.sum().backward()
    x64 = leaf64(logits)
    _, ent64 = truth(x64, labels, 0.5)
    ent64.sum().backward()
    assert_close(x.grad, x64.grad, "entropy-only grad", tol=TOL[torch.float32])


def test_empty_input(backend):
    require(backend, "token_logprobs")
    logits = torch.randn(0, 7, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE)
    lp, ent = rk.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.shape == (0, 7)
