"""Evaluate a policy the way the pipeline report does: gold score, proxy reward, reward-function
scores, KL to SFT, length.

Responses are sampled with the pipeline's one sampler (:mod:`rlhf.generation`) at temperature 1 (the
distribution PPO optimises), so the mean over samples of sum_t (log pi(y_t) - log pi_sft(y_t)) is an
unbiased estimate of KL(pi || pi_sft) per sequence.
"""

from __future__ import annotations

import math

import torch

import rlhf_kernels as rk

from .data import tokenize_prompts
from .models import ScalarHead, policy_logprobs
from .reward_functions import score_completions
from .rollout import sample_rollout


@torch.no_grad()
def evaluate_policy(
    policy,
    sft_policy,
    reward_model,
    tokenizer,
    prompts: list,
    *,
    gold_fn=None,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    seed: int = 1234,
    backend: str = "auto",
    reward_fns: list | None = None,
    records: list[dict] | None = None,
) -> dict[str, float]:
    """Mean gold score (when ``gold_fn(prompt, response)`` is given), proxy reward (when
    ``reward_model`` is given), reward-function scores (when ``reward_fns`` ``[(name, fn)]`` and the
    prompts' dataset ``records`` are given: ``rewards/<name>`` each, ``reward`` their sum, as GRPO
    trains on), KL to SFT (when ``sft_policy`` is given: GRPO with ``beta=0`` loads no reference),
    response length.

    ``prompts`` are strings or chat message lists, encoded as ``rlhf ppo`` encodes its prompts.

    The sampling RNG is forked so that evaluating does not change the caller's random stream.
    """
    score_head = ScalarHead(reward_model) if reward_model is not None else None
    device = next(policy.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_id
    was_training = policy.training
    policy.eval()
    if reward_fns and (records is None or len(records) != len(prompts)):
        raise ValueError("reward_fns need the dataset records of the prompts (one per prompt)")
    gold, proxy, kl, length = [], [], [], []
    fn_scores: dict[str, list[float]] = {name: [] for name, _ in reward_fns or []}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            texts = prompts[start : start + batch_size]
            ids = [
                e["prompt_ids"] for e in tokenize_prompts([{"prompt": t} for t in texts], tokenizer, 10**9)
            ]
            r = sample_rollout(policy, ids, eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
                               device=device)
            if sft_policy is not None:
                logp = policy_logprobs(policy, r.input_ids, r.attention_mask, r.labels, 1.0, backend)
                sft_logp = policy_logprobs(sft_policy, r.input_ids, r.attention_mask, r.labels, 1.0, backend)
                kl += (
                    (rk.kl_penalty(logp, sft_logp, estimator="k1", backend=backend) * r.response_mask)
                    .sum(1)
                    .tolist()
                )
            if score_head is not None:
                proxy += r.last_token_scores(score_head(r.input_ids, r.attention_mask, r.position_ids)).tolist()
            length += r.response_mask.sum(1).tolist()
            if reward_fns:
                scores = score_completions(reward_fns, records[start : start + batch_size], r.response_lists(),
                                           tokenizer)
                for name, values in scores.items():
                    fn_scores[name] += values
            if gold_fn is not None:
                for text, response in zip(texts, r.response_lists()):
                    gold.append(gold_fn(text, tokenizer.decode(response, skip_special_tokens=True)))
    policy.train(was_training)
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")
    out = {}
    if score_head is not None:
        out["proxy"] = mean(proxy)
    if sft_policy is not None:
        out["kl_to_sft"] = mean(kl)
    out["response_length"] = mean(length)
    if gold_fn is not None:
        out["gold"] = mean(gold)
    if fn_scores:
        nanmean = lambda xs: mean([x for x in xs if not math.isnan(x)])
        for name, values in fn_scores.items():
            out[f"rewards/{name}"] = nanmean(values)
        # per completion, the sum of what could score it (NaN only when nothing could), as in training
        sums = [math.fsum(v for v in vs if not math.isnan(v)) if not all(map(math.isnan, vs)) else float("nan")
                for vs in zip(*fn_scores.values())]
        out["reward"] = nanmean(sums)
    return out
