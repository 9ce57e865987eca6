"""The OpenRLHF adapter against OpenRLHF's own code (skipped with the reason when it is not installed).

``openrlhf.models/__init__.py`` imports the actor, whose ring-attention helpers import flash-attn,
which cannot be installed on a machine without CUDA.  So the test imports OpenRLHF's own files
``models/utils.py`` and ``models/loss.py`` as submodules without running the package ``__init__``;
``models/actor.py`` is imported the same way with placeholder ``flash_attn`` modules when flash-attn
is missing (only its names are imported; nothing here calls them).  OpenRLHF's GAE is a method of
``RemoteExperienceMaker``; where that module does not import (it needs Ray actors and vLLM), the test
runs the method's own source, taken from the installed file.
"""

import ast
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

import rlhf_kernels as rk

_spec = importlib.util.find_spec("openrlhf")
if _spec is None:
    pytest.skip("OpenRLHF is not installed; pip install '.[openrlhf]'", allow_module_level=True)
_ROOT = Path(_spec.submodule_search_locations[0])


def _load(name, path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _package(name, path):
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    return sys.modules[name]


try:
    try:
        importlib.import_module("openrlhf.models")
    except ImportError:
        _package("openrlhf.models", _ROOT / "models")
    peer_utils = _load("openrlhf.models.utils", _ROOT / "models" / "utils.py")
    peer_loss = _load("openrlhf.models.loss", _ROOT / "models" / "loss.py")
except Exception as exc:  # noqa: BLE001 - any import failure of the peer means skip
    pytest.skip(
        f"OpenRLHF's models/utils.py or loss.py does not import here ({type(exc).__name__}: {exc})",
        allow_module_level=True,
    )

from rlhf_kernels.integrations import openrlhf as rk_openrlhf


def _load_actor():
    try:
        return importlib.import_module("openrlhf.models.actor")
    except ModuleNotFoundError as exc:
        if "flash_attn" not in str(exc):
            pytest.skip(f"openrlhf.models.actor does not import here ({exc})")

    def unavailable(*args, **kwargs):
        raise RuntimeError("flash-attn is not installed")

    for name, names in {
        "flash_attn": [],
        "flash_attn.bert_padding": ["index_first_axis", "pad_input", "rearrange", "unpad_input"],
        "flash_attn.utils": [],
        "flash_attn.utils.distributed": ["all_gather"],
    }.items():
        module = sys.modules.setdefault(name, types.ModuleType(name))
        for attr in names:
            setattr(module, attr, unavailable)
    try:
        return _load("openrlhf.models.actor", _ROOT / "models" / "actor.py")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"openrlhf.models.actor does not import here ({type(exc).__name__}: {exc})")


