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
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import rlhf_kernels as rk


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


def token_scores(model: nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Per-token outputs ``[B, T]`` of a one-label ``AutoModelForSequenceClassification``'s scalar head.

    The Hugging Face forward pools the head at the last non-pad token, which is ambiguous when pad ==
    EOS; reading the head at every position lets the caller pick the token it means.
    """
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return model.score(hidden.last_hidden_state).squeeze(-1).float()


class ActorCritic(nn.Module):
    """The policy and its critic behind one ``forward`` so that DDP syncs both in one backward.

    ``forward`` returns the policy's logits and the values for the ``response_length`` positions that
    predict the response tokens (position t predicts token t + 1).
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
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
            values = token_scores(self.value_model, input_ids, attention_mask, position_ids)[:, window]
        return logits, values


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left-padded prompts: positions count real tokens only, as generate() computes them.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> left-padded ``input_ids`` and ``attention_mask`` ``[B, P]``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
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


def _all_mean(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world).item()


class PPOTrainer:
    """Holds the four models, the optimizer and the KL controller; :meth:`step` runs one PPO step.

    Args:
        policy: the causal LM being trained (its initial weights are the SFT model).
        ref_policy: the frozen reference (the SFT model).
        reward_model: a one-label sequence-classification model (frozen), or None with ``reward_fn``.
        value_model: a one-label sequence-classification model trained as the critic, or None with
            ``hp.value_model == "policy_head"``.
        hp: :class:`PPOHyperParams`.
        eos_id, pad_id: token ids.
        rank, world_size: the DDP process group (``world_size == 1``: one process).
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
        rank: int = 0,
        world_size: int = 1,
        gold_fn=None,
        reward_fn=None,
    ):
        self.hp, self.eos_id, self.pad_id = hp, eos_id, pad_id
        self.rank, self.world_size, self.gold_fn, self.reward_fn = rank, world_size, gold_fn, reward_fn
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of reward_model and reward_fn")
        if hp.rollout_batch_size % world_size or hp.mini_batch_size % world_size:
            raise ValueError(
                f"rollout_batch_size ({hp.rollout_batch_size}) and mini_batch_size ({hp.mini_batch_size}) "
                f"must be multiples of the number of processes ({world_size})"
            )
        if hp.rollout_batch_size % hp.mini_batch_size:
            raise ValueError(
                f"rollout_batch_size ({hp.rollout_batch_size}) must be a multiple of mini_batch_size ({hp.mini_batch_size})"
            )
        if hp.value_model not in ("reward", "policy_head"):
            raise ValueError(f"value_model must be 'reward' or 'policy_head', got {hp.value_model!r}")
        self.ref_policy, self.reward_model = ref_policy.eval().requires_grad_(False), reward_model
        if reward_model is not None:
            reward_model.eval().requires_grad_(False)
        self.actor_critic = ActorCritic(policy, value_model if hp.value_model == "reward" else None)
        self.model = self.actor_critic
        if world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(self.actor_critic)
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

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_coef": self.kl_ctl.value,
            "value_head": None
            if self.actor_critic.value_head is None
            else self.actor_critic.value_head.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.value = state["kl_coef"]
        if state.get("value_head") is not None:
            self.actor_critic.value_head.load_state_dict(state["value_head"])

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
                response_lists = [r[m].tolist() for r, m in zip(responses, response_mask)]
                scores = torch.tensor(
                    self.reward_fn(prompts, response_lists), dtype=torch.float32, device=device
                )
            else:
                scores = token_scores(self.reward_model, input_ids, attention_mask, position_ids)[:, -R:]
                scores = scores[rows, last]
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
        kl = (
            rk.kl_penalty(old_logprobs, ref_logprobs, estimator=hp.kl_estimator, backend=backend)
            * response_mask
        )
        rewards = torch.zeros_like(old_logprobs)
        if hp.kl_in_reward:
            rewards = -beta * kl
        rewards[rows, last] += scores
        values = values.masked_fill(~response_mask, 0.0)
        advantages, returns = rk.gae(
            rewards, values, response_mask, gamma=hp.gamma, lam=hp.lam, backend=backend
        )
        if hp.whiten_advantages:
            advantages = rk.masked_whiten(advantages, response_mask, backend=backend)

        # 5. learn ----------------------------------------------------------------------------
        self.actor_critic.train()
        mb = hp.mini_batch_size // self.world_size
        stats = {
            k: [] for k in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "kl_loss")
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
                if not hp.kl_in_reward and beta > 0:
                    kl_loss = rk.masked_mean(
                        rk.kl_penalty(logprobs, ref_logprobs[idx], estimator="k3", backend=backend), m
                    )
                    loss = loss + beta * kl_loss
                    stats["kl_loss"].append(kl_loss.item())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.actor_critic.parameters(), hp.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                stats["approxkl"].append(pg_stats["approx_kl"].item())
                stats["clipfrac"].append(pg_stats["clipfrac"].item())
                stats["pg_loss"].append(pg_loss.item())
                stats["vf_loss"].append(vf_loss.item())
                stats["vf_clipfrac"].append(vf_stats["clipfrac"].item())
                stats["entropy"].append(rk.masked_mean(new_entropy.detach(), m).item())
        timing["timing/training"] = time.perf_counter() - t0

        # 6. metrics and the KL controller ------------------------------------------------------
        seq_kl = (
            rk.kl_penalty(old_logprobs, ref_logprobs, estimator="k1", backend=backend) * response_mask
        ).sum(1)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
        metrics = {
            "objective/kl": seq_kl.mean().item(),
            "objective/entropy": (entropy * response_mask).sum(1).mean().item(),
            "objective/scores": raw_scores.mean().item(),
            "objective/non_score_reward": (-beta * kl.sum(1)).mean().item() if hp.kl_in_reward else 0.0,
            "objective/rlhf_reward": (scores - beta * seq_kl).mean().item(),
            "objective/kl_coef": beta,
            "policy/approxkl": mean(stats["approxkl"]),
            "policy/clipfrac": mean(stats["clipfrac"]),
            "policy/entropy": mean(stats["entropy"]),
            "loss/policy": mean(stats["pg_loss"]),
            "loss/value": mean(stats["vf_loss"]),
            "val/clipfrac": mean(stats["vf_clipfrac"]),
            "val/mean": rk.masked_mean(values, response_mask).item(),
            "val/num_eos_tokens": has_eos.float().sum().item(),
            "response_length/mean": response_mask.sum(1).float().mean().item(),
            "lr": self.scheduler.get_last_lr()[0],
        }
        if stats["kl_loss"]:
            metrics["loss/kl"] = mean(stats["kl_loss"])
        if self.gold_fn is not None:
            gold = self.gold_fn(prompts, [r[m].tolist() for r, m in zip(responses, response_mask)])
            metrics["objective/gold"] = sum(gold) / len(gold)
        metrics = {k: _all_mean(v, self.world_size) for k, v in metrics.items()}
        metrics["val/num_eos_tokens"] *= self.world_size  # a count over all processes, not a mean
        metrics.update(timing)
        self.kl_ctl.update(metrics["objective/kl"], hp.rollout_batch_size)
        return metrics
