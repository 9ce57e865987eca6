"""One PPO step (Ouyang et al., 2022; Ziegler et al., 2019), every hot spot in rlhf_kernels.

:meth:`PPOTrainer.step` runs, in order (as TRL's PPOTrainer and verl's ray trainer do):

1. :meth:`~PPOTrainer.rollout`: sample responses to the prompts (temperature, top-p, max new tokens);
   a response ends at its first EOS.
2. :meth:`~PPOTrainer.score`: the reward model's scalar head read at the last response token (minus
   a penalty when a response has no EOS, then clipped and optionally whitened); per-token log-probs
   of the policy (with the entropy, one ``rlhf_kernels.linear_token_logprobs`` pass on the hidden
   states: the LM head never makes the logits) and of the frozen
   reference; per-token values of the critic.
3. :meth:`~PPOTrainer.advantages`: rewards r_t = -kl_coef * KL_t (``rlhf_kernels.kl_penalty``, k1 by
   default) plus the score at the last token (or, with ``kl_in_reward=False``, the score alone and a
   k3 KL term in the loss, GRPO style); ``rlhf_kernels.gae``, whitened over the global batch.
4. :meth:`~PPOTrainer.learn`: ``ppo_epochs`` passes over shuffled minibatches of ``ppo_policy_loss``
   (clip, asymmetric clip, dual clip, aggregation) + ``vf_coef * ppo_value_loss`` (value clipping).
5. :meth:`~PPOTrainer.metrics`: TRL/verl names (objective/kl, objective/entropy, objective/scores,
   policy/approxkl, policy/clipfrac, loss/policy, loss/value, val/clipfrac, response_length/mean,
   timing/generation|scoring|training), averaged over processes; then the KL controller adapts
   ``kl_coef`` (:mod:`rlhf.kl_control`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

import rlhf_kernels as rk

from .actor_critic import ActorCritic
from .distributed import DistInfo, all_reduce_sum, masked_whiten_global, wrap_ddp
from .kl_control import make_kl_controller
from .models import ScalarHead, policy_logprobs
from .precision import Precision, optimizer_step
from .rollout import Rollout, sample_rollout
from .trainer_utils import build_optimizer, build_scheduler, clip_grad_norm

if TYPE_CHECKING:
    from .ppo import PPOHyperParams

ADAM_EPS = 1e-5
"""AdamW epsilon of PPO (the value of the PPO reference implementations; 1e-8 in SFT/DPO)."""


@dataclass
class Scored:
    """What :meth:`PPOTrainer.score` computes for a rollout (``[B, R]`` unless noted)."""

    old_logprobs: torch.Tensor
    """Log-probs of the response tokens under the policy that sampled them."""
    entropy: torch.Tensor
    """Exact per-token entropy of the sampling distribution (0 where masked)."""
    ref_logprobs: torch.Tensor
    """Log-probs under the frozen reference."""
    values: torch.Tensor
    """The critic's values (0 where masked)."""
    raw_scores: torch.Tensor
    """``[B]`` reward-model (or reward function) scores as given."""
    scores: torch.Tensor
    """``[B]`` scores after the missing-EOS penalty, clipping and whitening."""


@dataclass
class Advantages:
    """What :meth:`PPOTrainer.advantages` computes (``[B, R]``)."""

    kl: torch.Tensor
    """Per-token KL estimate (``kl_estimator``) between policy and reference, 0 where masked."""
    advantages: torch.Tensor
    returns: torch.Tensor
    kl_coef: float
    """The KL coefficient of this step."""


