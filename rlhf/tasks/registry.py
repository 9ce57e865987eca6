"""The registry of built-in tasks: the one seam between the core modules and a task made in code.

A task provides, under one name that the commands accept in place of a model path or a dataset,
everything a run needs without a download: the tokenizer, the model, SFT demonstrations,
preference pairs, prompts, a gold scorer (the true reward, to measure over-optimisation of the
learned one), a gold evaluation of a policy, and the settings tuned for its tiny model.  The core
modules ask the registry (:func:`get_task`) and never compare names themselves.

    register_task(Task(name="mytask", build_tokenizer=..., build_model=..., ...))
    rlhf pipeline --model mytask --sft-data mytask --pref-data mytask --prompt-data mytask
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TASK = "builtin"
"""The name of the task the commands use by default (``--model``, ``--dataset``, ...)."""

DATA_KINDS = ("sft", "preference", "prompts")


@dataclass(frozen=True)
class Task:
    """What a built-in task provides.  The callables are plain functions of their arguments (and of
    the seed they are given), so a run on a task is reproducible."""

    name: str
    build_tokenizer: Callable[[], Any]
    """() -> a ``PreTrainedTokenizerFast`` (no download)."""
    build_model: Callable[[int], Any]
    """(vocab_size) -> a freshly initialised causal LM (the caller seeds and places it)."""
    make_records: dict[str, Callable[..., list[dict]]]
    """Data kind (``sft``, ``preference``, ``prompts``) -> ``(n, seed=...) -> records``."""
    data_sizes: dict[str, int]
    """Data kind -> how many records a run trains on."""
    gold_score: Callable[[str, str], float] | None = None
    """(prompt, response) -> the true score, or None when the task has no gold scorer."""
    evaluate_gold: Callable[..., dict] | None = None
    """(model, tokenizer, n_prompts, seed=...) -> ``{"gold/mean_score", ...}`` on held-out prompts."""
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Settings tuned for the task's tiny model, by command (``sft``, ``reward``, ``dpo``, ``ppo``, ...):
    they replace that command's defaults (which suit real models) whenever the model is this task or
    was trained from it; an option the user sets still wins (:class:`rlhf.config.ModelDefaults`)."""

    @property
    def ppo_defaults(self) -> dict[str, Any]:
        """The task's ``rlhf ppo`` settings (``defaults["ppo"]``)."""
        return dict(self.defaults.get("ppo", {}))

    def records(self, kind: str, seed: int = 0) -> list[dict]:
        """The task's training records of ``kind`` (``sft``, ``preference`` or ``prompts``)."""
        if kind not in DATA_KINDS:
            raise ValueError(f"kind must be one of {', '.join(DATA_KINDS)}; got {kind!r}")
        return self.make_records[kind](self.data_sizes[kind], seed=seed)

    def prompts(self, n: int, seed: int) -> list[dict]:
        """``n`` fresh prompt records (for evaluation: seed them apart from the training data's)."""
        return self.make_records["prompts"](n, seed=seed)


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` available under ``task.name`` (wherever a model path or dataset is accepted)."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task, got {type(task).__name__}")
    missing = [k for k in DATA_KINDS if k not in task.make_records or k not in task.data_sizes]
    if missing:
        raise ValueError(f"task {task.name!r} gives no {', '.join(missing)} data (make_records and data_sizes)")
    if task.name in _TASKS and _TASKS[task.name] is not task:
        raise ValueError(f"a task named {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def get_task(name: str | None) -> Task | None:
    """The task registered as ``name``, or None when ``name`` is not a task (a path, a Hub name)."""
    return _TASKS.get(name) if isinstance(name, str) else None


def task_names() -> list[str]:
    return sorted(_TASKS)


def gold_scorer_for(dataset: str | None) -> Callable[[str, str], float] | None:
    """The gold scorer of the task ``dataset`` names, or None (real data has no gold scorer)."""
    task = get_task(dataset)
    return task.gold_score if task is not None else None
