"""The verl adapter against verl's own functions (skipped with the reason when verl cannot import)."""

import importlib
import sys

import pytest
import torch

import rlhf_kernels as rk

try:
    core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
    verl_F = importlib.import_module("verl.utils.torch_functional")
    from omegaconf import OmegaConf
except Exception as exc:  # noqa: BLE001 - any import failure of the peer means skip
    pytest.skip(
        f"verl is not importable here ({type(exc).__name__}: {exc}); pip install '.[verl]'",
        allow_module_level=True,
    )

from rlhf_kernels.integrations import verl as rk_verl


@pytest.fixture(autouse=True)
def _always_undo():
    yield
    rk_verl.undo()


def _batch(seed, b=6, t=9):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(b, t, generator=g) * 0.5 - 1.0
    new = old + torch.randn(b, t, generator=g) * 0.4
    adv = torch.randn(b, t, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask &= torch.arange(t)[None, :] < lengths[:, None]  # right padding
    mask[0, 1:3] = False  # interior mask (tool output inside a response)
    mask[1] = False  # a row with no valid token
    return old, new, adv, mask


def _config(**over):
    cfg = {
        "clip_ratio": 0.2,
        "clip_ratio_low": None,
        "clip_ratio_high": None,
        "clip_ratio_c": 3.0,
        "global_batch_info": {},
    }
    cfg.update(over)
    return OmegaConf.create(cfg)


AGGS = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
CONFIGS = [
    {},
    {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28},  # asymmetric (DAPO clip-higher)
    {"clip_ratio_c": 1.5},  # a dual clip that binds often
]
BATCH_INFOS = [{}, {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 9, "loss_scale_factor": 4}]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("over", CONFIGS)
@pytest.mark.parametrize("info", BATCH_INFOS)
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_policy_loss_equals_verl_vanilla(agg, over, info, direction):
    old, new, adv, mask = _batch(len(agg) + len(over) + len(info))
    adv = adv * direction  # both loss directions: mostly-positive and mostly-negative advantages
    cfg = _config(**over, global_batch_info=info)
    new_ours = new.clone().requires_grad_()
    new_peer = new.clone().requires_grad_()
    loss, metrics = rk_verl.compute_policy_loss(old, new_ours, adv, mask.float(), agg, cfg)
    loss_p, metrics_p = core_algos.compute_policy_loss_vanilla(old, new_peer, adv, mask.float(), agg, cfg)
    torch.testing.assert_close(loss, loss_p, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_p.backward()
    torch.testing.assert_close(new_ours.grad, new_peer.grad, rtol=1e-5, atol=1e-7)
    assert metrics.keys() == metrics_p.keys()
    for key in metrics:
        assert isinstance(metrics[key], float)
        assert metrics[key] == pytest.approx(metrics_p[key], rel=1e-5, abs=1e-6), key


def test_policy_loss_rollout_weights_equal_verl():
    old, new, adv, mask = _batch(3)
    weights = torch.rand(old.shape, generator=torch.Generator().manual_seed(4)) * 2
    weights[2, :2] = 0.0  # rejected tokens
    cfg = _config(clip_ratio_high=0.3)
    loss, metrics = rk_verl.compute_policy_loss(old, new, adv, mask, "token-mean", cfg, weights)
    loss_p, metrics_p = core_algos.compute_policy_loss_vanilla(
        old, new, adv, mask, "token-mean", cfg, weights
    )
    torch.testing.assert_close(loss, loss_p, rtol=1e-5, atol=1e-6)
    assert metrics == pytest.approx(metrics_p, rel=1e-5, abs=1e-6)


def test_seq_mean_token_sum_divides_by_rows_with_a_valid_token():
    # verl's convention, which differs from ours (all B rows): the adapter must give verl's number.
    old, new, adv, mask = _batch(5)
    loss, _ = rk_verl.compute_policy_loss(old, new, adv, mask, "seq-mean-token-sum", _config())
    ours, _ = rk.ppo_policy_loss(new, old, adv, mask, clip_low=0.2, dual_clip=3.0, agg="seq-mean-token-sum")
    rows = mask.shape[0]
    valid_rows = int((mask.sum(-1) > 0).sum())
    assert valid_rows < rows
    torch.testing.assert_close(loss, ours * rows / valid_rows)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_equals_verl(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    b, t = 5, 11
    rewards = torch.randn(b, t, generator=g)
    values = torch.randn(b, t, generator=g)
    _, _, _, mask = _batch(7, b, t)
    mask[1, :4] = True
    mask[3, 2:5] = False  # interior mask
    adv, ret = rk_verl.compute_gae_advantage_return(rewards, values, mask.float(), gamma, lam)
    adv_p, ret_p = core_algos.compute_gae_advantage_return(rewards, values, mask.float(), gamma, lam)
    torch.testing.assert_close(adv, adv_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ret_p, rtol=1e-5, atol=1e-5)


def test_helpers_equal_verl_and_keep_gradients():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 33, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 33, (3, 5), generator=g)
    peer_logits = logits.detach().clone().requires_grad_()
    lp, ent = rk_verl.logprobs_from_logits(logits, labels), rk_verl.entropy_from_logits(logits)
    lp_p, ent_p = (
        verl_F.logprobs_from_logits_naive(peer_logits, labels),
        verl_F.entropy_from_logits(peer_logits),
    )
    torch.testing.assert_close(lp, lp_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        rk_verl.entropy_from_logits_with_chunking(logits, 2), ent_p, rtol=1e-5, atol=1e-5
    )
    (lp.sum() + ent.sum()).backward()
    (lp_p.sum() + ent_p.sum()).backward()
    torch.testing.assert_close(logits.grad, peer_logits.grad, rtol=1e-5, atol=1e-5)


def test_apply_registers_patches_and_undo_restores(monkeypatch):
    actor_mods = [
        m
        for n, m in list(sys.modules.items())
        if n.startswith("verl.")
        and m is not None
        and vars(m).get("logprobs_from_logits") is verl_F.logprobs_from_logits
    ]
    original_lp = verl_F.logprobs_from_logits
    original_ent = verl_F.entropy_from_logits
    original_vanilla = core_algos.get_policy_loss_fn("vanilla")
    original_gae = core_algos.compute_gae_advantage_return
    calls = {"token_logprobs": 0, "ppo_policy_loss": 0, "gae": 0}
    for name in calls:
        real = getattr(rk, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(rk, name, counted)

    with rk_verl.applied():
        assert core_algos.get_policy_loss_fn("rlhf_kernels") is rk_verl.compute_policy_loss
        assert core_algos.get_policy_loss_fn("vanilla") is rk_verl.compute_policy_loss
        assert core_algos.get_adv_estimator_fn("rlhf_kernels_gae") is rk_verl.compute_gae_advantage_return
        assert core_algos.get_adv_estimator_fn("gae") is rk_verl.compute_gae_advantage_return
        assert core_algos.compute_gae_advantage_return is rk_verl.compute_gae_advantage_return
        assert verl_F.logprobs_from_logits is rk_verl.logprobs_from_logits
        for module in actor_mods:  # the modules that imported the helper by name
            assert module.logprobs_from_logits is rk_verl.logprobs_from_logits, module.__name__
        assert verl_F.entropy_from_logits is rk_verl.entropy_from_logits
        old, new, adv, mask = _batch(1)
        core_algos.get_policy_loss_fn("vanilla")(old, new, adv, mask, "token-mean", _config())
        core_algos.compute_gae_advantage_return(adv, new, mask, 1.0, 0.95)
        logits = torch.randn(2, 4, 7)
        verl_F.logprobs_from_logits(logits, torch.randint(0, 7, (2, 4)))
        verl_F.entropy_from_logits(logits)
    assert calls == {"token_logprobs": 2, "ppo_policy_loss": 1, "gae": 1}
    assert not rk_verl.is_applied()
    assert verl_F.logprobs_from_logits is original_lp
    assert verl_F.entropy_from_logits is original_ent
    for module in actor_mods:
        assert module.logprobs_from_logits is original_lp, module.__name__
    assert core_algos.get_policy_loss_fn("vanilla") is original_vanilla
    assert core_algos.compute_gae_advantage_return is original_gae
    assert core_algos.ADV_ESTIMATOR_REGISTRY["gae"] is original_gae
    assert "rlhf_kernels" not in core_algos.POLICY_LOSS_REGISTRY
    assert "rlhf_kernels_gae" not in core_algos.ADV_ESTIMATOR_REGISTRY


def test_actor_module_imported_after_apply_gets_original_back_on_undo():
    name = "verl.workers.engine.fsdp.transformer_impl"
    rk_verl.apply()
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        rk_verl.undo()
        pytest.skip(f"{name} does not import on this machine ({type(exc).__name__}: {exc})")
    assert module.logprobs_from_logits is rk_verl.logprobs_from_logits
    rk_verl.undo()
    assert module.logprobs_from_logits is verl_F.logprobs_from_logits
    assert verl_F.logprobs_from_logits.__module__ == "verl.utils.torch_functional"


@pytest.mark.parametrize("mode", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"])
def test_kl_penalty_equals_verl_including_its_clamps(mode):
    g = torch.Generator().manual_seed(9)
    logprob = torch.randn(4, 8, generator=g) * 3
    ref = torch.randn(4, 8, generator=g) * 3
    logprob[0, 0], ref[0, 0] = -30.0, -2.0  # log-ratio beyond -20: verl clamps it
    logprob[0, 1], ref[0, 1] = -14.0, -1.0  # k3 above 10: verl clamps the result
    lp, lp_p = logprob.clone().requires_grad_(), logprob.clone().requires_grad_()
    out = rk_verl.kl_penalty_forward(lp, ref, mode)
    out_p = core_algos.kl_penalty_forward(lp_p, ref, mode)
    torch.testing.assert_close(out, out_p, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    out_p.sum().backward()
    torch.testing.assert_close(lp.grad, lp_p.grad, rtol=1e-5, atol=1e-5)
    if mode in ("low_var_kl", "k3"):  # our own k3 keeps its unclamped definition
        assert rk.kl_penalty(logprob, ref, estimator="k3")[0, 1] > 10.0


def test_kl_penalty_through_verl_after_apply_straight_through_too(monkeypatch):
    g = torch.Generator().manual_seed(10)
    logprob, ref = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    expected = {m: core_algos.kl_penalty(logprob, ref, m) for m in ("low_var_kl", "k3+", "abs")}
    calls = []
    real = rk.kl_penalty
    monkeypatch.setattr(rk, "kl_penalty", lambda *a, **k: calls.append(1) or real(*a, **k))
    with rk_verl.applied():
        for mode, value in expected.items():
            torch.testing.assert_close(core_algos.kl_penalty(logprob, ref, mode), value, rtol=1e-5, atol=1e-6)
        with pytest.raises(NotImplementedError):  # "full" stays verl's
            core_algos.kl_penalty(logprob, ref, "full")
    assert len(calls) == 3
    assert core_algos.kl_penalty_forward.__module__ == "verl.trainer.ppo.core_algos"


def test_apply_without_the_peer_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", None)
    with pytest.raises(ImportError, match=r"rlhf-kernels\[verl\]"):
        rk_verl.apply()
    assert not rk_verl.is_applied()