class PPOTrainer:
    """Holds the four models, the optimizer and the KL controller; :meth:`step` runs one PPO step.

    Args:
        policy: the causal LM being trained (its initial weights are the SFT model).
        ref_policy: the frozen reference (the SFT model).
        reward_model: a one-label sequence-classification model (frozen), or None with ``reward_fn``.
        value_model: a one-label sequence-classification model trained as the critic, or None with
            ``hp.value_model == "policy_head"``.
        hp: :class:`rlhf.ppo.PPOHyperParams` (or a :class:`rlhf.ppo.PPOConfig`).
        eos_id, pad_id: token ids.
        total_steps: PPO steps of the run (the learning-rate schedule spans their optimizer steps).
        info: the DDP process group (:class:`rlhf.distributed.DistInfo`); None: one process.
        gold_fn: optional ``gold_fn(prompt_ids, response_ids) -> list[float]`` (lists of token ids), a
            programmatic gold score logged beside the proxy reward as ``objective/gold``.
        reward_fn: optional ``reward_fn(prompt_ids, response_ids) -> list[float]``, a rule-based reward
            used instead of the reward model.
        precision: :class:`rlhf.precision.Precision`: the autocast every forward pass (generation
            included) runs under, and fp16's loss scaling; default fp32.
        ref_policy may be :func:`rlhf.models.reference_of` a LoRA policy (its adapters disabled).
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
        precision: Precision | None = None,
    ):
        self.hp, self.eos_id, self.pad_id = hp, eos_id, pad_id
        self.precision = precision or Precision()
        self.scaler = self.precision.grad_scaler()
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
        self.optimizer = self._build_optimizer()
        updates = total_steps * hp.ppo_epochs * (hp.rollout_batch_size // hp.mini_batch_size)
        self.scheduler = build_scheduler(self.optimizer, hp, updates)
        self.kl_ctl = make_kl_controller(hp)

    def _build_optimizer(self) -> torch.optim.AdamW:
        """The shared AdamW (weight decay on matrices, ``adam_beta1/2``) over the policy at ``lr``,
        plus the critic's parameters at ``value_lr``; epsilon :data:`ADAM_EPS` everywhere."""
        hp = self.hp
        optimizer = build_optimizer(self.actor_critic.policy, hp)
        for group in build_optimizer(self.actor_critic.critic, hp).param_groups:
            optimizer.add_param_group({**group, "lr": hp.value_lr})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        for group in optimizer.param_groups:
            group["eps"] = ADAM_EPS
        return optimizer

    @property
    def policy(self):
        return self.actor_critic.policy

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    # ------------------------------------------------------------------------------ one step
    def step(self, prompts: list[list[int]]) -> dict[str, float]:
        """One PPO step on this process's share of the prompts (lists of token ids)."""
        timing = {}
        t0 = time.perf_counter()
        with self.precision.autocast():
            rollout = self.rollout(prompts)
        timing["timing/generation"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with self.precision.autocast():
            scored = self.score(prompts, rollout)
        timing["timing/scoring"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        adv = self.advantages(rollout, scored)
        stats = self.learn(rollout, scored, adv)
        timing["timing/training"] = time.perf_counter() - t0

        out = self.metrics(prompts, rollout, scored, adv, stats)
        out.update(timing)
        self.kl_ctl.update(out["objective/kl"], self.hp.rollout_batch_size)
        return out

    def rollout(self, prompts: list[list[int]]) -> Rollout:
        """Sample one response per prompt from the current policy."""
        hp = self.hp
        self.actor_critic.eval()
        return sample_rollout(self.policy, prompts, eos_id=self.eos_id, pad_id=self.pad_id,
                              max_new_tokens=hp.max_new_tokens, temperature=hp.temperature,
                              top_p=hp.top_p, device=self.device)

    @torch.no_grad()
    def score(self, prompts: list[list[int]], rollout: Rollout) -> Scored:
        """Rewards, log-probs of the policy (with entropy) and the reference, and values."""
        hp, backend, r = self.hp, self.hp.kernel_backend, rollout
        old_logprobs, entropy, values = self.actor_critic(r.input_ids, r.attention_mask, r.position_ids, r.labels,
                                                          hp.temperature, backend)
        ref_logprobs = policy_logprobs(self.ref_policy, r.input_ids, r.attention_mask, r.labels,
                                       hp.temperature, backend)
        if self.reward_fn is not None:
            raw_scores = torch.tensor(self.reward_fn(prompts, r.response_lists()), dtype=torch.float32,
                                      device=self.device)
        else:
            raw_scores = r.last_token_scores(self.reward_model(r.input_ids, r.attention_mask, r.position_ids))
        scores = raw_scores
        if hp.missing_eos_penalty is not None:
            scores = scores - hp.missing_eos_penalty * (~r.has_eos).float()
        if hp.reward_clip is not None:
            scores = scores.clamp(-hp.reward_clip, hp.reward_clip)
        if hp.whiten_rewards:
            scores = rk.masked_whiten(scores, torch.ones_like(scores, dtype=torch.bool), backend=backend)
        values = values.masked_fill(~r.response_mask, 0.0)
        return Scored(old_logprobs, entropy, ref_logprobs, values, raw_scores, scores)

    def advantages(self, rollout: Rollout, scored: Scored) -> Advantages:
        """Per-token rewards (KL penalty and the score at the last token), then GAE advantages."""
        hp, backend, mask = self.hp, self.hp.kernel_backend, rollout.response_mask
        kl_coef = self.kl_ctl.value
        kl = rk.kl_penalty(scored.old_logprobs, scored.ref_logprobs, estimator=hp.kl_estimator, backend=backend)
        kl = kl * mask
        rewards = -kl_coef * kl if hp.kl_in_reward else torch.zeros_like(scored.old_logprobs)
        rows = torch.arange(mask.shape[0], device=mask.device)
        rewards[rows, rollout.last] += scored.scores
        advantages, returns = rk.gae(rewards, scored.values, mask, gamma=hp.gamma, lam=hp.lam, backend=backend)
        if hp.whiten_advantages:
            # over the global batch: under DDP every rank whitens with the same statistics
            advantages = masked_whiten_global(advantages, mask, backend=backend)
        return Advantages(kl, advantages, returns, kl_coef)

    def learn(self, rollout: Rollout, scored: Scored, adv: Advantages) -> dict[str, list[float]]:
        """``ppo_epochs`` passes over shuffled minibatches; returns per-minibatch statistics."""
        hp, backend, r = self.hp, self.hp.kernel_backend, rollout
        self.actor_critic.train()
        B = r.responses.shape[0]
        labels = r.labels
        mb = hp.mini_batch_size // self.info.world_size
        stats = {k: [] for k in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "kl")}
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(B, device=self.device)
            for start in range(0, B, mb):
                idx = order[start:start + mb]
                m = r.response_mask[idx]
                with self.precision.autocast():
                    logprobs, new_entropy, new_values = self.model(r.input_ids[idx], r.attention_mask[idx],
                                                                   r.position_ids[idx], labels[idx],
                                                                   hp.temperature, backend)
                pg_loss, pg_stats = rk.ppo_policy_loss(
                    logprobs, scored.old_logprobs[idx], adv.advantages[idx], m, clip_low=hp.clip_low,
                    clip_high=hp.clip_high, dual_clip=hp.dual_clip, agg=hp.loss_agg, backend=backend)
                vf_loss, vf_stats = rk.ppo_value_loss(
                    new_values, scored.values[idx], adv.returns[idx], m, clip=hp.value_clip, agg=hp.loss_agg,
                    backend=backend)
                loss = pg_loss + hp.vf_coef * vf_loss
                if not hp.kl_in_reward:
                    kl_loss = rk.masked_mean(
                        rk.kl_penalty(logprobs, scored.ref_logprobs[idx], estimator="k3", backend=backend), m)
                    loss = loss + adv.kl_coef * kl_loss
                    stats["kl"].append(kl_loss.item())
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                optimizer_step(self.optimizer, self.scaler, lambda: clip_grad_norm(self.actor_critic, hp.max_grad_norm))
                self.scheduler.step()
                stats["approxkl"].append(pg_stats["approx_kl"].item())
                stats["clipfrac"].append(pg_stats["clipfrac"].item())
                stats["pg_loss"].append(pg_loss.item())
                stats["vf_loss"].append(vf_loss.item())
                stats["vf_clipfrac"].append(vf_stats["clipfrac"].item())
                stats["entropy"].append(rk.masked_mean(new_entropy.detach(), m).item())
        return stats

    def metrics(self, prompts: list[list[int]], rollout: Rollout, scored: Scored, adv: Advantages,
                stats: dict[str, list[float]]) -> dict[str, float]:
        """The step's metrics, averaged over processes (``lr`` and ``objective/kl_coef`` as they are)."""
        backend, mask, kl_coef = self.hp.kernel_backend, rollout.response_mask, adv.kl_coef
        seq_kl = (rk.kl_penalty(scored.old_logprobs, scored.ref_logprobs, estimator="k1", backend=backend)
                  * mask).sum(1)
        metrics = {
            "objective/kl": seq_kl.mean(),
            # exact per-token entropy of the sampling distribution, summed over the response
            "objective/entropy": (scored.entropy * mask).sum(1).mean(),
            "objective/scores": scored.raw_scores.mean(),
            "objective/non_score_reward": (-kl_coef * adv.kl.sum(1)).mean()
            if self.hp.kl_in_reward else torch.tensor(0.0),
            "objective/rlhf_reward": (scored.scores - kl_coef * seq_kl).mean(),
            "policy/approxkl": _mean(stats["approxkl"]),
            "policy/clipfrac": _mean(stats["clipfrac"]),
            "policy/entropy": _mean(stats["entropy"]),
            "loss/policy": _mean(stats["pg_loss"]),
            "loss/value": _mean(stats["vf_loss"]),
            "val/clipfrac": _mean(stats["vf_clipfrac"]),
            "val/mean": rk.masked_mean(scored.values, mask),
            "val/eos_fraction": rollout.has_eos.float().mean(),
            "response_length/mean": mask.sum(1).float().mean(),
        }
        if stats["kl"]:
            metrics["loss/kl"] = _mean(stats["kl"])
        if self.gold_fn is not None:
            metrics["objective/gold"] = _mean(self.gold_fn(prompts, rollout.response_lists()))
        names = list(metrics)
        summed = all_reduce_sum(torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64).cpu() for k in names]))
        out = {k: (summed[i] / self.info.world_size).item() for i, k in enumerate(names)}
        out["objective/kl_coef"] = kl_coef
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out


def _mean(xs) -> float:
    return float(sum(xs) / len(xs)) if len(xs) else 0.0
