"""PPO: a few steps on a tiny local Llama-style model, determinism, the KL controller, EOS masking."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rlhf.ppo import AdaptiveKLController, PPOHyperParams, PPOTrainer, generate_responses

transformers = pytest.importorskip("transformers")

VOCAB, PAD, BOS, EOS = 24, 0, 1, 2


def _save_tiny_models(root):
    """A tiny random Llama policy and a one-label reward model, saved and loaded back from disk."""
    kw = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).save_pretrained(root / "policy")
    rm_config = transformers.LlamaConfig(**kw, num_labels=1)
    transformers.LlamaForSequenceClassification(rm_config).save_pretrained(root / "reward")
    return root / "policy", root / "reward"


@pytest.fixture(scope="module")
def ppo_models(tmp_path_factory):
    return _save_tiny_models(tmp_path_factory.mktemp("tiny"))


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        [BOS] + torch.randint(3, VOCAB, (int(torch.randint(2, 6, (), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def _trainer(paths, seed=0, gold_fn=None, **overrides):
    policy_path, reward_path = paths
    torch.manual_seed(seed)
    load_lm = transformers.AutoModelForCausalLM.from_pretrained
    load_rm = transformers.AutoModelForSequenceClassification.from_pretrained
    hp = PPOHyperParams(
        rollout_batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        lr=1e-3,
        value_lr=1e-3,
        kernel_backend="reference",
        **overrides,
    )
    value = load_rm(reward_path) if hp.value_model == "reward" else None
    return PPOTrainer(
        load_lm(policy_path),
        load_lm(policy_path),
        load_rm(reward_path),
        value,
        hp,
        eos_id=EOS,
        pad_id=PAD,
        total_steps=3,
        gold_fn=gold_fn,
    )


def _run(paths, steps=3, **kw):
    trainer = _trainer(paths, **kw)
    return trainer, [trainer.step(_prompts(8, seed=s)) for s in range(steps)]


EXPECTED = [
    "objective/kl",
    "objective/entropy",
    "objective/scores",
    "policy/approxkl",
    "policy/clipfrac",
    "loss/policy",
    "loss/value",
    "val/clipfrac",
    "response_length/mean",
    "timing/generation",
    "timing/scoring",
    "timing/training",
]


def test_ppo_steps_finite_and_learn(ppo_models):
    before = transformers.AutoModelForCausalLM.from_pretrained(ppo_models[0]).state_dict()
    trainer, history = _run(ppo_models, gold_fn=lambda p, r: [float(len(x)) for x in r])
    for metrics in history:
        for name in EXPECTED + ["objective/gold"]:
            assert name in metrics, name
            assert math.isfinite(metrics[name]), (name, metrics[name])
        assert 1 <= metrics["response_length/mean"] <= 6
    # the policy moved away from its initial weights and from the frozen reference
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert history[-1]["objective/kl"] != 0.0
    ref = trainer.ref_policy.state_dict()
    assert all(torch.equal(before[k], ref[k]) for k in before)


@pytest.mark.parametrize(
    "overrides",
    [
        {
            "value_model": "policy_head",
            "kl_in_reward": False,
            "adaptive_kl": True,
            "target_kl": 0.1,
            "kl_horizon": 100,
        },
        {
            "clip_high": 0.28,
            "dual_clip": 3.0,
            "loss_agg": "seq-mean-token-mean",
            "whiten_rewards": True,
            "missing_eos_penalty": 1.0,
            "kl_estimator": "k3",
            "temperature": 0.7,
            "top_p": 0.9,
            "value_clip": None,
        },
    ],
)
def test_ppo_options_run(ppo_models, overrides):
    _, history = _run(ppo_models, steps=2, **overrides)
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    if "loss/kl" in history[0] or not overrides.get("kl_in_reward", True):
        assert "loss/kl" in history[-1]


def test_ppo_same_seed_same_metrics(ppo_models):
    drop_timing = lambda ms: [{k: v for k, v in m.items() if not k.startswith("timing/")} for m in ms]
    _, first = _run(ppo_models, steps=2, seed=3)
    _, second = _run(ppo_models, steps=2, seed=3)
    assert drop_timing(first) == drop_timing(second)
    _, other = _run(ppo_models, steps=2, seed=4)
    assert drop_timing(first) != drop_timing(other)


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=1000)
    ctl.update(current_kl=3.0, n_steps=100)  # error = 3/2 - 1 = 0.5, clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=1000)
    ctl.update(current_kl=1.8, n_steps=50)  # error = -0.1
    assert ctl.value == pytest.approx(0.1 * (1 - 0.1 * 50 / 1000))


class _ScriptedLM(torch.nn.Module):
    """Stands in for a causal LM (KV cache and all) that puts all probability on fixed tokens:
    step t of sampling emits ``new_tokens[:, t]``, whatever the sampler feeds back."""

    def __init__(self, new_tokens):
        super().__init__()
        self.new_tokens = torch.tensor(new_tokens)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, use_cache, past_key_values=None):
        step = 0 if past_key_values is None else past_key_values + 1
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], VOCAB), -1e4)
        logits[:, -1] = torch.nn.functional.one_hot(self.new_tokens[:, step], VOCAB).float() * 2e4 - 1e4
        return _Output(logits=logits, past_key_values=step)


class _Output(dict):
    """Like transformers' ModelOutput: items readable as keys and as attributes."""

    __getattr__ = dict.__getitem__


