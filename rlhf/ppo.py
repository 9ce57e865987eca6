"""PPO for language models (Ouyang et al., 2022; Ziegler et al., 2019), with every hot spot in rlhf_kernels.

One PPO step, top to bottom (as in TRL's PPOTrainer and verl's ray trainer):

1. rollout: sample responses to a batch of prompts with ``generate`` (temperature, top-p, max new
   tokens, stop at EOS); the response ends at its first EOS.
2. score: the reward model's scalar head read at the last response token (minus a penalty when a
   response has no EOS, then clipped and optionally whitened); per-token log-probs of the policy and
   of the frozen reference (``rlhf_kernels.token_logprobs``, one pass with the entropy), per-token
   values from the value model.
3. rewards: r_t = -beta * KL_t (``rlhf_kernels.kl_penalty``, k1 by default) plus the score at the last
   token; or, with ``kl_in_reward=False``, the score alone and a k3 KL term in the loss (GRPO style).
4. advantages: ``rlhf_kernels.gae``, whitened with ``rlhf_kernels.masked_whiten``.
5. learn: ``ppo_epochs`` passes over shuffled minibatches: ``ppo_policy_loss`` (clip, asymmetric clip,
   dual clip, aggregation) + ``vf_coef * ppo_value_loss`` (value clipping).
6. adapt beta with the adaptive KL controller of Ziegler et al. (target KL, horizon), if asked.

The value model is a separate scalar-head ``AutoModelForSequenceClassification`` initialised from the
reward model (``value_model="reward"``), or a linear value head on the policy's last hidden state
(``value_model="policy_head"``).  Metrics are named as TRL/verl users expect: objective/kl,
objective/entropy, objective/scores, policy/approxkl, policy/clipfrac, loss/policy, loss/value,
val/clipfrac, response_length/mean, timing/generation, timing/scoring, timing/training.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

import rlhf_kernels as rk

from .checkpoint import load_training_state, save_checkpoint, save_final
from .config import TrainConfig
from .data import pad_batch, tokenize_prompts
from .distributed import DistInfo, all_reduce_sum, masked_whiten_global, wrap_ddp
from .evaluate import evaluate_policy
from .logging import Progress
from .models import ScalarHead, load_policy, load_reference, load_reward_model
from .tasks import gold_score, make_prompts
from .config import ConfigError
from .distributed import set_step
from .trainer_utils import (
    DataSizeError, RunContext, clip_grad_norm, global_batch_indices, load_records_for, rank_slice, run_command,
)


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
    """Initial KL coefficient beta (0 turns the KL penalty off)."""
    kl_estimator: str = "k1"
    """KL estimator for the penalty in the reward: k1, k2, k3 or abs."""
    kl_in_reward: bool = True
    """True: per-token -beta*KL in the reward; False: beta * k3 KL as a loss term instead."""
    adaptive_kl: bool = False
    """Adapt beta towards target_kl (Ziegler et al., 2019)."""
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
    """Learning rate of the policy (peak, decayed linearly to 0)."""
    value_lr: float = 1e-5
    """Learning rate of the value model (or value head)."""
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


class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class ActorCritic(nn.Module):
    """The policy and its critic behind one ``forward`` so that DDP syncs both in one backward.

    ``forward`` returns the policy's logits and the values for the ``response_length`` positions that
    predict the response tokens (position t predicts token t + 1).  ``save_pretrained`` writes the
    policy in Hugging Face format and the critic beside it (``value_model/`` or ``value_head.pt``).
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.value_model = None if value_model is None else ScalarHead(value_model)
        if value_model is None:  # value head on the policy's last hidden state
            hidden = policy.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(hidden + 1))
            nn.init.zeros_(self.value_head.bias)
        else:
            self.value_head = None

    def forward(self, input_ids, attention_mask, position_ids, response_length: int):
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=self.value_head is not None,
        )
        window = slice(-response_length - 1, -1)
        logits = out.logits[:, window]
        if self.value_head is not None:
            values = self.value_head(out.hidden_states[-1][:, window]).squeeze(-1).float()
        else:
            values = self.value_model(input_ids, attention_mask, position_ids)[:, window]
        return logits, values

    def save_pretrained(self, path: str) -> None:
        self.policy.save_pretrained(path)
        if self.value_head is not None:
            torch.save(self.value_head.state_dict(), os.path.join(path, "value_head.pt"))
        else:
            self.value_model.model.save_pretrained(os.path.join(path, "value_model"))


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left-padded prompts: positions count real tokens only, as generate() computes them.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> left-padded ``input_ids`` and ``attention_mask`` ``[B, P]`` on ``device``."""
    ids = pad_batch(prompts, pad_id, "left")
    mask = pad_batch([[1] * len(p) for p in prompts], 0, "left")
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_responses(
    policy,
    prompt_ids,
    prompt_mask,
    *,
    eos_id,
    pad_id,
    max_new_tokens,
    temperature=1.0,
    top_p=1.0,
    do_sample=True,
):
    """Sample responses; returns ``(responses [B, R], response_mask [B, R] bool, has_eos [B] bool)``.

    A response ends at its first EOS (kept, and trained on); tokens after it are masked out.
    """
    kwargs = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if do_sample
        else {"do_sample": False}
    )
    out = policy.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **kwargs,
    )
    responses = out[:, prompt_ids.shape[1] :]
    is_eos = responses == eos_id
    has_eos = is_eos.any(-1)
    # first EOS index (or R - 1 when there is none): the mask covers tokens up to and including it
    first_eos = torch.where(
        has_eos, is_eos.int().argmax(-1), torch.full_like(has_eos, responses.shape[1] - 1, dtype=torch.long)
    )
    response_mask = torch.arange(responses.shape[1], device=responses.device)[None] <= first_eos[:, None]
    responses = responses.masked_fill(~response_mask, pad_id)
    return responses, response_mask, has_eos


@torch.no_grad()
def policy_logprobs(
    model, input_ids, attention_mask, labels, temperature, backend="auto", return_entropy=False
):
    """Log-probs ``[B, R]`` of ``labels`` (the response, -100 where masked) under a causal LM."""
    R = labels.shape[1]
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_position_ids(attention_mask),
        use_cache=False,
    ).logits[:, -R - 1 : -1]
    return rk.token_logprobs(
        logits, labels, temperature=temperature, return_entropy=return_entropy, backend=backend
    )


class PPOTrainer:
    """Holds the four models, the optimizer and the KL controller; :meth:`step` runs one PPO step.

    Args:
        policy: the causal LM being trained (its initial weights are the SFT model).
        ref_policy: the frozen reference (the SFT model).
        reward_model: a one-label sequence-classification model (frozen), or None with ``reward_fn``.
        value_model: a one-label sequence-classification model trained as the critic, or None with
            ``hp.value_model == "policy_head"``.
        hp: :class:`PPOHyperParams` (or a :class:`PPOConfig`).
        eos_id, pad_id: token ids.
        total_steps: PPO steps of the run (the learning rate decays linearly to 0 over them).
        info: the DDP process group (:class:`rlhf.distributed.DistInfo`); None: one process.
        gold_fn: optional ``gold_fn(prompt_ids, response_ids) -> list[float]`` (lists of token ids), a
            programmatic gold score logged beside the proxy reward as ``objective/gold``.
        reward_fn: optional ``reward_fn(prompt_ids, response_ids) -> list[float]``, a rule-based reward
            used instead of the reward model.
    """

    def __init__(
        self,
        policy,
        ref_policy,
        reward_model,
        value_model,
        hp: PPOHyperParams,
        *,
        eos_id: int,
        pad_id: int,
        total_steps: int,
        info: DistInfo | None = None,
        gold_fn=None,
        reward_fn=None,
    ):
        self.hp, self.eos_id, self.pad_id = hp, eos_id, pad_id
        self.info = info or DistInfo()
        self.gold_fn, self.reward_fn = gold_fn, reward_fn
        world = self.info.world_size
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of reward_model and reward_fn")
        if hp.rollout_batch_size % world or hp.mini_batch_size % world:
            raise ValueError(
                f"rollout_batch_size ({hp.rollout_batch_size}) and mini_batch_size ({hp.mini_batch_size}) "
                f"must be multiples of the number of processes ({world})"
            )
        if hp.rollout_batch_size % hp.mini_batch_size:
            raise ValueError(
                f"rollout_batch_size ({hp.rollout_batch_size}) must be a multiple of "
                f"mini_batch_size ({hp.mini_batch_size})"
            )
        if hp.value_model not in ("reward", "policy_head"):
            raise ValueError(f"value_model must be 'reward' or 'policy_head', got {hp.value_model!r}")
        if hp.value_model == "reward" and value_model is None:
            raise ValueError("value_model='reward' needs a value model (initialised from the reward model)")
        self.ref_policy = ref_policy.eval().requires_grad_(False)
        self.reward_model = None
        if reward_model is not None:
            self.reward_model = ScalarHead(reward_model.eval().requires_grad_(False))
        self.actor_critic = ActorCritic(policy, value_model if hp.value_model == "reward" else None)
        self.actor_critic.to(next(policy.parameters()).device)
        self.model = wrap_ddp(self.actor_critic, self.info)
        critic_params = [p for n, p in self.actor_critic.named_parameters() if not n.startswith("policy.")]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": list(self.actor_critic.policy.parameters()), "lr": hp.lr},
                {"params": critic_params, "lr": hp.value_lr},
            ],
            eps=1e-5,
        )
        updates = total_steps * hp.ppo_epochs * (hp.rollout_batch_size // hp.mini_batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: max(0.0, 1.0 - i / max(updates, 1))
        )
        self.kl_ctl = (
            AdaptiveKLController(hp.kl_coef, hp.target_kl, hp.kl_horizon)
            if hp.adaptive_kl
            else FixedKLController(hp.kl_coef)
        )

    @property
    def policy(self):
        return self.actor_critic.policy

    # ---------------------------------------------------------------- one step
    def step(self, prompts: list[list[int]]) -> dict[str, float]:
        """One PPO step on this process's share of the prompts (lists of token ids)."""
        hp, backend = self.hp, self.hp.kernel_backend
        device = next(self.policy.parameters()).device
        timing = {}

        # 1. rollout -------------------------------------------------------------------------
        t0 = time.perf_counter()
        self.actor_critic.eval()
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id, device)
        responses, response_mask, has_eos = generate_responses(
            self.policy,
            prompt_ids,
            prompt_mask,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            max_new_tokens=hp.max_new_tokens,
            temperature=hp.temperature,
            top_p=hp.top_p,
        )
        timing["timing/generation"] = time.perf_counter() - t0

        # 2. score: reward, log-probs of policy and reference, values --------------------------
        t0 = time.perf_counter()
        B, R = responses.shape
        input_ids = torch.cat([prompt_ids, responses], 1)
        attention_mask = torch.cat([prompt_mask, response_mask.long()], 1)
        position_ids = _position_ids(attention_mask)
        labels = responses.masked_fill(~response_mask, -100)
        last = response_mask.sum(1) - 1  # index of the last response token
        rows = torch.arange(B, device=device)
        response_lists = [r[m].tolist() for r, m in zip(responses, response_mask)]
        with torch.no_grad():
            logits, values = self.actor_critic(input_ids, attention_mask, position_ids, R)
            old_logprobs, entropy = rk.token_logprobs(
                logits, labels, temperature=hp.temperature, return_entropy=True, backend=backend
            )
            del logits
            ref_logprobs = policy_logprobs(
                self.ref_policy, input_ids, attention_mask, labels, hp.temperature, backend
            )
            if self.reward_fn is not None:
                scores = torch.tensor(
                    self.reward_fn(prompts, response_lists), dtype=torch.float32, device=device
                )
            else:
                scores = self.reward_model(input_ids, attention_mask, position_ids)[:, -R:][rows, last]
        raw_scores = scores.clone()
        if hp.missing_eos_penalty is not None:
            scores = scores - hp.missing_eos_penalty * (~has_eos).float()
        if hp.reward_clip is not None:
            scores = scores.clamp(-hp.reward_clip, hp.reward_clip)
        if hp.whiten_rewards:
            scores = rk.masked_whiten(scores, torch.ones_like(scores, dtype=torch.bool), backend=backend)
        timing["timing/scoring"] = time.perf_counter() - t0

        # 3. rewards and 4. advantages ----------------------------------------------------------
        t0 = time.perf_counter()
        beta = self.kl_ctl.value
        kl = rk.kl_penalty(old_logprobs, ref_logprobs, estimator=hp.kl_estimator, backend=backend)
        kl = kl * response_mask
        rewards = -beta * kl if hp.kl_in_reward else torch.zeros_like(old_logprobs)
        rewards[rows, last] += scores
        values = values.masked_fill(~response_mask, 0.0)
        advantages, returns = rk.gae(
            rewards, values, response_mask, gamma=hp.gamma, lam=hp.lam, backend=backend
        )
        if hp.whiten_advantages:
            # over the global batch: under DDP every rank whitens with the same statistics
            advantages = masked_whiten_global(advantages, response_mask, backend=backend)

        # 5. learn: ppo_epochs passes over shuffled minibatches ----------------------------------
        self.actor_critic.train()
        mb = hp.mini_batch_size // self.info.world_size
        stats = {
            k: [] for k in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "kl")
        }
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(B, device=device)
            for start in range(0, B, mb):
                idx = order[start : start + mb]
                m = response_mask[idx]
                logits, new_values = self.model(input_ids[idx], attention_mask[idx], position_ids[idx], R)
                logprobs, new_entropy = rk.token_logprobs(
                    logits, labels[idx], temperature=hp.temperature, return_entropy=True, backend=backend
                )
                pg_loss, pg_stats = rk.ppo_policy_loss(
                    logprobs,
                    old_logprobs[idx],
                    advantages[idx],
                    m,
                    clip_low=hp.clip_low,
                    clip_high=hp.clip_high,
                    dual_clip=hp.dual_clip,
                    agg=hp.loss_agg,
                    backend=backend,
                )
                vf_loss, vf_stats = rk.ppo_value_loss(
                    new_values,
                    values[idx],
                    returns[idx],
                    m,
                    clip=hp.value_clip,
                    agg=hp.loss_agg,
                    backend=backend,
                )
                loss = pg_loss + hp.vf_coef * vf_loss
                if not hp.kl_in_reward:
                    kl_loss = rk.masked_mean(
                        rk.kl_penalty(logprobs, ref_logprobs[idx], estimator="k3", backend=backend), m
                    )
                    loss = loss + beta * kl_loss
                    stats["kl"].append(kl_loss.item())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip_grad_norm(self.actor_critic, hp.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                stats["approxkl"].append(pg_stats["approx_kl"].item())
                stats["clipfrac"].append(pg_stats["clipfrac"].item())
                stats["pg_loss"].append(pg_loss.item())
                stats["vf_loss"].append(vf_loss.item())
                stats["vf_clipfrac"].append(vf_stats["clipfrac"].item())
                stats["entropy"].append(rk.masked_mean(new_entropy.detach(), m).item())
        timing["timing/training"] = time.perf_counter() - t0

        # 6. metrics (means over processes) and the KL controller ---------------------------------
        seq_kl = (
            rk.kl_penalty(old_logprobs, ref_logprobs, estimator="k1", backend=backend) * response_mask
        ).sum(1)
        metrics = {
            "objective/kl": seq_kl.mean(),
            # exact per-token entropy of the sampling distribution, summed over the response
            "objective/entropy": (entropy * response_mask).sum(1).mean(),
            "objective/scores": raw_scores.mean(),
            "objective/non_score_reward": (-beta * kl.sum(1)).mean()
            if hp.kl_in_reward
            else torch.tensor(0.0),
            "objective/rlhf_reward": (scores - beta * seq_kl).mean(),
            "policy/approxkl": _mean(stats["approxkl"]),
            "policy/clipfrac": _mean(stats["clipfrac"]),
            "policy/entropy": _mean(stats["entropy"]),
            "loss/policy": _mean(stats["pg_loss"]),
            "loss/value": _mean(stats["vf_loss"]),
            "val/clipfrac": _mean(stats["vf_clipfrac"]),
            "val/mean": rk.masked_mean(values, response_mask),
            "val/eos_fraction": has_eos.float().mean(),
            "response_length/mean": response_mask.sum(1).float().mean(),
        }
        if stats["kl"]:
            metrics["loss/kl"] = _mean(stats["kl"])
        if self.gold_fn is not None:
            metrics["objective/gold"] = _mean(self.gold_fn(prompts, response_lists))
        names = list(metrics)
        summed = all_reduce_sum(
            torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64).cpu() for k in names])
        )
        out = {k: (summed[i] / self.info.world_size).item() for i, k in enumerate(names)}
        out["objective/kl_coef"] = beta
        out["lr"] = self.scheduler.get_last_lr()[0]
        out.update(timing)
        self.kl_ctl.update(out["objective/kl"], hp.rollout_batch_size)
        return out


