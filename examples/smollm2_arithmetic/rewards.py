"""Verifiable reward for the arithmetic prompts: 1.0 when the completion's last integer is the answer.

Used as ``--reward-fn examples/smollm2_arithmetic/rewards.py:exact_number`` (TRL's reward-function
convention: the dataset's ``answer`` column arrives as a keyword argument)."""

import re

_INT = re.compile(r"-?\d+")


def completion_text(completion) -> str:
    """The text of a completion: a string, or a conversational ``[{"role", "content"}]`` list."""
    if isinstance(completion, list):
        return " ".join(m.get("content", "") for m in completion)
    return completion


def last_number(text: str) -> str | None:
    found = _INT.findall(text.replace(",", ""))
    return found[-1] if found else None


def exact_number(prompts, completions, answer, **kwargs) -> list[float]:
    return [1.0 if last_number(completion_text(c)) == str(a).strip() else 0.0 for c, a in zip(completions, answer)]