def test_response_ends_at_first_eos():
    prompt = torch.tensor([[PAD, BOS, 5], [BOS, 6, 7]])
    lm = _ScriptedLM([[9, EOS, 4, EOS], [9, 10, 11, 12]])
    responses, mask, has_eos = generate_responses(
        lm, prompt, (prompt != PAD).long(), eos_id=EOS, pad_id=PAD, max_new_tokens=4
    )
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert has_eos.tolist() == [True, False]
    assert responses.tolist() == [[9, EOS, PAD, PAD], [9, 10, 11, 12]]


def test_ppo_raises_a_rule_based_reward(ppo_models):
    """PPO must optimise what it is given: reward = fraction of response tokens equal to token 7."""
    target = 7
    reward_fn = lambda prompts, responses: [sum(t == target for t in r) / len(r) for r in responses]
    policy_path, _ = ppo_models
    torch.manual_seed(0)
    load_lm = transformers.AutoModelForCausalLM.from_pretrained
    hp = PPOHyperParams(
        rollout_batch_size=16,
        mini_batch_size=8,
        ppo_epochs=2,
        max_new_tokens=6,
        lr=1e-2,
        value_model="policy_head",
        value_lr=3e-3,
        kl_coef=0.0,
        kernel_backend="reference",
    )
    trainer = PPOTrainer(
        load_lm(policy_path),
        load_lm(policy_path),
        None,
        None,
        hp,
        eos_id=EOS,
        pad_id=PAD,
        total_steps=12,
        reward_fn=reward_fn,
    )
    scores = [trainer.step(_prompts(16, seed=s))["objective/scores"] for s in range(12)]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.3, scores


# ---------------------------------------------------------------------------------------------
# `rlhf ppo` from the command line: checkpoints, --resume after a kill, torchrun DDP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ppo_cmd(model, out, *extra, launcher=(sys.executable, "-m", "rlhf")):
    return [
        *launcher,
        "ppo",
        "--model",
        model,
        "--reward-model",
        model,
        "--output-dir",
        str(out),
        "--rollout-batch-size",
        "8",
        "--mini-batch-size",
        "4",
        "--ppo-epochs",
        "2",
        "--max-new-tokens",
        "6",
        "--eval-prompts",
        "16",
        "--kernel-backend",
        "reference",
        "--no-progress-bar",
        *extra,
    ]


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def _records(out):
    from rlhf.metrics_log import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in read_metrics(str(out))]


def test_rlhf_ppo_resumes_after_kill(tiny_models, tmp_path):
    model = tiny_models["llama"]
    args = ("--max-steps", "6", "--save-steps", "2")
    subprocess.run(_ppo_cmd(model, tmp_path / "full", *args), env=_env(), check=True, capture_output=True)
    full = _records(tmp_path / "full")
    assert [r["step"] for r in full if "objective/kl" in r] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for r in full for v in r.values())
    assert os.path.isdir(tmp_path / "full" / "checkpoint-4" / "value_model")

    # Kill a second run as soon as its first checkpoint is complete, then resume it.
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _ppo_cmd(model, out, *args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (out / "checkpoint-2" / "trainer_state.pt").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "model.safetensors").exists()
    subprocess.run(_ppo_cmd(model, out, *args, "--resume"), env=_env(), check=True, capture_output=True)
    assert _records(out) == full


def test_rlhf_ppo_ddp_two_processes(tiny_models, tmp_path):
    launcher = (
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "rlhf",
    )
    res = subprocess.run(
        _ppo_cmd(tiny_models["llama"], tmp_path, "--max-steps", "2", launcher=launcher),
        check=False,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    records = _records(tmp_path)
    steps = [r for r in records if "objective/kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert os.path.exists(tmp_path / "model.safetensors")