def _mean(xs) -> float:
    return float(sum(xs) / len(xs)) if len(xs) else 0.0


# ==============================================================================================
# The `rlhf ppo` command


@dataclass
class PPOConfig(PPOHyperParams, TrainConfig):
    """PPO settings.  ``model`` is the SFT model (the policy's start and the frozen reference)."""

    output_dir: str = "outputs/ppo"
    """Where checkpoints, the final policy and metrics.jsonl are written."""
    reward_model: str = ""
    """The reward model folder (from ``rlhf reward``); the value model starts from it too."""
    dataset: str = "builtin"
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


def _load_critic_from(path, reward_model_path, tok, cfg, device):
    """The value model: from a checkpoint's ``value_model/`` when resuming, else the reward model."""
    return load_reward_model(
        path if os.path.isdir(path) else reward_model_path, tok, device, cfg.dtype, cfg.gradient_checkpointing
    )


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
    records, eval_records = load_records_for(cfg, "prompts")
    prompts = [
        e["prompt_ids"]
        for e in tokenize_prompts(records, tok, cfg.max_length, name=f"dataset {cfg.dataset!r}")
    ]
    if not eval_records:  # built-in task: fresh prompts; otherwise the first training prompts
        eval_records = (
            make_prompts(cfg.eval_prompts, seed=cfg.seed + 777) if cfg.dataset == "builtin" else records
        )
    eval_texts = [r["prompt"] for r in eval_records[: cfg.eval_prompts]]
    steps = (
        cfg.max_steps
        if cfg.max_steps > 0
        else max(1, int(cfg.num_epochs * len(prompts)) // cfg.rollout_batch_size)
    )
    if len(prompts) < cfg.rollout_batch_size:
        raise DataSizeError(
            f"{len(prompts)} prompts are fewer than one rollout batch of {cfg.rollout_batch_size}"
        )

    policy = load_policy(run.model_path, tok, device, cfg.dtype, cfg.gradient_checkpointing, seed=cfg.seed)
    reference = load_reference(cfg.model, tok, device, cfg.dtype, seed=cfg.seed)
    reward_model = load_reward_model(cfg.reward_model, tok, device, cfg.dtype, trainable=False)
    value_model = None
    if cfg.value_model == "reward":
        value_model = _load_critic_from(
            os.path.join(run.model_path, "value_model"), cfg.reward_model, tok, cfg, device
        )

    gold = gold_ids = None
    if cfg.dataset == "builtin":
        gold = gold_score

        def gold_ids(prompt_ids, response_ids):
            return [
                gold_score(tok.decode(p, skip_special_tokens=True), tok.decode(r, skip_special_tokens=True))
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
        res = evaluate_policy(
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
        return {f"eval/{k}": v for k, v in res.items()}

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
        if done % max(cfg.logging_steps, 1) == 0 or done in (1, steps):
            last = run.logger.log(done, metrics)
        if cfg.eval_steps > 0 and done % cfg.eval_steps == 0 and done != steps:
            run.logger.log(done, evaluate())
        if cfg.save_steps > 0 and done % cfg.save_steps == 0 and done != steps:
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
    save_final(cfg.output_dir, trainer.policy, tok, info)
    run.close()
    return last


def main(argv: list[str] | None = None) -> int:
    """PPO from an SFT model against a reward model (rollout, KL-penalised reward, GAE, clipped updates)."""
    return run_command(PPOConfig, train_ppo, argv, "ppo", main.__doc__)
