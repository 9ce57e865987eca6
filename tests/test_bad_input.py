"""The bad-input matrix: every public function rejects bad arguments with a TypeError or ValueError
that names the argument."""

import pytest
import torch

import rlhf_kernels as rk


def lp_args(**over):
    base = dict(logits=torch.randn(2, 3, 11), labels=torch.randint(0, 11, (2, 3)))
    base.update(over)
    return base


def bt(**over):
    base = dict(a=torch.randn(2, 4), b=torch.randn(2, 4), c=torch.randn(2, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    base.update(over)
    return base


def call_token_logprobs(**kw):
    args = lp_args(**{k: v for k, v in kw.items() if k in ("logits", "labels")})
    rest = {k: v for k, v in kw.items() if k not in ("logits", "labels")}
    return rk.token_logprobs(args["logits"], args["labels"], **rest)


def call_policy(**kw):
    a = bt(**{k: v for k, v in kw.items() if k in ("a", "b", "c", "mask")})
    rest = {k: v for k, v in kw.items() if k not in ("a", "b", "c", "mask")}
    return rk.ppo_policy_loss(a["a"], a["b"], a["c"], a["mask"], **rest)


def call_value(**kw):
    a = bt(**{k: v for k, v in kw.items() if k in ("a", "b", "c", "mask")})
    rest = {k: v for k, v in kw.items() if k not in ("a", "b", "c", "mask")}
    return rk.ppo_value_loss(a["a"], a["b"], a["c"], a["mask"], **rest)


def call_gae(r=None, v=None, m=None, **kw):
    r = torch.randn(2, 5) if r is None else r
    v = torch.randn(2, 5) if v is None else v
    m = torch.ones(2, 5) if m is None else m
    return rk.gae(r, v, m, **kw)


def call_dpo(pc=None, pr=None, rc=None, rr=None, **kw):
    x = [t if t is not None else torch.randn(4) for t in (pc, pr, rc, rr)]
    return rk.dpo_loss(*x, **kw)


def call_kl(lp=None, ref=None, **kw):
    lp = torch.randn(3, 4) if lp is None else lp
    ref = torch.randn(3, 4) if ref is None else ref
    return rk.kl_penalty(lp, ref, **kw)


CASES = [
    # token_logprobs
    ("logits int", lambda: call_token_logprobs(logits=torch.ones(2, 3, 11, dtype=torch.long)), TypeError, "logits"),
    ("logits not tensor", lambda: call_token_logprobs(logits=[[0.0]]), TypeError, "logits"),
    ("labels float", lambda: call_token_logprobs(labels=torch.zeros(2, 3)), TypeError, "labels"),
    ("labels shape", lambda: call_token_logprobs(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels"),
    ("labels >= V", lambda: call_token_logprobs(labels=torch.full((2, 3), 11)), ValueError, "labels"),
    ("labels < 0", lambda: call_token_logprobs(labels=torch.full((2, 3), -1)), ValueError, "labels"),
    ("temperature 0", lambda: call_token_logprobs(temperature=0.0), ValueError, "temperature"),
    ("temperature < 0", lambda: call_token_logprobs(temperature=-1.0), ValueError, "temperature"),
    ("temperature nan", lambda: call_token_logprobs(temperature=float("nan")), ValueError, "temperature"),
    ("temperature str", lambda: call_token_logprobs(temperature="1"), TypeError, "temperature"),
    ("ignore_index float", lambda: call_token_logprobs(ignore_index=1.5), TypeError, "ignore_index"),
    ("bad backend", lambda: call_token_logprobs(backend="fast"), ValueError, "backend"),
    ("0-d logits", lambda: rk.token_logprobs(torch.tensor(1.0), torch.tensor(0)), ValueError, "logits"),
    # kl_penalty
    ("kl estimator", lambda: call_kl(estimator="k4"), ValueError, "estimator"),
    ("kl shapes", lambda: call_kl(ref=torch.randn(3, 5)), ValueError, "ref_logprobs"),
    ("kl dtype", lambda: call_kl(lp=torch.zeros(3, 4, dtype=torch.long)), TypeError, "logprobs"),
    ("kl backend", lambda: call_kl(backend=None), ValueError, "backend"),
    # gae
    ("gae 1-D", lambda: call_gae(r=torch.randn(5), v=torch.randn(5), m=torch.ones(5)), ValueError, "2-D"),
    ("gae 3-D", lambda: call_gae(r=torch.randn(1, 2, 5), v=torch.randn(1, 2, 5), m=torch.ones(1, 2, 5)), ValueError, "rewards"),
    ("gae values shape", lambda: call_gae(v=torch.randn(2, 4)), ValueError, "values"),
    ("gae mask shape", lambda: call_gae(m=torch.ones(2, 4)), ValueError, "mask"),
    ("gae gamma > 1", lambda: call_gae(gamma=1.5), ValueError, "gamma"),
    ("gae gamma < 0", lambda: call_gae(gamma=-0.1), ValueError, "gamma"),
    ("gae lam > 1", lambda: call_gae(lam=1.01), ValueError, "lam"),
    ("gae lam < 0", lambda: call_gae(lam=-1.0), ValueError, "lam"),
    ("gae int rewards", lambda: call_gae(r=torch.ones(2, 5, dtype=torch.long)), TypeError, "rewards"),
    # ppo_policy_loss
    ("policy clip_low < 0", lambda: call_policy(clip_low=-0.1), ValueError, "clip_low"),
    ("policy clip_high < 0", lambda: call_policy(clip_high=-0.1), ValueError, "clip_high"),
    ("policy dual_clip = 1", lambda: call_policy(dual_clip=1.0), ValueError, "dual_clip"),
    ("policy dual_clip < 1", lambda: call_policy(dual_clip=0.5), ValueError, "dual_clip"),
    ("policy agg", lambda: call_policy(agg="mean"), ValueError, "agg"),
    ("policy seq agg on 1-D", lambda: rk.ppo_policy_loss(torch.randn(4), torch.randn(4), torch.randn(4),
                                                         torch.ones(4), agg="seq-mean-token-sum"), ValueError, "agg"),
    ("policy shape", lambda: call_policy(b=torch.randn(2, 5)), ValueError, "old_logprobs"),
    ("policy adv shape", lambda: call_policy(c=torch.randn(4, 2)), ValueError, "advantages"),
    ("policy mask shape", lambda: call_policy(mask=torch.ones(2, 3)), ValueError, "mask"),
    ("policy int logprobs", lambda: call_policy(a=torch.zeros(2, 4, dtype=torch.long)), TypeError, "logprobs"),
    # ppo_value_loss
    ("value clip < 0", lambda: call_value(clip=-0.2), ValueError, "clip"),
    ("value agg", lambda: call_value(agg="sum"), ValueError, "agg"),
    ("value shape", lambda: call_value(c=torch.randn(3, 4)), ValueError, "returns"),
    ("value int", lambda: call_value(b=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "old_values"),
    # dpo_loss
    ("dpo beta 0", lambda: call_dpo(beta=0.0), ValueError, "beta"),
    ("dpo beta < 0", lambda: call_dpo(beta=-1.0), ValueError, "beta"),
    ("dpo loss_type", lambda: call_dpo(loss_type="kto"), ValueError, "loss_type"),
    ("dpo ls 0.5", lambda: call_dpo(label_smoothing=0.5), ValueError, "label_smoothing"),
    ("dpo ls < 0", lambda: call_dpo(label_smoothing=-0.1), ValueError, "label_smoothing"),
    ("dpo shape", lambda: call_dpo(pr=torch.randn(5)), ValueError, "policy_rejected"),
    ("dpo 2-D", lambda: call_dpo(pc=torch.randn(4, 1), pr=torch.randn(4, 1), rc=torch.randn(4, 1),
                                 rr=torch.randn(4, 1)), ValueError, "policy_chosen"),
    ("dpo int", lambda: call_dpo(rr=torch.zeros(4, dtype=torch.long)), TypeError, "ref_rejected"),
    # masked helpers
    ("masked_mean shape", lambda: rk.masked_mean(torch.randn(2, 3), torch.ones(3, 2)), ValueError, "mask"),
    ("masked_whiten int", lambda: rk.masked_whiten(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)), TypeError, "x"),
    ("masked_mean backend", lambda: rk.masked_mean(torch.randn(2), torch.ones(2), backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("name,fn,exc,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, fn, exc, needle):
    with pytest.raises(exc) as info:
        fn()
    assert needle in str(info.value), f"error for {name!r} does not name {needle!r}: {info.value}"


def test_devices_must_match():
    meta = torch.empty(2, 3, 11, device="meta")
    with pytest.raises(ValueError, match="labels"):
        rk.token_logprobs(meta, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_logprobs"):
        rk.kl_penalty(torch.randn(2), torch.empty(2, device="meta"))
    with pytest.raises(ValueError, match="mask"):
        rk.gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3, device="meta"))


def test_ignore_index_label_is_not_out_of_range():
    labels = torch.tensor([[-100, 3, 10]])
    out = rk.token_logprobs(torch.randn(1, 3, 11), labels)
    assert out[0, 0].item() == 0.0
