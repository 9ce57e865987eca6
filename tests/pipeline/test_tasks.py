"""The task registry: a task registered under a new name is used through the same seam as the
built-in one (model, tokenizer, data, gold scorer, PPO settings), so the core never compares names."""

import dataclasses

import pytest
import torch

from rlhf import tasks
from rlhf.models import check_model_path, load_policy, load_reward_model, load_tokenizer
from rlhf.sft import SFTConfig
from rlhf.trainer_utils import load_records_for


@pytest.fixture
def other_task():
    """The built-in task with smaller data, registered as ``other``; unregistered afterwards."""
    base = tasks.get_task(tasks.DEFAULT_TASK)
    task = dataclasses.replace(base, name="other", data_sizes={"sft": 40, "preference": 30, "prompts": 20},
                               defaults={**base.defaults, "ppo": {"kl_coef": 0.5}})
    tasks.register_task(task)
    yield task
    tasks.registry._TASKS.pop("other")


def test_the_builtin_task_is_registered():
    task = tasks.get_task("builtin")
    assert task is not None and tasks.DEFAULT_TASK == "builtin" and "builtin" in tasks.task_names()
    assert task.gold_score("abcd=", "bcde") == 1.0
    assert tasks.gold_scorer_for("builtin") is task.gold_score
    assert tasks.get_task("outputs/sft") is None and tasks.gold_scorer_for("data.jsonl") is None
    assert tasks.get_task(None) is None


def test_a_registered_task_provides_data_model_and_tokenizer(other_task):
    cfg = SFTConfig(model="other", dataset="other", eval_fraction=0.25, progress_bar=False)
    train, held_out = load_records_for(cfg, "sft")
    assert (len(train), len(held_out)) == (30, 10)
    prefs, _ = load_records_for(dataclasses.replace(cfg, eval_fraction=0.0), "preference")
    assert len(prefs) == 30 and {"chosen", "rejected", "gold_chosen"} <= set(prefs[0])
    check_model_path("other")  # no "does not exist" for a task name
    tok = load_tokenizer("other")
    assert tok.pad_token_id is not None and len(tok) == len(load_tokenizer("builtin"))
    a, b = load_policy("other", tok, seed=3), load_policy("builtin", tok, seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="reward model"):
        load_reward_model("other", tok)
    assert tasks.gold_scorer_for("other") is other_task.gold_score


def test_an_unregistered_name_is_a_path():
    with pytest.raises(Exception, match="does not exist"):
        check_model_path("./not_a_task")
    cfg = SFTConfig(dataset="./nowhere.jsonl", progress_bar=False)
    with pytest.raises(Exception, match="nowhere"):
        load_records_for(cfg, "sft")


def test_register_task_checks_what_it_is_given(other_task):
    with pytest.raises(TypeError):
        tasks.register_task({"name": "x"})
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task(dataclasses.replace(other_task))
    with pytest.raises(ValueError, match="prompts"):
        tasks.register_task(dataclasses.replace(other_task, name="partial",
                                                make_records={"sft": other_task.make_records["sft"]}))
    with pytest.raises(ValueError, match="kind"):
        other_task.records("pairs")
