"""The ``rlhf grpo`` command: GRPO (Shao et al., 2024) from an SFT model, TRL's ``GRPOTrainer`` on rlhf_kernels.

For each prompt ``num_generations`` completions are sampled and scored; a completion's advantage is
its reward relative to the others of its group (no critic).  The policy is updated with the clipped
ratio (``epsilon`` / ``epsilon_high``), optionally ``beta`` times the k3 KL to the frozen reference
(``beta=0``, TRL's default, loads no reference), aggregated as ``loss_type`` says.  One step of
this module is one generation batch; :mod:`rlhf.grpo_trainer` holds the step and the math.

The reward is a reward-model folder (``--reward-model``, as ``rlhf ppo``), a Python function
(``--reward-fn module:function``, TRL's convention, see :mod:`rlhf.reward_functions`), or both
(summed).  On the built-in task the default reward is its gold scorer (``--reward-fn gold``), a
verifiable reward.

    rlhf grpo --model outputs/sft                                      # built-in task, gold reward
    rlhf grpo --model out/sft --reward-model out/rm --dataset prompts.jsonl --output-dir out/grpo
    rlhf grpo --model out/sft --reward-fn my_rewards:exact_match --dataset math.jsonl --beta 0.04
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .checkpoint import load_training_state, save_checkpoint, save_final
from .config import ConfigError, RunConfig
from .distributed import set_step
from .evaluate import evaluate_policy
from .grpo_trainer import LOSS_TYPES, SCALE_REWARDS, GRPOTrainer, group_advantages, grpo_loss
from .metrics_log import Progress
from .models import load_reference, load_reward_model, reference_of, trainable_policy
from .precision import precision_of
from .reward_functions import GOLD, gold_reward_function, load_reward_function
from .tasks import DEFAULT_TASK, get_task
from .trainer_utils import (
    DataSizeError,
    RunContext,
    due,
    global_batch_indices,
    load_rl_prompts,
    log_due,
    rank_slice,
    run_command,
)

__all__ = ["GRPOConfig", "GRPOHyperParams", "GRPOTrainer", "group_advantages", "grpo_loss", "main", "train_grpo"]


@dataclass
class GRPOHyperParams:
    """The GRPO algorithm's knobs, named as TRL's ``GRPOConfig``, with its defaults (for real models;
    the built-in task's tiny model gets the task's own, ``Task.defaults["grpo"]``)."""

    num_generations: int = 8
    """Completions sampled per prompt (G, the group size; >= 2)."""
    generation_batch_size: int = 8
    """Completions sampled per GRPO step over all processes (prompts per step x num_generations)."""
    mini_batch_size: int | None = None
    """Completions per optimizer step over all processes (TRL: per_device_train_batch_size x processes x
    gradient_accumulation_steps); None: the whole generation batch in one optimizer step."""
    num_iterations: int = 1
    """Passes over each generation batch (TRL's mu); with 1 and one minibatch the ratio is exactly 1
    (old log-probs = the detached current ones)."""
    max_completion_length: int = 512
    """Maximum tokens per completion."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are taken at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set with this much probability."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference in the loss; 0 loads no reference model (TRL's default)."""
    epsilon: float = 0.2
    """Clip range below 1: the ratio is clipped at 1 - epsilon."""
    epsilon_high: float | None = None
    """Clip range above 1: the ratio is clipped at 1 + epsilon_high (None: epsilon; DAPO uses 0.28)."""
    loss_type: str = "dapo"
    """Aggregation of the per-token loss: dapo (sum / tokens of the whole generation batch, TRL's
    default), grpo (mean over sequences of the token mean), bnpo (sum / tokens of the minibatch),
    dr_grpo (sum / (sequences x max_completion_length))."""
    scale_rewards: str = "group"
    """Advantage = reward - group mean, divided by the group's std (group), the batch's std (batch)
    or nothing (none: Dr. GRPO)."""
    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps from 0 to ``lr``."""
    lr_scheduler: str = "linear"
    """Decay after warmup, to 0 at the last optimizer step: ``linear``, ``cosine`` or ``constant``."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 turns clipping off)."""
    kernel_backend: str = "auto"
    """rlhf_kernels backend for every kernel call."""

    @property
    def prompts_per_step(self) -> int:
        return self.generation_batch_size // self.num_generations

    def __post_init__(self):
        from .config import KERNEL_BACKENDS, LR_SCHEDULERS, check_types, require, require_choice

        check_types(self)
        require(self.num_generations >= 2, "num_generations", ">= 2 (a group needs two completions)",
                self.num_generations)
        require(self.generation_batch_size >= 1, "generation_batch_size", ">= 1", self.generation_batch_size)
        require(self.generation_batch_size % self.num_generations == 0, "generation_batch_size",
                f"a multiple of --num-generations ({self.num_generations})", self.generation_batch_size)
        if self.mini_batch_size is not None:
            require(self.mini_batch_size >= 1, "mini_batch_size", ">= 1 (or none)", self.mini_batch_size)
            require(self.generation_batch_size % self.mini_batch_size == 0, "generation_batch_size",
                    f"a multiple of --mini-batch-size ({self.mini_batch_size})", self.generation_batch_size)
        require(self.num_iterations >= 1, "num_iterations", ">= 1", self.num_iterations)
        require(self.max_completion_length >= 1, "max_completion_length", ">= 1", self.max_completion_length)
        require(self.temperature > 0, "temperature", "> 0", self.temperature)
        require(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        require(self.beta >= 0, "beta", ">= 0", self.beta)
        require(0 < self.epsilon < 1, "epsilon", "in (0, 1)", self.epsilon)
        if self.epsilon_high is not None:
            require(self.epsilon_high > 0, "epsilon_high", "> 0 (or none)", self.epsilon_high)
        require_choice("loss_type", self.loss_type, LOSS_TYPES)
        require_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        require(self.lr >= 0, "lr", ">= 0", self.lr)
        require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(0.0 <= self.adam_beta1 < 1.0, "adam_beta1", "in [0, 1)", self.adam_beta1)
        require(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", "in [0, 1)", self.adam_beta2)
        require(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        require_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        require(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 turns clipping off)", self.max_grad_norm)
        require_choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        if hasattr(super(), "__post_init__"):  # GRPOConfig: RunConfig's checks too
            super().__post_init__()


@dataclass
class GRPOConfig(GRPOHyperParams, RunConfig):
    """GRPO settings.  ``model`` is the SFT model (the policy's start, and the reference when beta > 0).
    The defaults are TRL's ``GRPOConfig``'s; a model from the built-in task gets the task's own
    (``Task.defaults["grpo"]``: it learns the task in a couple of minutes on a CPU)."""

    DEFAULTS_KEY: ClassVar[str] = "grpo"

    model: str = "outputs/sft"
    """The SFT model to start from (and the frozen reference when ``beta`` > 0)."""
    output_dir: str = "outputs/grpo"
    """Where checkpoints, the final policy and metrics.jsonl are written."""
    reward_model: str = ""
    """A reward model folder (from ``rlhf reward``), scored at the last completion token."""
    reward_fn: str | None = None
    """A reward function ``module:function`` or ``file.py:function``, called as
    ``f(prompts, completions, completion_ids=..., **dataset_columns) -> list[float]`` (TRL's convention);
    ``gold``: the built-in task's gold scorer.  Default: ``gold`` on a built-in task when no
    ``reward_model`` is given.  With both, the rewards are summed."""
    dataset: str = DEFAULT_TASK
    """Prompts (prompt-only, or any format with a ``prompt`` column; other columns reach the reward
    function): a file, a ``datasets`` name, or ``builtin``."""
    max_length: int = 1024
    """Maximum prompt tokens + 1 (a longer prompt is an error naming the record)."""
    max_steps: int = 0
    """GRPO steps (generation batches) to run; 0 means derive from ``num_epochs`` passes over the prompts."""
    logging_steps: int = 10
    """Log metrics every this many GRPO steps."""
    eval_steps: int = 0
    """Evaluate (gold score, proxy reward, KL to the reference) every this many steps (0: only at the end)."""
    eval_prompts: int = 128
    """Held-out prompts sampled for the evaluation."""

    def __post_init__(self):
        super().__post_init__()
        from .config import require

        require(self.eval_prompts >= 0, "eval_prompts", ">= 0", self.eval_prompts)
        task = get_task(self.dataset)
        has_gold = task is not None and task.gold_score is not None
        if self.reward_fn is None and not self.reward_model and has_gold:
            self.reward_fn = GOLD
        if self.reward_fn is None and not self.reward_model:
            raise ConfigError("rlhf grpo needs a reward: --reward-model <folder written by `rlhf reward`> "
                              "and/or --reward-fn module:function")
        if self.reward_fn == GOLD:
            if not has_gold:
                raise ConfigError(f"--reward-fn {GOLD}: dataset {self.dataset!r} is not a built-in task with a "
                                  f"gold scorer; pass --reward-fn module:function or --reward-model")
        elif self.reward_fn is not None:
            load_reward_function(self.reward_fn)  # errors now, naming the option, not after loading models


def reward_functions(cfg: GRPOConfig) -> list[tuple[str, object]]:
    """``[(name, fn)]`` for ``cfg.reward_fn`` (empty without one)."""
    if cfg.reward_fn is None:
        return []
    if cfg.reward_fn == GOLD:
        return [(GOLD, gold_reward_function(get_task(cfg.dataset).gold_score))]
    return [(cfg.reward_fn.rpartition(":")[2], load_reward_function(cfg.reward_fn))]


def train_grpo(cfg: GRPOConfig) -> dict:
    """Run ``rlhf grpo``; returns the last logged metrics (with the final evaluation)."""
    run = RunContext(cfg)
    tok, info, device = run.tokenizer, run.info, run.device
    if not run.checkpoint:  # each process samples its own completions
        torch.manual_seed(cfg.seed * 1000 + info.rank)
    records, prompts, eval_records, task = load_rl_prompts(cfg, tok)
    per_step = cfg.prompts_per_step
    if len(prompts) < per_step:
        raise DataSizeError(f"{len(prompts)} prompts are fewer than one generation batch of {per_step} prompts "
                            f"(--generation-batch-size {cfg.generation_batch_size} / --num-generations "
                            f"{cfg.num_generations})")
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.num_epochs * len(prompts)) // per_step)

    # fp32 master weights; bf16/fp16 compute under autocast (rlhf.precision); with --use-peft only
    # the LoRA adapters train (rlhf.lora)
    precision = precision_of(cfg, device)
    policy = trainable_policy(cfg, run, tok, device, precision.weights, seed=cfg.seed)
    # beta = 0: no reference model is loaded (TRL's behaviour); the evaluation then reports no KL.
    # With LoRA the reference is the policy with its adapters disabled, not a second copy.
    reference = None
    if cfg.beta > 0:
        reference = (reference_of(policy) if cfg.use_peft
                     else load_reference(cfg.model, tok, device, precision.weights, seed=cfg.seed))
    reward_model = (load_reward_model(cfg.reward_model, tok, device, precision.weights, trainable=False)
                    if cfg.reward_model else None)
    gold = task.gold_score if task is not None else None
    trainer = GRPOTrainer(policy, reference, reward_model, reward_functions(cfg), cfg, tokenizer=tok,
                          total_steps=steps, info=info, gold_fn=gold, precision=precision)
    start = 0
    if run.checkpoint:
        start, _ = load_training_state(run.checkpoint, trainer.optimizer, trainer.scheduler, info)

    def evaluate() -> dict:
        if not eval_records:
            return {}
        with precision.autocast():
            res = evaluate_policy(trainer.policy, reference, reward_model, tok, [r["prompt"] for r in eval_records],
                                  gold_fn=gold, max_new_tokens=cfg.max_completion_length, seed=cfg.seed,
                                  backend=cfg.kernel_backend, reward_fns=trainer.reward_fns, records=eval_records)
        return {f"eval/{k}": v for k, v in res.items()}

    if start == 0 and cfg.eval_steps > 0:  # the starting point of the curve
        run.logger.log(0, evaluate())
    progress = Progress(steps, initial=start, desc="grpo", enabled=info.is_main and cfg.progress_bar)
    last: dict = {}
    for step in range(start, steps):
        set_step(step + 1)
        idx = rank_slice(global_batch_indices(step, len(prompts), per_step, cfg.seed), info)
        metrics = trainer.step([prompts[i] for i in idx], [records[i] for i in idx])
        done = step + 1
        progress.update({k: metrics[k] for k in ("reward", "objective/gold") if k in metrics})
        if log_due(done, cfg.logging_steps, steps):
            last = run.logger.log(done, metrics)
        if due(done, cfg.eval_steps, steps):
            run.logger.log(done, evaluate())
        if due(done, cfg.save_steps, steps):
            save_checkpoint(cfg.output_dir, done, trainer.model, tok, trainer.optimizer, trainer.scheduler, info,
                            total_limit=cfg.save_total_limit)
    progress.close()
    last = {**last, **run.logger.log(steps, evaluate())}
    save_final(cfg.output_dir, trainer.policy, tok, info, merge_adapters=cfg.merge_adapters)
    run.close()
    return last


def main(argv: list[str] | None = None) -> int:
    """GRPO from an SFT model: G completions per prompt, group-relative advantages, clipped updates."""
    return run_command(GRPOConfig, train_grpo, argv, "grpo", main.__doc__)
