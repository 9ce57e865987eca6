"""One GRPO step (Shao et al., 2024, DeepSeekMath), as TRL's ``GRPOTrainer`` defines it, on rlhf_kernels.

:meth:`GRPOTrainer.step` runs, in order:

1. :meth:`~GRPOTrainer.rollout`: ``num_generations`` (G) completions per prompt, sampled with the
   pipeline's one sampler (:mod:`rlhf.rollout`); the G completions of a prompt are consecutive rows
   (a *group*), and a group never spans processes.
2. :meth:`~GRPOTrainer.score`: one reward per completion, the sum over the reward sources (a reward
   model's scalar head at the last completion token; reward functions on the decoded text, see
   :mod:`rlhf.reward_functions`); the policy's log-probs at sampling time (only when they can
   differ from the learning pass's: ``num_iterations > 1`` or several minibatches) and the frozen
   reference's (only when ``beta > 0``), both fused (``rlhf_kernels.linear_token_logprobs``).
3. :func:`group_advantages`: the reward minus its group's mean, divided by the group's std
   (``scale_rewards="group"``), by the whole batch's std (``"batch"``) or not at all (``"none"``,
   Dr. GRPO), std + 1e-4 as TRL; one advantage per completion, the same for all its tokens.
4. :meth:`~GRPOTrainer.learn`: ``num_iterations`` passes over shuffled minibatches of
   :func:`grpo_loss`: ``rlhf_kernels.ppo_policy_loss`` with the asymmetric clip
   ``[1 - epsilon, 1 + epsilon_high]`` plus ``beta`` times the k3 KL to the reference
   (``rlhf_kernels.kl_penalty``), aggregated as ``loss_type`` says.
5. :meth:`~GRPOTrainer.metrics`: TRL's names (``reward``, ``reward_std``, ``rewards/<source>/mean``,
   ``frac_reward_zero_std``, ``kl``, ``entropy``, ``clip_ratio/low_mean|high_mean|region_mean``,
   ``completions/mean_length|clipped_ratio``), averaged over processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

import rlhf_kernels as rk

from .distributed import DistInfo, all_gather_cat, all_reduce_sum, wrap_ddp
from .models import ScalarHead, fused_response_logprobs
from .precision import Precision, optimizer_step
from .reward_functions import score_completions
from .rollout import Rollout, sample_rollout
from .trainer_utils import build_optimizer, build_scheduler, clip_grad_norm

if TYPE_CHECKING:
    from .grpo import GRPOHyperParams

LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
"""TRL's ``loss_type`` values built here (TRL's default first)."""
SCALE_REWARDS = ("group", "batch", "none")
"""TRL's ``scale_rewards`` values."""
KERNEL_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum",
              "dapo": "seq-mean-token-sum"}
