"""`rlhf ppo --help` lists only options that change something."""

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from rlhf.config import ConfigError, build_parser, parse_config
from rlhf.ppo import PPOConfig, PPOHyperParams, PPOTrainer
from rlhf.trainer_utils import lr_lambda

from .test_structure import _modules, import_graph

transformers = pytest.importorskip("transformers")

NOT_PPO = ("padding_side", "per_device_batch_size", "gradient_accumulation_steps")


def _help_options() -> set[str]:
    """Every option `rlhf ppo --help` lists, a TRL alias (dest ``alias:<name>``) counted as the option it sets."""
    from rlhf.config import aliases_of

    parser = build_parser(PPOConfig)
    aliases = aliases_of(PPOConfig)
    return {aliases[a.dest.removeprefix("alias:")].target if a.dest.startswith("alias:") else a.dest
            for a in parser._actions if a.dest not in ("help", "config")}


def test_batching_options_of_the_dataset_trainers_are_not_listed():
    listed = _help_options()
    assert not set(NOT_PPO) & listed
    assert {"weight_decay", "adam_beta1", "adam_beta2", "warmup_steps", "lr_scheduler"} <= listed
    with pytest.raises(ConfigError, match="unrecognized arguments: --per-device-batch-size"):
        parse_config(PPOConfig, ["--per-device-batch-size", "4"])


def test_every_listed_option_is_read_by_the_ppo_run():
    """Static: each option is read as ``<obj>.<name>`` in a module the `rlhf ppo` run imports."""
    graph = import_graph(_modules())
    reach, todo = set(), ["rlhf.ppo"]
    while todo:
        mod = todo.pop()
        if mod not in reach:
            reach.add(mod)
            todo.extend(graph[mod])
    reach -= {"rlhf.config", "rlhf.sft", "rlhf.dpo", "rlhf.reward", "rlhf.pipeline"}
    read = set()
    for mod in reach:
        path = _modules()[mod]
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                read.add(node.attr)
    # --debug is read by the command body (it only decides whether a user error shows its traceback)
    unread = sorted(_help_options() - read - {"debug"})
    assert not unread, f"`rlhf ppo` lists options nothing reads: {unread}"


def _tiny_trainer(total_steps=2, **hp):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=24, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    policy = transformers.LlamaForCausalLM(cfg)
    hp = PPOHyperParams(rollout_batch_size=8, mini_batch_size=4, ppo_epochs=2, value_model="policy_head", **hp)
    return PPOTrainer(policy, transformers.LlamaForCausalLM(cfg), None, None, hp, eos_id=2, pad_id=0,
                      total_steps=total_steps, reward_fn=lambda p, r: [0.0] * len(r))


def test_optimizer_options_reach_adamw():
    trainer = _tiny_trainer(weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, lr=1e-3, value_lr=2e-3)
    groups = trainer.optimizer.param_groups
    assert all(g["betas"] == (0.8, 0.95) for g in groups)
    params = {id(p): g for g in groups for p in g["params"]}
    for name, p in trainer.actor_critic.named_parameters():
        g = params.pop(id(p))  # every parameter is optimised, once
        assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), name
        assert g["initial_lr"] == (1e-3 if name.startswith("policy.") else 2e-3), name
        assert g["eps"] == 1e-5
    assert not params
    # weight decay changes the update: one step from the same state with and without it
    plain = _tiny_trainer(lr=1e-3)
    for t in (trainer, plain):
        for p in t.actor_critic.parameters():
            p.grad = torch.zeros_like(p)
        t.optimizer.step()
    w, w0 = trainer.policy.lm_head.weight, plain.policy.lm_head.weight
    assert torch.allclose(w, w0 * (1 - 1e-3 * 0.1 * lr_lambda(0, 0, 8, "linear")))


@pytest.mark.parametrize("kind,warmup", [("linear", 0), ("cosine", 3), ("constant", 2)])
def test_schedule_options_shape_the_learning_rate(kind, warmup):
    # 2 PPO steps x 2 epochs x 2 minibatches = 8 optimizer steps
    trainer = _tiny_trainer(lr=1e-3, value_lr=2e-3, warmup_steps=warmup, lr_scheduler=kind)
    seen = []
    for _ in range(8):
        seen.append([g["lr"] for g in trainer.optimizer.param_groups])
        trainer.optimizer.step()  # no gradients: changes nothing, keeps the step order torch expects
        trainer.scheduler.step()
    for i, lrs in enumerate(seen):
        factor = lr_lambda(i, warmup, 8, kind)
        policy_lr, critic_lr = lrs[0], lrs[-1]
        assert math.isclose(policy_lr, 1e-3 * factor) and math.isclose(critic_lr, 2e-3 * factor)
    # the default is PPO's linear decay to 0 without warmup
    assert (PPOConfig().lr_scheduler, PPOConfig().warmup_steps) == ("linear", 0)


def test_the_ppo_config_has_the_hyperparameters():
    """PPOConfig is PPOHyperParams plus the run's settings: a trainer built from either behaves alike."""
    assert {f.name for f in dataclasses.fields(PPOHyperParams)} <= {f.name for f in dataclasses.fields(PPOConfig)}
