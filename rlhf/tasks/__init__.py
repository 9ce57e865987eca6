"""Built-in tasks: data, a gold scorer, a tiny model config and a tokenizer, all made in code."""

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
    "GOLD_TASK",
    "build_tokenizer",
    "evaluate_gold",
    "gold_score",
    "make_demonstrations",
    "make_preference_pairs",
    "make_prompts",
    "tiny_llama_config",
]
