"""The ``rlhf ppo`` command: PPO from an SFT model against a reward model.

The pieces live in their own modules: :mod:`rlhf.ppo_trainer` (one PPO step: rollout, score,
advantages, learn, metrics), :mod:`rlhf.rollout` and :mod:`rlhf.generation` (sampling),
:mod:`rlhf.actor_critic` (policy + critic behind one forward), :mod:`rlhf.kl_control` (the KL
coefficient).  This module holds the settings (:class:`PPOHyperParams`, :class:`PPOConfig`) and the
run: load the models, step over rollout batches, evaluate, checkpoint.

The value model is a separate scalar-head ``AutoModelForSequenceClassification`` initialised from the
reward model (``value_model="reward"``), or a linear value head on the policy's last hidden state
(``value_model="policy_head"``).

With ``--use-peft`` the policy trains LoRA adapters and its reference is the same model with the
adapters disabled (no second copy); the value model (``reward``) gets its own LoRA adapters with its
score head trained fully, as the reward model does; a ``policy_head`` value head is trained fully
(it is one small linear layer).  The reward model stays frozen and whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from .actor_critic import ActorCritic
from .checkpoint import load_training_state, save_checkpoint, save_final
from .config import Alias, ConfigError, RunConfig
from .distributed import set_step
from .evaluate import evaluate_policy
from .generation import generate_responses, left_pad
from .kl_control import AdaptiveKLController, FixedKLController
from .metrics_log import Progress
from .models import (
    load_reference,
    load_reward_model,
    policy_logprobs,
    reference_of,
    trainable_policy,
    trainable_reward_model,
)
from .ppo_trainer import PPOTrainer
from .precision import precision_of
from .tasks import DEFAULT_TASK
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

__all__ = [  # the PPO pieces are importable from here as before the split
    "ActorCritic", "AdaptiveKLController", "FixedKLController", "PPOConfig", "PPOHyperParams", "PPOTrainer",
    "generate_responses", "left_pad", "main", "policy_logprobs", "train_ppo",
]


@dataclass
class PPOHyperParams:
    """The PPO algorithm's knobs (the command-line config in :class:`PPOConfig` extends these)."""

    # rollout
    max_new_tokens: int = 32
    """Maximum number of tokens generated per response."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are taken at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set with this much probability."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that ends without EOS (None: no penalty)."""
    # reward shaping
    kl_coef: float = 0.05
    """Initial KL coefficient (TRL's name; 0 turns the KL penalty off)."""
    kl_estimator: str = "k1"
    """KL estimator for the penalty in the reward: k1, k2, k3 or abs."""
    kl_in_reward: bool = True
    """True: per-token -kl_coef*KL in the reward; False: kl_coef * k3 KL as a loss term instead."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al., 2019)."""
    target_kl: float = 6.0
    """Adaptive KL: target KL per sequence, in nats."""
    kl_horizon: int = 10000
    """Adaptive KL: horizon in sequences."""
    reward_clip: float | None = 10.0
    """Clip scores to [-reward_clip, reward_clip] (None: no clipping)."""
    whiten_rewards: bool = False
    """Whiten the scores across the rollout batch."""
    # advantage and losses
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the response tokens of the batch."""
    clip_low: float = 0.2
    """PPO clip range below 1 (ratio >= 1 - clip_low)."""
    clip_high: float | None = None
    """PPO clip range above 1 (default: clip_low)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages (None: off)."""
    loss_agg: str = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum."""
    value_clip: float | None = 0.2
    """Value clipping range (None: off)."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    # optimisation
    rollout_batch_size: int = 32
    """Prompts per PPO step, over all processes."""
    mini_batch_size: int = 8
    """Sequences per optimizer step, over all processes."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    lr: float = 1e-5
    """Peak learning rate of the policy (AdamW)."""
    value_lr: float = 1e-5
    """Peak learning rate of the value model (or value head)."""
    weight_decay: float = 0.0
    """AdamW weight decay of policy and critic (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps (minibatches) from 0 to the peak learning rates."""
    lr_scheduler: str = "linear"
    """Decay of both learning rates after warmup, to 0 at the last optimizer step: ``linear``,
    ``cosine`` or ``constant``."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    value_model: str = "reward"
    """'reward': a separate scalar-head model initialised from the reward model; 'policy_head': a value head on the policy."""
    kernel_backend: str = "auto"
    """rlhf_kernels backend for every kernel call."""

    def __post_init__(self):
        from rlhf_kernels.reference import AGG_MODES, KL_ESTIMATORS

        from .config import KERNEL_BACKENDS, check_types, require, require_choice

        check_types(self)
        require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        require(self.temperature > 0, "temperature", "> 0", self.temperature)
        require(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        require(self.kl_coef >= 0, "kl_coef", ">= 0", self.kl_coef)
        require_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        require(self.target_kl > 0, "target_kl", "> 0", self.target_kl)
        require(self.kl_horizon >= 1, "kl_horizon", ">= 1", self.kl_horizon)
        for name in ("reward_clip", "value_clip", "clip_high"):
            if getattr(self, name) is not None:
                require(getattr(self, name) > 0, name, "> 0 (or none)", getattr(self, name))
        require(0 <= self.gamma <= 1, "gamma", "in [0, 1]", self.gamma)
        require(0 <= self.lam <= 1, "lam", "in [0, 1]", self.lam)
        require(0 < self.clip_low < 1, "clip_low", "in (0, 1)", self.clip_low)
        if self.dual_clip is not None:
            require(self.dual_clip > 1, "dual_clip", "> 1 (or none)", self.dual_clip)
        require_choice("loss_agg", self.loss_agg, AGG_MODES)
        require(self.vf_coef >= 0, "vf_coef", ">= 0", self.vf_coef)
        for name in ("rollout_batch_size", "mini_batch_size", "ppo_epochs"):
            require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        require(self.rollout_batch_size % self.mini_batch_size == 0, "rollout_batch_size",
                f"a multiple of --mini-batch-size ({self.mini_batch_size})", self.rollout_batch_size)
        require(self.lr >= 0, "lr", ">= 0", self.lr)
        require(self.value_lr >= 0, "value_lr", ">= 0", self.value_lr)
        require(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 turns clipping off)", self.max_grad_norm)
        require_choice("value_model", self.value_model, ("reward", "policy_head"))
        require_choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        if hasattr(super(), "__post_init__"):  # PPOConfig: TrainConfig's checks too
            super().__post_init__()



@dataclass
class PPOConfig(PPOHyperParams, RunConfig):
    """PPO settings.  ``model`` is the SFT model (the policy's start and the frozen reference).  The
    defaults suit real models (TRL's PPO settings); a model from the built-in task gets the task's own
    (``Task.defaults["ppo"]``)."""

    DEFAULTS_KEY: ClassVar[str] = "ppo"
    ALIASES: ClassVar[dict] = {  # TRL's PPOConfig names
        "num_ppo_epochs": Alias("ppo_epochs"),
        "cliprange": Alias("clip_low"),
        "cliprange_value": Alias("value_clip"),
        "response_length": Alias("max_new_tokens"),
    }

    output_dir: str = "outputs/ppo"
    """Where checkpoints, the final policy and metrics.jsonl are written."""
    reward_model: str = ""
    """The reward model folder (from ``rlhf reward``); the value model starts from it too."""
    dataset: str = DEFAULT_TASK
    """Prompts for RL (prompt-only, or any format with a ``prompt`` column): a file, a ``datasets`` name,
    or ``builtin``."""
    max_length: int = 512
    """Maximum prompt tokens + 1 (a longer prompt is an error naming the record)."""
    max_steps: int = 0
    """PPO steps to run; 0 means derive from ``num_epochs`` passes over the prompts."""
    logging_steps: int = 1
    """Log metrics every this many PPO steps."""
    eval_steps: int = 0
    """Evaluate (gold score, proxy reward, KL to the reference) every this many steps (0: only at the end)."""
    eval_prompts: int = 128
    """Held-out prompts sampled for the evaluation (the built-in task's gold score; proxy and KL always)."""

    def __post_init__(self):
        super().__post_init__()
        from .config import require

        require(self.eval_prompts >= 0, "eval_prompts", ">= 0", self.eval_prompts)


def _load_critic_from(path, reward_model_path, tok, cfg, device, weights_dtype="auto"):
    """The value model: from a checkpoint's ``value_model/`` when resuming, else the reward model.
    With ``--use-peft`` the critic is the reward model with its own LoRA adapters and a fully trained
    score head (the checkpoint's ``value_model/`` then holds that adapter folder)."""
    saved = path if os.path.isdir(path) else None
    return trainable_reward_model(cfg, reward_model_path, tok, device, weights_dtype, adapter_path=saved,
                                  resume_path=saved)


def train_ppo(cfg: PPOConfig) -> dict:
    """Run ``rlhf ppo``; returns the last logged metrics (with the final evaluation)."""
    if not cfg.reward_model:
        raise ConfigError("rlhf ppo needs --reward-model <folder written by `rlhf reward`>")
    run = RunContext(cfg)
    tok, info, device = run.tokenizer, run.info, run.device
    if not run.checkpoint:  # each process samples its own responses
        torch.manual_seed(cfg.seed * 1000 + info.rank)
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    _, prompts, eval_records, task = load_rl_prompts(cfg, tok)
    eval_texts = [r["prompt"] for r in eval_records]
    steps = (
        cfg.max_steps
        if cfg.max_steps > 0
        else max(1, int(cfg.num_epochs * len(prompts)) // cfg.rollout_batch_size)
    )
    if len(prompts) < cfg.rollout_batch_size:
        raise DataSizeError(
            f"{len(prompts)} prompts are fewer than one rollout batch of {cfg.rollout_batch_size}"
        )

    precision = precision_of(cfg, device)
    policy = trainable_policy(cfg, run, tok, device, precision.weights, seed=cfg.seed)
    # With LoRA the reference is the policy's base (adapters disabled): no second copy.
    reference = reference_of(policy) if cfg.use_peft else load_reference(cfg.model, tok, device, precision.weights,
                                                                          seed=cfg.seed)
    reward_model = load_reward_model(cfg.reward_model, tok, device, precision.weights, trainable=False)
    value_model = None
    if cfg.value_model == "reward":
        value_model = _load_critic_from(
            os.path.join(run.model_path, "value_model"), cfg.reward_model, tok, cfg, device, precision.weights
        )

    gold = task.gold_score if task is not None else None
    gold_ids = None
    if gold is not None:

        def gold_ids(prompt_ids, response_ids):
            return [
                gold(tok.decode(p, skip_special_tokens=True), tok.decode(r, skip_special_tokens=True))
                for p, r in zip(prompt_ids, response_ids)
            ]

    trainer = PPOTrainer(
        policy,
        reference,
        reward_model,
        value_model,
        cfg,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        total_steps=steps,
        info=info,
        gold_fn=gold_ids,
        precision=precision,
    )
    start, extra = 0, {}
    if run.checkpoint:
        start, extra = load_training_state(run.checkpoint, trainer.optimizer, trainer.scheduler, info)
        trainer.kl_ctl.value = extra["kl_coef"]
        head = os.path.join(run.checkpoint, "value_head.pt")
        if trainer.actor_critic.value_head is not None:
            trainer.actor_critic.value_head.load_state_dict(torch.load(head, weights_only=True))

    def evaluate() -> dict:
        if not eval_texts:
            return {}
        with precision.autocast():
            res = _evaluate()
        return {f"eval/{k}": v for k, v in res.items()}

    def _evaluate() -> dict:
        return evaluate_policy(
            trainer.policy,
            reference,
            reward_model,
            tok,
            eval_texts,
            gold_fn=gold,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
            backend=cfg.kernel_backend,
        )

    if start == 0 and cfg.eval_steps > 0:  # the starting point (KL 0) of the gold/proxy-vs-KL curve
        run.logger.log(0, evaluate())
    progress = Progress(steps, initial=start, desc="ppo", enabled=info.is_main and cfg.progress_bar)
    last: dict = {}
    for step in range(start, steps):
        set_step(step + 1)
        batch = rank_slice(
            [prompts[i] for i in global_batch_indices(step, len(prompts), cfg.rollout_batch_size, cfg.seed)],
            info,
        )
        metrics = trainer.step(batch)
        done = step + 1
        progress.update({k: metrics[k] for k in ("objective/scores", "objective/kl") if k in metrics})
        if log_due(done, cfg.logging_steps, steps):
            last = run.logger.log(done, metrics)
        if due(done, cfg.eval_steps, steps):
            run.logger.log(done, evaluate())
        if due(done, cfg.save_steps, steps):
            save_checkpoint(
                cfg.output_dir,
                done,
                trainer.model,
                tok,
                trainer.optimizer,
                trainer.scheduler,
                info,
                extra={"kl_coef": trainer.kl_ctl.value},
                total_limit=cfg.save_total_limit,
            )
    progress.close()
    last = {**last, **run.logger.log(steps, evaluate())}
    save_final(cfg.output_dir, trainer.policy, tok, info, merge_adapters=cfg.merge_adapters)
    run.close()
    return last


def main(argv: list[str] | None = None) -> int:
    """PPO from an SFT model against a reward model (rollout, KL-penalised reward, GAE, clipped updates)."""
    return run_command(PPOConfig, train_ppo, argv, "ppo", main.__doc__)
