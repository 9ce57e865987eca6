"""Built-in tasks: data, a gold scorer, a tiny model and a tokenizer, all made in code, registered
by name (:mod:`rlhf.tasks.registry`) so the core modules ask the registry rather than compare names."""

from .registry import DEFAULT_TASK, Task, get_task, gold_scorer_for, register_task, task_names
from .shift import (
    GOLD_TASK,
    build_tokenizer,
    evaluate_gold,
    gold_score,
    make_demonstrations,
    make_preference_pairs,
    make_prompts,
    tiny_llama_config,
)

__all__ = [
    "DEFAULT_TASK",
    "GOLD_TASK",
    "Task",
    "build_tokenizer",
    "evaluate_gold",
    "get_task",
    "gold_score",
    "gold_scorer_for",
    "make_demonstrations",
    "make_preference_pairs",
    "make_prompts",
    "register_task",
    "task_names",
    "tiny_llama_config",
]
