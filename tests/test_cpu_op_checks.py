"""Direct ``torch.ops.rlhf_kernels.*`` calls on CPU tensors bypass the Python API's checks, so the
C++ CPU ops check their arguments themselves: wrong dtype, wrong number of dimensions, mismatched
sizes, wrong enum codes give a RuntimeError that names the argument (never a silent conversion or
an out-of-bounds read).  Also: the CPU ops read strided views in place and take bf16 inputs
without changing the results; token_logprobs gives the same values at 1 and 2 threads."""

import pytest
import torch

from .utils import require

B, T = 3, 40


@pytest.fixture(autouse=True)
def _extension():
    require("cpu", "gae", device="cpu")


def ops():
    return torch.ops.rlhf_kernels


def r(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def mask(*shape):
    return torch.arange(shape[-1]).expand(*shape) < shape[-1] - 3


def _bad_cases():
    """(id, op name, args, name the message must contain)."""
    x, m = r(B, T), mask(B, T)
    w = torch.full((B,), 0.1)
    g1 = torch.tensor(1.0)
    logits, labels = r(6, 11), torch.tensor([0, 3, -100, 10, 2, 5])
    lse, ent, glp = r(6), r(6), r(6)
    v = r(8)
    cases = [
        # kl
        ("kl int logprobs", "kl_penalty_fwd", (x.to(torch.int32), x, 2), "logprobs"),
        ("kl ref shape", "kl_penalty_fwd", (x, r(B, T + 1), 2), "ref_logprobs"),
        ("kl ref dtype", "kl_penalty_fwd", (x, x.to(torch.int64), 2), "ref_logprobs"),
        ("kl estimator", "kl_penalty_fwd", (x, x, 7), "estimator"),
        ("kl bwd grad shape", "kl_penalty_bwd", (r(B), x, x, 2), "grad"),
        # ppo policy
        ("policy 1-D", "ppo_policy_loss_fwd", (r(T), r(T), r(T), mask(T), 0.2, 0.2, None, 0), "logprobs"),
        ("policy old shape", "ppo_policy_loss_fwd", (x, r(B, T - 1), x, m, 0.2, 0.2, None, 0), "old_logprobs"),
        ("policy adv dtype", "ppo_policy_loss_fwd", (x, x, x.to(torch.int32), m, 0.2, 0.2, None, 0), "advantages"),
        ("policy mask shape", "ppo_policy_loss_fwd", (x, x, x, mask(B, T - 1), 0.2, 0.2, None, 0), "mask"),
        ("policy agg", "ppo_policy_loss_fwd", (x, x, x, m, 0.2, 0.2, None, 9), "agg"),
        ("policy bwd row_weight", "ppo_policy_loss_bwd", (g1, x, x, x, m, r(B + 1), 0.2, 0.2, None), "row_weight"),
        ("policy bwd grad_loss", "ppo_policy_loss_bwd", (r(2), x, x, x, m, w, 0.2, 0.2, None), "grad_loss"),
        # ppo value
        ("value returns shape", "ppo_value_loss_fwd", (x, x, r(B + 1, T), m, 0.2, 0), "returns"),
        ("value old dtype", "ppo_value_loss_fwd", (x, x.to(torch.int64), x, m, 0.2, 0), "old_values"),
        ("value bwd row_weight", "ppo_value_loss_bwd", (g1, x, x, x, m, r(B, 1), 0.2), "row_weight"),
        # dpo
        ("dpo 2-D", "dpo_loss_fwd", (r(2, 4), r(2, 4), r(2, 4), r(2, 4), 0.1, 0, 0.0), "policy_chosen"),
        ("dpo ref_rejected size", "dpo_loss_fwd", (v, v, v, r(9), 0.1, 0, 0.0), "ref_rejected"),
        ("dpo policy_rejected dtype", "dpo_loss_fwd", (v, v.to(torch.int32), v, v, 0.1, 0, 0.0), "policy_rejected"),
        ("dpo loss_type", "dpo_loss_fwd", (v, v, v, v, 0.1, 5, 0.0), "loss_type"),
        ("dpo bwd grad_losses", "dpo_loss_bwd", (r(7), v, v, v, v, 0.1, 0, 0.0), "grad_losses"),
        # gae
        ("gae values shape", "gae_fwd", (x, r(B, T + 2), m, 0.99, 0.95), "values"),
        ("gae rewards dtype", "gae_fwd", (x.to(torch.int32), x, m, 0.99, 0.95), "rewards"),
        ("gae bwd grad_returns", "gae_bwd", (x, r(B), m, 0.99, 0.95), "grad_returns"),
        # token_logprobs
        ("logprobs 3-D logits", "token_logprobs_fwd", (r(2, 3, 11), labels, 1.0, -100, False), "logits"),
        ("logprobs int logits", "token_logprobs_fwd", (logits.to(torch.int32), labels, 1.0, -100, False), "logits"),
        ("logprobs int32 labels", "token_logprobs_fwd", (logits, labels.to(torch.int32), 1.0, -100, False), "labels"),
        ("logprobs labels size", "token_logprobs_fwd", (logits, labels[:5], 1.0, -100, False), "labels"),
        ("logprobs label range", "token_logprobs_fwd", (logits, labels + 20, 1.0, -100, False), "labels"),
        ("logprobs temperature", "token_logprobs_fwd", (logits, labels, 0.0, -100, False), "temperature"),
        ("logprobs bwd lse size", "token_logprobs_bwd", (glp, None, logits, labels, r(5), ent, 1.0, -100), "lse"),
        ("logprobs bwd grad size", "token_logprobs_bwd", (r(7), None, logits, labels, lse, ent, 1.0, -100),
         "grad_logprobs"),
        ("logprobs bwd grad_entropy", "token_logprobs_bwd", (glp, r(6, 1), logits, labels, lse, ent, 1.0, -100),
         "grad_entropy"),
    ]
    return cases


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_cpu_op_rejects_bad_argument_by_name(case):
    _, name, args, arg = case
    with pytest.raises(RuntimeError, match=rf"rlhf_kernels::{name}\b.*\b{arg}\b"):
        getattr(ops(), name)(*args)


def test_token_logprobs_reads_a_strided_row_view_in_place():
    # logits rows inside a wider buffer (row stride 17 != V = 11): same values as a contiguous copy
    base = r(6, 17)
    view = base[:, 3:14]
    assert view.stride(0) == 17 and not view.is_contiguous()
    labels = torch.tensor([0, 3, -100, 10, 2, 5])
    got = ops().token_logprobs_fwd(view, labels, 0.7, -100, True)
    want = ops().token_logprobs_fwd(view.contiguous(), labels, 0.7, -100, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = torch.log_softmax(view.double() / 0.7, -1)
    valid = labels != -100
    torch.testing.assert_close(got[0][valid].double(), ref[valid].gather(1, labels[valid, None])[:, 0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_small_ops_read_other_dtypes_in_their_own_dtype(dtype):
    # the kernels convert chunks in registers / a stack buffer; results equal the fp32 op on the
    # rounded inputs, gradients come back in the input dtype
    a, b, adv = r(B, T, dtype=dtype, seed=1), r(B, T, dtype=dtype, seed=2), r(B, T, dtype=dtype, seed=3)
    m = mask(B, T)
    for est in range(4):
        torch.testing.assert_close(ops().kl_penalty_fwd(a, b, est), ops().kl_penalty_fwd(a.float(), b.float(), est))
        ga, gb = ops().kl_penalty_bwd(a, a, b, est)
        assert ga.dtype == dtype and gb.dtype == dtype
        fa, fb = ops().kl_penalty_bwd(a.float(), a.float(), b.float(), est)
        torch.testing.assert_close(ga, fa.to(dtype))
        torch.testing.assert_close(gb, fb.to(dtype))
    got = ops().ppo_policy_loss_fwd(a, b, adv, m, 0.2, 0.3, 3.0, 1)
    want = ops().ppo_policy_loss_fwd(a.float(), b.float(), adv.float(), m, 0.2, 0.3, 3.0, 1)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    grads = ops().ppo_value_loss_bwd(torch.tensor(1.0), a, b, adv, m, torch.full((B,), 0.3), 0.1)
    wants = ops().ppo_value_loss_bwd(torch.tensor(1.0), a.float(), b.float(), adv.float(), m,
                                     torch.full((B,), 0.3), 0.1)
    for x, y in zip(grads, wants):
        assert x.dtype == dtype
        torch.testing.assert_close(x, y.to(dtype))


def test_numeric_mask_equals_bool_mask():
    x, y, z = r(B, T, seed=4), r(B, T, seed=5), r(B, T, seed=6)
    m = mask(B, T)
    for mm in (m.float(), m.to(torch.int64)):
        for u, v in zip(ops().ppo_value_loss_fwd(x, y, z, mm, 0.2, 2), ops().ppo_value_loss_fwd(x, y, z, m, 0.2, 2)):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_token_logprobs_same_at_one_and_two_threads():
    logits = r(64, 3000, seed=7)
    labels = torch.randint(0, 3000, (64,), generator=torch.Generator().manual_seed(0))
    glp = r(64, seed=8)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            lp, lse, ent = ops().token_logprobs_fwd(logits, labels, 1.0, -100, True)
            g = ops().token_logprobs_bwd(glp, None, logits, labels, lse, ent, 1.0, -100)
            outs.append((lp, lse, ent, g))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
