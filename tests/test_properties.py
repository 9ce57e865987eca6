"""Property-based checks (hypothesis): random shapes and masks against float64 truths."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlhf_kernels as rk

from .test_gae import truth as gae_truth
from .test_losses import agg_truth
from .utils import assert_close


@st.composite
def batch_and_mask(draw, max_b=5, max_t=12):
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    bits = draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(B, T)
    return B, T, g, mask


@settings(max_examples=60, deadline=None)
@given(batch_and_mask(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_matches_textbook_on_any_mask(bm, gamma, lam):
    B, T, g, mask = bm
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    A, R = rk.gae(r.float(), v.float(), mask, gamma=gamma, lam=lam, backend="reference")
    A64, R64 = gae_truth(r.float().double(), v.float().double(), mask, gamma, lam)
    assert_close(A, A64, "advantages", scale=T)
    assert_close(R, R64, "returns", scale=T)


@settings(max_examples=60, deadline=None)
@given(batch_and_mask(), st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]))
def test_value_loss_without_clip_is_half_mse_under_any_mask(bm, agg):
    B, T, g, mask = bm
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    ret = torch.randn(B, T, generator=g, dtype=torch.float64)
    loss, _ = rk.ppo_value_loss(v.float(), v.float(), ret.float(), mask, clip=None, agg=agg, backend="reference")
    expected = 0.5 * agg_truth((v.float().double() - ret.float().double()) ** 2, mask, agg)
    assert_close(loss, expected, "value loss")