"""The ``rlhf_kernels.ppo_policy_loss`` aggregation each loss type starts from (see :func:`grpo_loss`)."""
STD_EPS = 1e-4
"""Added to the std before dividing (TRL's constant)."""


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample std (Bessel-corrected) over the non-NaN entries; NaN where fewer than two."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    valid = ~torch.isnan(x)
    count = valid.sum(dim)
    mean = torch.nanmean(x, dim, keepdim=True)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(dim)
    var = sq / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     batch_rewards: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages of ``rewards`` ``[N]`` whose consecutive runs of ``num_generations`` are the
    completions of one prompt.  Returns ``(advantages [N], std [N])``::

        A_i = r_i - mean(group of i)                         scale_rewards="none"  (Dr. GRPO)
        A_i = (r_i - mean(group of i)) / (std(group of i) + 1e-4)    "group" (GRPO, TRL's default)
        A_i = (r_i - mean(group of i)) / (std(batch) + 1e-4)         "batch"

    std is the sample std (Bessel's correction, as TRL); ``std`` is returned for logging (the group's,
    or the batch's).  NaN rewards (a completion nothing could score) are left out of the means and
    stds and get advantage 0.  ``batch_rewards`` (default ``rewards``): the rewards the ``"batch"``
    std is taken over (every process's, under DDP)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}; got {scale_rewards!r}")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be [N] with N a multiple of num_generations ({num_generations}), "
                         f"got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, 1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        pool = rewards if batch_rewards is None else batch_rewards.float()
        std = nanstd(pool).expand_as(rewards)
    else:
        std = nanstd(grouped, 1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), std


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """``values`` ``[B, T]`` reduced over ``mask`` as ``rlhf_kernels.ppo_policy_loss``'s ``agg`` does."""
    m = mask.to(values.dtype)
    masked = values * m
    if agg == "token-mean":
        return masked.sum() / m.sum().clamp(min=1)
    if agg == "seq-mean-token-sum":
        return masked.sum() / values.shape[0]
    if agg == "seq-mean-token-mean":
        n = m.sum(1)
        has = n > 0
        per_seq = masked.sum(1) / n.clamp(min=1)
        return (per_seq * has).sum() / has.sum().clamp(min=1)
    raise ValueError(f"unknown aggregation {agg!r}")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              *, loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None,
              beta: float = 0.0, ref_logprobs: torch.Tensor | None = None, max_completion_length: int = 1,
              dapo_normalizer: float | torch.Tensor | None = None, backend: str = "auto"):
    """The GRPO loss of one minibatch, as TRL 1.16 defines it for its ``loss_type``.

    Per token (``rlhf_kernels.ppo_policy_loss`` and ``kl_penalty``)::

        ratio = exp(logprobs - old_logprobs)
        l_t   = -min(ratio * A, clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3_t
        k3_t  = exp(ref - logprobs) - (ref - logprobs) - 1

    then over the completion tokens (``mask``) of the B sequences:

    - ``grpo``: mean over sequences of each sequence's token mean (length-biased);
    - ``bnpo``: sum / number of tokens of this minibatch;
    - ``dr_grpo``: sum / (B * ``max_completion_length``) (Dr. GRPO: a constant normaliser);
    - ``dapo``: sum / ``dapo_normalizer``, the tokens of the whole generation batch (every process)
      divided by the number of its minibatches and by the number of processes, so every token of a
      generation batch weighs the same (default: this minibatch's tokens, i.e. bnpo).

    ``advantages`` is ``[B]`` (one per completion) or ``[B, T]``.  Returns ``(loss, stats)`` with the
    detached floats ``policy_loss``, ``kl`` (token mean of k3; 0 with ``beta == 0``), ``clip_low``,
    ``clip_high``, ``clip_region`` (fractions of tokens whose ratio is clipped below with A < 0,
    above with A > 0, either).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages[:, None].expand_as(logprobs).contiguous() if advantages.dim() == 1 else advantages
    agg = KERNEL_AGG[loss_type]
    B = logprobs.shape[0]
    if loss_type == "dr_grpo":
        scale = 1.0 / max_completion_length
    elif loss_type == "dapo":
        normalizer = mask.sum() if dapo_normalizer is None else dapo_normalizer
        scale = B / torch.as_tensor(normalizer, dtype=torch.float32, device=logprobs.device).clamp(min=1.0)
    else:
        scale = 1.0
    pg, _ = rk.ppo_policy_loss(logprobs, old_logprobs, adv, mask, clip_low=epsilon, clip_high=epsilon_high,
                               agg=agg, backend=backend)
    loss = pg * scale
    m = mask.bool()
    n_tokens = m.sum().clamp(min=1)
    kl_mean = torch.zeros((), device=logprobs.device)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        kl = rk.kl_penalty(logprobs, ref_logprobs, estimator="k3", backend=backend)
        loss = loss + beta * aggregate(kl, m, agg) * scale
        kl_mean = (kl.detach() * m).sum() / n_tokens
    with torch.no_grad():
        ratio = torch.exp(logprobs.detach() - old_logprobs)
        low = (ratio < 1 - epsilon) & (adv < 0) & m
        high = (ratio > 1 + epsilon_high) & (adv > 0) & m
        stats = {
            "policy_loss": (pg * scale).detach(),
            "kl": kl_mean,
            "clip_low": low.sum() / n_tokens,
            "clip_high": high.sum() / n_tokens,
            "clip_region": (low | high).sum() / n_tokens,
        }
    return loss, stats


class GRPOTrainer:
    """Holds the policy, the optional reference and reward model, the optimizer; :meth:`step` runs one
    GRPO step on this process's share of a generation batch.

    Args:
        policy: the causal LM being trained.
        ref_policy: the frozen reference (needed when ``hp.beta > 0``; None otherwise).
        reward_model: a one-label sequence-classification model (frozen), or None.
        reward_fns: ``[(name, fn)]`` reward functions (:mod:`rlhf.reward_functions` convention).
        hp: :class:`rlhf.grpo.GRPOHyperParams` (or a :class:`rlhf.grpo.GRPOConfig`).
        tokenizer: decodes completions for the reward functions (and ``gold_fn``).
        total_steps: GRPO steps of the run (the schedule spans their optimizer steps).
        gold_fn: optional ``gold_fn(prompt_text, response_text) -> float``, logged as ``objective/gold``.
    """

    def __init__(self, policy, ref_policy, reward_model, reward_fns: list[tuple[str, Callable]], hp: GRPOHyperParams,
                 *, tokenizer, total_steps: int, info: DistInfo | None = None, gold_fn=None,
                 precision: Precision | None = None):
        self.hp, self.tokenizer = hp, tokenizer
        # every forward pass (sampling, scoring, learning) under the run's autocast; fp16 scales the loss
        self.precision = precision or Precision()
        self.scaler = self.precision.grad_scaler()
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.info = info or DistInfo()
        self.gold_fn = gold_fn
        if reward_model is None and not reward_fns:
            raise ValueError("give a reward model, reward functions, or both")
        if hp.beta != 0.0 and ref_policy is None:
            raise ValueError("beta != 0 needs the reference policy")
        world = self.info.world_size
        if hp.prompts_per_step % world or self.mini_batch_size % world:
            raise ValueError(f"the prompts per step ({hp.prompts_per_step}) and the minibatch "
                             f"({self.mini_batch_size}) must be multiples of the number of processes ({world})")
        self.policy = policy
        self.ref_policy = None if ref_policy is None else ref_policy.eval().requires_grad_(False)
        self.reward_model = None
        if reward_model is not None:
            self.reward_model = ScalarHead(reward_model.eval().requires_grad_(False))
        self.reward_fns = list(reward_fns)
        self.model = wrap_ddp(policy, self.info)
        self.optimizer = build_optimizer(policy, hp)
        self.scheduler = build_scheduler(self.optimizer, hp, total_steps * hp.num_iterations * self.minibatches)

    @property
    def mini_batch_size(self) -> int:
        return self.hp.mini_batch_size or self.hp.generation_batch_size

    @property
    def minibatches(self) -> int:
        """Optimizer steps per pass over a generation batch."""
        return self.hp.generation_batch_size // self.mini_batch_size

    @property
    def needs_old_logprobs(self) -> bool:
        """Whether the sampling policy can differ from the learning pass's (TRL computes the old
        log-probs only then; otherwise old = detached current, a ratio of exactly 1)."""
        return self.hp.num_iterations > 1 or self.minibatches > 1

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    # ------------------------------------------------------------------------------ one step
    def step(self, prompts: list[list[int]], records: list[dict]) -> dict[str, float]:
        """One GRPO step on this process's prompts (token id lists) and their dataset records."""
        timing = {}
        t0 = time.perf_counter()
        with self.precision.autocast():
            rollout = self.rollout(prompts)
        timing["timing/generation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with self.precision.autocast():
            scored = self.score(records, rollout)
        timing["timing/scoring"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = self.learn(rollout, scored)
        timing["timing/training"] = time.perf_counter() - t0
        out = self.metrics(records, rollout, scored, stats)
        out.update(timing)
        return out

    def rollout(self, prompts: list[list[int]]) -> Rollout:
        """``num_generations`` completions per prompt, each prompt's group on consecutive rows."""
        hp = self.hp
        repeated = [p for p in prompts for _ in range(hp.num_generations)]
        return sample_rollout(self.policy, repeated, eos_id=self.eos_id, pad_id=self.pad_id,
                              max_new_tokens=hp.max_completion_length, temperature=hp.temperature,
                              top_p=hp.top_p, device=self.device)

    def _logprobs(self, model, r: Rollout) -> torch.Tensor:
        return fused_response_logprobs(model, r.input_ids, r.attention_mask, r.position_ids, r.labels,
                                       self.hp.temperature, self.hp.kernel_backend)

    @torch.no_grad()
    def score(self, records: list[dict], r: Rollout) -> dict:
        """Rewards per source and summed, advantages, and the old / reference log-probs needed."""
        hp, G = self.hp, self.hp.num_generations
        out = {"old_logprobs": None, "ref_logprobs": None}
        was_training = self.policy.training
        self.policy.eval()
        if self.needs_old_logprobs:
            out["old_logprobs"] = self._logprobs(self.policy, r)
        self.policy.train(was_training)
        if self.ref_policy is not None and hp.beta != 0.0:
            out["ref_logprobs"] = self._logprobs(self.ref_policy, r)
        per_source = {}
        if self.reward_model is not None:
            per_source["reward_model"] = r.last_token_scores(
                self.reward_model(r.input_ids, r.attention_mask, r.position_ids))
        if self.reward_fns:
            scores = score_completions(self.reward_fns, records, r.response_lists(), self.tokenizer, repeat=G)
            for name, values in scores.items():
                per_source[name] = torch.tensor(values, dtype=torch.float32, device=self.device)
        stacked = torch.stack(list(per_source.values()), 1)
        rewards = torch.where(torch.isnan(stacked).all(1), float("nan"), stacked.nansum(1))
        batch_rewards = None
        if hp.scale_rewards == "batch" and self.info.world_size > 1:
            batch_rewards = all_gather_cat(rewards, [rewards.numel()] * self.info.world_size)
        advantages, std = group_advantages(rewards, G, hp.scale_rewards, batch_rewards)
        out.update(per_source=per_source, rewards=rewards, advantages=advantages, std=std)
        return out

    def learn(self, r: Rollout, scored: dict) -> dict[str, list[float]]:
        """``num_iterations`` passes over shuffled minibatches, one optimizer step each."""
        hp, backend = self.hp, self.hp.kernel_backend
        self.policy.train()
        B = r.responses.shape[0]
        mb = self.mini_batch_size // self.info.world_size
        mask = r.response_mask
        # dapo: every token of the generation batch (all processes) weighs the same in every minibatch
        total_tokens = all_reduce_sum(mask.sum().float())
        dapo_normalizer = total_tokens / self.minibatches / self.info.world_size
        stats = {k: [] for k in ("loss", "kl", "entropy", "clip_low", "clip_high", "clip_region", "grad_norm")}
        for _ in range(hp.num_iterations):
            order = torch.randperm(B, device=self.device) if self.minibatches > 1 else torch.arange(B, device=self.device)
            for start in range(0, B, mb):
                idx = order[start:start + mb]
                m = mask[idx]
                with self.precision.autocast():
                    logprobs, entropy = fused_response_logprobs(
                        self.model, r.input_ids[idx], r.attention_mask[idx], r.position_ids[idx], r.labels[idx],
                        hp.temperature, backend, return_entropy=True)
                old = logprobs.detach() if scored["old_logprobs"] is None else scored["old_logprobs"][idx]
                ref = None if scored["ref_logprobs"] is None else scored["ref_logprobs"][idx]
                loss, st = grpo_loss(logprobs, old, scored["advantages"][idx], m, loss_type=hp.loss_type,
                                     epsilon=hp.epsilon, epsilon_high=hp.epsilon_high, beta=hp.beta,
                                     ref_logprobs=ref, max_completion_length=hp.max_completion_length,
                                     dapo_normalizer=dapo_normalizer, backend=backend)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                grad_norm = optimizer_step(self.optimizer, self.scaler,
                                           lambda: clip_grad_norm(self.policy, hp.max_grad_norm))
                self.scheduler.step()
                stats["loss"].append(loss.item())
                stats["grad_norm"].append(float(grad_norm))
                stats["entropy"].append(rk.masked_mean(entropy.detach(), m).item())
                for k in ("kl", "clip_low", "clip_high", "clip_region"):
                    stats[k].append(float(st[k]))
        return stats

    def metrics(self, records: list[dict], r: Rollout, scored: dict, stats: dict[str, list[float]]) -> dict:
        """The step's metrics in TRL's names, averaged over processes (``lr`` as it is)."""
        rewards, mask = scored["rewards"], r.response_mask
        lengths = mask.sum(1).float()
        valid = ~torch.isnan(rewards)
        metrics = {
            "reward": torch.nanmean(rewards) if valid.any() else torch.tensor(0.0),
            "reward_std": torch.nan_to_num(nanstd(rewards), nan=0.0),
            "frac_reward_zero_std": torch.isclose(torch.nan_to_num(scored["std"], nan=0.0),
                                                  torch.zeros(())).float().mean(),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": (~r.has_eos).float().mean(),
            "loss": _mean(stats["loss"]),
            "grad_norm": _mean(stats["grad_norm"]),
            "entropy": _mean(stats["entropy"]),
            "clip_ratio/low_mean": _mean(stats["clip_low"]),
            "clip_ratio/high_mean": _mean(stats["clip_high"]),
            "clip_ratio/region_mean": _mean(stats["clip_region"]),
        }
        for name, values in scored["per_source"].items():
            metrics[f"rewards/{name}/mean"] = torch.nanmean(values) if (~torch.isnan(values)).any() else 0.0
        if self.hp.beta != 0.0:
            metrics["kl"] = _mean(stats["kl"])
        if self.gold_fn is not None:
            G = self.hp.num_generations
            texts = [self.tokenizer.decode(x, skip_special_tokens=True) for x in r.response_lists()]
            prompts = [rec["prompt"] for rec in records for _ in range(G)]
            metrics["objective/gold"] = _mean([self.gold_fn(p, t) for p, t in zip(prompts, texts)])
        names = list(metrics)
        summed = all_reduce_sum(torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64).cpu() for k in names]))
        out = {k: (summed[i] / self.info.world_size).item() for i, k in enumerate(names)}
        out["completions/min_length"] = lengths.min().item()
        out["completions/max_length"] = lengths.max().item()
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out


def _mean(xs) -> float:
    return float(sum(xs) / len(xs)) if len(xs) else 0.0
