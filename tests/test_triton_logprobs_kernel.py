"""The Triton token_logprobs kernels themselves, called through their launchers with small blocks,
so that every path runs under the interpreter: the aligned unmasked main loop, the masked head
(rows that do not start on a 16-byte boundary) and tail, a block larger than the row, V = 1,
strided rows and vocabularies, temperatures other than 1, bf16/fp16/fp32, entropy on and off,
ignored rows and out-of-range labels.  Values and gradients against float64 truth."""

import math

import pytest
import torch

from .test_token_logprobs import truth
from .utils import DEVICE, assert_close, require

IGNORE = -100


def _lp():
    require("triton", "token_logprobs")
    from rlhf_kernels.triton import logprobs

    return logprobs


def _rows(n, V, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, V, generator=g, dtype=torch.float64) * scale).to(dtype)


def _check(logits3, labels, temperature, entropy, block_v, name, oor=()):
    """Forward and backward of the launchers on ``logits3`` [A, T, V] against float64 truth."""
    lp_mod = _lp()
    A, T, V = logits3.shape
    n = A * T
    lab = labels.to(DEVICE)
    x = logits3.to(DEVICE) if logits3.device.type != DEVICE else logits3
    lp, lse, ent = lp_mod.token_logprobs_forward(x, lab, temperature, IGNORE, entropy, block_v=block_v)
    rows = logits3.reshape(n, V).double().cpu().requires_grad_(True)
    safe = labels.clone()
    for i in oor:
        safe[i] = 0
    lp64, ent64 = truth(rows, safe, temperature)
    lse64 = torch.logsumexp(rows.detach() / temperature, dim=-1)
    valid = labels != IGNORE
    ok = valid.clone()
    for i in oor:
        ok[i] = False
    assert_close(lp[ok], lp64[ok], f"{name} logprobs")
    for i in oor:
        assert math.isnan(float(lp[i])), f"{name}: out-of-range label {int(labels[i])} must give NaN, got {float(lp[i])}"
    assert bool((lp[~valid] == 0).all()) and bool((lse[~valid] == 0).all()), f"{name}: ignored rows not zero"
    assert_close(lse[valid], lse64[valid], f"{name} lse", scale=max(1.0, float(lse64.abs().max())))
    if entropy:
        assert_close(ent, ent64, f"{name} entropy", scale=max(1.0, float(ent64.detach().abs().max())))
    else:
        assert ent.numel() == 0

    g = torch.Generator().manual_seed(7)
    g_lp = torch.randn(n, generator=g, dtype=torch.float64)
    g_ent = torch.randn(n, generator=g, dtype=torch.float64)
    grad = lp_mod.token_logprobs_backward(g_lp.float().to(DEVICE), g_ent.float().to(DEVICE) if entropy else None,
                                          x, lab, lse, ent, temperature, IGNORE, block_v=block_v)
    assert grad.dtype == logits3.dtype and grad.shape == (A, T, V) and grad.is_contiguous()
    # Truth of the gradient: out-of-range rows get -softmax g_lp / T (no one-hot) plus the entropy term.
    p = torch.softmax(rows.detach() / temperature, dim=-1)
    onehot = torch.zeros_like(p)
    for i in range(n):
        if valid[i] and i not in oor:
            onehot[i, int(labels[i])] = 1.0
    logp = torch.log_softmax(rows.detach() / temperature, dim=-1)
    h = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1, keepdim=True)
    d = (onehot - p) * g_lp[:, None]
    if entropy:
        d = d - p * (logp.masked_fill(p == 0, 0.0) + h) * g_ent[:, None]
    d = torch.where(valid[:, None], d / temperature, torch.zeros_like(d))
    assert_close(grad.reshape(n, V), d, f"{name} d/dlogits", scale=max(1.0, float(d.abs().max())))
    assert bool((grad.reshape(n, V)[~valid] == 0).all()), f"{name}: gradient leaked into ignored rows"


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (V, block): V not a multiple of 16, of the block, or of the 16-byte vector; V below the block; V = 1.
SIZES = [(100, 16), (131, 32), (64, 16), (37, 64), (1, 16), (7, 16), (4099, 512)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("V,block_v", SIZES, ids=[f"V{v}-B{b}" for v, b in SIZES])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("entropy", [False, True], ids=["lp", "lp+ent"])
def test_contiguous_rows(dtype, V, block_v, temperature, entropy):
    n = 5
    logits = _rows(n, V, dtype, seed=V + block_v)
    labels = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(V))
    labels[1] = IGNORE
    _check(logits.view(1, n, V), labels, temperature, entropy, block_v, f"{dtype} V={V} B={block_v}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("row_stride,offset", [(103, 0), (101, 3), (112, 5), (100, 1)])
def test_strided_rows_every_head(dtype, row_stride, offset):
    """Rows of a wider buffer, starting at every residue modulo the 16-byte vector (the masked head
    takes 0 to 7 elements) and on a base that is itself not 16-byte aligned (offset)."""
    V, n = 97, 9
    buf = _rows(n * row_stride + offset + V, 1, dtype, seed=row_stride).reshape(-1)
    logits = buf[offset:offset + n * row_stride].view(n, row_stride)[:, :V]
    assert logits.stride() == (row_stride, 1)
    labels = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(1))
    labels[4] = IGNORE
    for ent in (False, True):
        _check(logits.unsqueeze(0), labels, 0.8, ent, 16, f"{dtype} stride={row_stride}+{offset}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_leading_strides_and_vocab_stride(dtype):
    """[A, T, V] views with a gap between batch rows, and a vocabulary stride of 2 (the int64 path)."""
    A, T, V = 2, 3, 45
    big = _rows(A * (T + 2), V + 7, dtype, seed=3).view(A, T + 2, V + 7)
    view = big[:, 1:T + 1, 2:V + 2]
    labels = torch.randint(0, V, (A * T,), generator=torch.Generator().manual_seed(2))
    labels[0] = IGNORE
    _check(view, labels, 1.3, True, 16, f"{dtype} [A,T,V] view")
    wide = _rows(A * T, 2 * V, dtype, seed=4).view(A, T, 2 * V)[:, :, ::2]
    assert wide.stride(-1) == 2
    _check(wide, labels, 0.9, True, 16, f"{dtype} vocab stride 2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_out_of_range_labels_give_nan_rows(dtype):
    """Labels -1 and >= V (only from callers that skip the Python check) load nothing and give NaN;
    the other rows, the lse and the gradient of those rows stay right."""
    V, n = 70, 6
    logits = _rows(n, V, dtype, seed=5)
    labels = torch.tensor([3, -1, V, IGNORE, V + 1000, 69])
    _check(logits.view(1, n, V), labels, 1.0, True, 16, f"{dtype} out-of-range", oor=(1, 2, 4))


def test_extreme_rows():
    """-inf logits (masked vocab entries), one dominant logit, a row of equal logits and a row that
    changes its maximum in every block: the one-exp2 online update and the final merge."""
    V = 90
    rows = torch.randn(5, V, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    rows[0, ::3] = -float("inf")
    rows[1] = -30.0
    rows[1, 50] = 40.0
    rows[2] = 2.5
    rows[3] = torch.linspace(-50, 80, V, dtype=torch.float64)  # the max moves forward all the time
    rows[4] = torch.linspace(80, -50, V, dtype=torch.float64)
    labels = torch.tensor([1, 50, 7, 89, 0])
    for ent in (False, True):
        _check(rows.float().view(1, 5, V), labels, 0.5, ent, 16, f"extreme ent={ent}")


def test_nan_logit_gives_nan_row():
    lp_mod = _lp()
    rows = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    rows[1, 17] = float("nan")
    lp, lse, ent = lp_mod.token_logprobs_forward(rows.view(1, 3, 40).to(DEVICE), torch.tensor([0, 0, 5]).to(DEVICE),
                                                 1.0, IGNORE, True, block_v=16)
    assert math.isnan(float(lp[1])) and math.isnan(float(lse[1])) and math.isnan(float(ent[1]))
    assert not math.isnan(float(lp[0])) and not math.isnan(float(lp[2]))


def test_interpreter_config_is_fixed_and_gpu_configs_autotuned():
    """Under the interpreter the launcher uses one fixed block (deterministic, fast tests); on a GPU
    the kernels are wrapped by triton.autotune over a small BLOCK_V x num_warps list keyed on V."""
    lp_mod = _lp()
    import triton

    assert isinstance(lp_mod._fwd_tuned, triton.runtime.Autotuner)
    assert isinstance(lp_mod._bwd_tuned, triton.runtime.Autotuner)
    assert "V" in lp_mod._fwd_tuned.keys and "V" in lp_mod._bwd_tuned.keys
    assert 2 <= len(lp_mod._fwd_tuned.configs) <= 8
    assert lp_mod._interp_block(100) == 128 and lp_mod._interp_block(128256) == 512