def _peer_gae():
    """OpenRLHF's own get_advantages_and_returns (the method, or its source where the module won't import)."""
    try:
        maker = importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker")
        return lambda *a: maker.RemoteExperienceMaker.get_advantages_and_returns(None, *a)
    except Exception:  # noqa: BLE001 - it needs Ray actors and vLLM: run the method's own source instead
        maker = None
    source = (_ROOT / "trainer" / "ppo_utils" / "experience_maker.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "get_advantages_and_returns":
            node.decorator_list = []
            namespace = {"torch": torch, "Tuple": tuple}
            exec(compile(ast.Module([node], []), "experience_maker.py", "exec"), namespace)  # noqa: S102
            return lambda *a: namespace["get_advantages_and_returns"](None, *a)
    pytest.fail("OpenRLHF's get_advantages_and_returns was not found")


@pytest.fixture(autouse=True)
def _always_undo():
    yield
    rk_openrlhf.undo()


def _batch(seed, b=6, t=9):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(b, t, generator=g) * 0.5 - 1.0
    new = old + torch.randn(b, t, generator=g) * 0.4
    adv = torch.randn(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # right padding
    mask[0, 1:3] = False  # interior mask
    mask[1] = False  # a row with no valid token
    return old, new, adv, mask


POLICY_ARGS = [
    {},
    {"clip_eps_low": 0.2, "clip_eps_high": 0.28},
    {"dual_clip": 1.5},
    {"clip_eps_high": 0.3, "dual_clip": 2.0, "token_level_loss": False},
]
GLOBAL = [{}, {"dp_size": 2, "batch_num_tokens": 40.0, "global_batch_size": 9.0}]


@pytest.mark.parametrize("kwargs", POLICY_ARGS)
@pytest.mark.parametrize("extra", GLOBAL)
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_policy_loss_equals_openrlhf(kwargs, extra, direction):
    old, new, adv, mask = _batch(len(kwargs) + len(extra))
    adv = adv * direction
    peer = peer_loss.PolicyLoss(**kwargs)
    new_p = new.clone().requires_grad_()
    loss_p, clip_p, kl_p, _, _ = peer(new_p, old, adv, mask, **extra)
    with rk_openrlhf.applied(gae=False):
        new_o = new.clone().requires_grad_()
        loss, clip, kl, vllm_kl, filt = peer_loss.PolicyLoss(**kwargs)(new_o, old, adv, mask, **extra)
    assert vllm_kl is None and filt is None
    torch.testing.assert_close(loss, loss_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clip, clip_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, kl_p, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_p.backward()
    torch.testing.assert_close(new_o.grad, new_p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("extra", GLOBAL)
def test_value_loss_equals_openrlhf(clip_eps, token_level_loss, extra):
    old, new, ret, mask = _batch(11)
    peer = peer_loss.ValueLoss(clip_eps=clip_eps, token_level_loss=token_level_loss)
    v_p = new.clone().requires_grad_()
    loss_p = peer(v_p, old, ret, mask, **extra)
    with rk_openrlhf.applied(gae=False):
        v_o = new.clone().requires_grad_()
        loss = peer(v_o, old, ret, mask, **extra)  # the same instance: the class forward is patched
    torch.testing.assert_close(loss, loss_p, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_p.backward()
    torch.testing.assert_close(v_o.grad, v_p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs", [{"beta": 0.1}, {"beta": 0.5, "label_smoothing": 0.1}, {"beta": 0.2, "ipo": True}]
)
def test_dpo_loss_equals_openrlhf(kwargs):
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(7, generator=g) * 5 - 20 for _ in range(4)]
    peer = peer_loss.DPOLoss(**kwargs)
    leaves_p = [x.clone().requires_grad_() for x in inputs]
    out_p = peer(*leaves_p)
    with rk_openrlhf.applied(gae=False):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = peer(*leaves)
    for a, b in zip(out, out_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    out[0].backward()
    out_p[0].backward()
    for a, b in zip(leaves, leaves_p):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_equals_openrlhf_masked_steps_as_zero_reward_steps(gamma, lam):
    g = torch.Generator().manual_seed(5)
    rewards, values = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    _, _, _, mask = _batch(8, 5, 10)
    mask[2, 3:6] = False  # interior mask: OpenRLHF discounts through these as zero-reward steps
    adv, ret = rk_openrlhf.get_advantages_and_returns(values, rewards, mask, gamma, lam)
    adv_p, ret_p = _peer_gae()(values, rewards, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ret_p, rtol=1e-5, atol=1e-5)
    # ...which is not what our own gae does with an interior mask (it skips masked steps).
    ours, _ = rk.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert not torch.allclose(ours[2, :3], adv_p[2, :3])


def test_helpers_equal_openrlhf():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 33, generator=g) * 3
    labels = torch.randint(0, 33, (3, 5), generator=g)
    torch.testing.assert_close(
        rk_openrlhf.log_probs_from_logits(logits, labels, temperature=0.7),
        peer_utils.log_probs_from_logits(logits.clone(), labels, temperature=0.7),
        rtol=1e-5,
        atol=1e-5,
    )
    leaf = logits.clone().requires_grad_()
    leaf_p = logits.clone().requires_grad_()
    ent, ent_p = rk_openrlhf.compute_entropy(leaf), peer_utils.compute_entropy(leaf_p)
    torch.testing.assert_close(ent, ent_p, rtol=1e-5, atol=1e-5)
    ent.sum().backward()
    ent_p.sum().backward()
    torch.testing.assert_close(leaf.grad, leaf_p.grad, rtol=1e-5, atol=1e-5)


def test_apply_patches_the_names_the_actor_calls_and_undo_restores(monkeypatch):
    actor = _load_actor()
    original_lp, original_ent = peer_utils.log_probs_from_logits, peer_utils.compute_entropy
    assert actor.log_probs_from_logits is original_lp
    forwards = {cls: cls.forward for cls in (peer_loss.PolicyLoss, peer_loss.ValueLoss, peer_loss.DPOLoss)}
    calls = {"token_logprobs": 0, "ppo_policy_loss": 0, "ppo_value_loss": 0, "dpo_loss": 0}
    for name in calls:
        real = getattr(rk, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(rk, name, counted)
    with rk_openrlhf.applied(gae=False):
        assert actor.log_probs_from_logits is rk_openrlhf.log_probs_from_logits
        assert actor.compute_entropy is rk_openrlhf.compute_entropy
        assert peer_utils.log_probs_from_logits is rk_openrlhf.log_probs_from_logits
        logits = torch.randn(2, 4, 7)
        actor.log_probs_from_logits(logits, torch.randint(0, 7, (2, 4)))
        actor.compute_entropy(logits)
        old, new, adv, mask = _batch(1)
        peer_loss.PolicyLoss()(new, old, adv, mask)
        peer_loss.ValueLoss(0.2)(new, old, adv, mask)
        peer_loss.DPOLoss(0.1)(*torch.randn(4, 3))
    assert calls == {"token_logprobs": 2, "ppo_policy_loss": 1, "ppo_value_loss": 1, "dpo_loss": 1}
    assert not rk_openrlhf.is_applied()
    assert actor.log_probs_from_logits is original_lp and actor.compute_entropy is original_ent
    assert peer_utils.log_probs_from_logits is original_lp
    for cls, forward in forwards.items():
        assert cls.forward is forward


def test_uncovered_policy_modes_keep_openrlhf_forward(monkeypatch):
    called = []
    monkeypatch.setattr(rk, "ppo_policy_loss", lambda *a, **k: called.append(1))
    old, new, adv, mask = _batch(2)
    peer = peer_loss.PolicyLoss(policy_loss_type="gspo")
    expected = peer(new, old, adv, mask, rollout_log_probs=old)
    with rk_openrlhf.applied(gae=False):
        got = peer(new, old, adv, mask, rollout_log_probs=old)
    assert not called
    torch.testing.assert_close(got[0], expected[0])


def test_apply_without_an_importable_module_says_what_to_install_and_changes_nothing(monkeypatch):
    forward = peer_loss.PolicyLoss.forward
    monkeypatch.setitem(sys.modules, "openrlhf.trainer.ppo_utils.experience_maker", None)
    with pytest.raises(ImportError, match=r"rlhf-kernels\[openrlhf\]"):
        rk_openrlhf.apply()  # gae=True needs experience_maker: the patches made before it are undone
    assert not rk_openrlhf.is_applied()
    assert peer_loss.PolicyLoss.forward is forward
    assert peer_utils.log_probs_from_logits.__module__ == "openrlhf.models.utils"
