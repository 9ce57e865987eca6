"""Rewards given as Python functions (``--reward-fn module:function``), in TRL's convention.

A reward function is called once per generation batch with the prompts and the sampled completions
and returns one score per completion::

    def my_reward(prompts: list, completions: list, **kwargs) -> list[float | None]: ...

- ``prompts``: each completion's prompt as the dataset gives it (a string, or a list of
  ``{"role", "content"}`` messages for conversational data), repeated once per completion;
- ``completions``: the decoded completion text (special tokens removed), or for a conversational
  prompt ``[{"role": "assistant", "content": text}]``;
- ``kwargs``: ``completion_ids`` (the token id lists, EOS included when sampled), and every other
  column of the prompt records (e.g. ``solution``, ``answer``) as a list aligned with ``prompts``,
  so a verifiable reward can compare against a reference answer.  Accept ``**kwargs``: more keys
  may be passed.
- the result: a list (or tuple, 1-D tensor or array) of ``len(completions)`` numbers; ``None`` marks
  a completion the function cannot score (TRL's convention; it is left out of the group's mean and
  std, and a completion nobody can score gets advantage 0).

``module`` is an importable module name (the current folder is searched first) or a path to a
``.py`` file: ``--reward-fn rewards:exact_match`` or ``--reward-fn path/to/rewards.py:exact_match``.
``--reward-fn gold`` is the built-in task's gold scorer as a verifiable reward.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
from collections.abc import Callable

from .config import ConfigError, UserError

GOLD = "gold"
"""``--reward-fn`` value naming the task's gold scorer."""


class RewardFunctionError(UserError):
    """A reward function that returned something other than one number (or None) per completion."""


def load_reward_function(spec: str, option: str = "--reward-fn") -> Callable:
    """The callable named by ``spec`` = ``module:function`` (``module`` may be a ``.py`` path);
    :class:`~rlhf.config.ConfigError` naming ``option`` when it cannot be found or is not callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ConfigError(f"{option} must be module:function (e.g. my_rewards:exact_match) or {GOLD}, got {spec!r}")
    if module_name.endswith(".py"):
        path = os.path.expanduser(module_name)
        if not os.path.isfile(path):
            raise ConfigError(f"{option} {spec!r}: file {module_name!r} does not exist")
        name = "_rlhf_reward_" + os.path.splitext(os.path.basename(path))[0]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"{option} {spec!r}: importing {module_name!r} failed: "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ConfigError(f"{option} {spec!r}: no module named {e.name or module_name!r} "
                              f"(a module on the Python path or in the current folder, or a .py file path)") from e
        except Exception as e:
            raise ConfigError(f"{option} {spec!r}: importing {module_name!r} failed: "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
        finally:
            if added:
                sys.path.remove(os.getcwd())
    if not hasattr(module, attr):
        raise ConfigError(f"{option} {spec!r}: module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(f"{option} {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def gold_reward_function(gold_score: Callable[[str, str], float]) -> Callable:
    """A task's ``gold_score(prompt, response)`` as a reward function in the convention above."""

    def gold(prompts, completions, **kwargs):
        return [gold_score(p, c) for p, c in zip(prompts, completions)]

    return gold


def call_reward_function(fn: Callable, name: str, prompts: list, completions: list, **kwargs) -> list[float]:
    """``fn(prompts, completions, **kwargs)`` checked: one finite number or None per completion
    (None becomes NaN).  :class:`RewardFunctionError` names ``name`` otherwise."""
    out = fn(prompts, completions, **kwargs)
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardFunctionError(f"reward function {name} returned a {type(out).__name__}; it must return a "
                                  f"list of {len(completions)} numbers (one per completion)")
    if len(out) != len(completions):
        raise RewardFunctionError(f"reward function {name} returned {len(out)} values for {len(completions)} "
                                  f"completions; it must return one number per completion")
    values = []
    for i, v in enumerate(out):
        if v is None:
            values.append(float("nan"))
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise RewardFunctionError(f"reward function {name} returned {v!r} for completion {i}; each value "
                                      f"must be a finite number (or None: cannot score)")
        values.append(float(v))
    return values


def score_completions(reward_fns: list[tuple[str, Callable]], records: list[dict], completion_ids: list[list[int]],
                      tokenizer, repeat: int = 1) -> dict[str, list[float]]:
    """Every reward function's scores ``{name: [float]}`` (NaN: cannot score) for completions given as
    token id lists, ``repeat`` consecutive completions per record (GRPO's group of G).

    The call follows the convention above: the records' prompts and every other column repeated to
    align with the completions, the decoded text (conversational when the prompt is)."""
    prompts = [rec["prompt"] for rec in records for _ in range(repeat)]
    if len(prompts) != len(completion_ids):
        raise ValueError(f"{len(completion_ids)} completions for {len(records)} records x {repeat}")
    texts = [tokenizer.decode(x, skip_special_tokens=True) for x in completion_ids]
    completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                   for p, t in zip(prompts, texts)]
    columns = {k: [rec.get(k) for rec in records for _ in range(repeat)]
               for k in dict.fromkeys(k for rec in records for k in rec) if k != "prompt"}
    return {name: call_reward_function(fn, name, prompts, completions, completion_ids=completion_ids, **columns)
            for name, fn in reward_fns}
