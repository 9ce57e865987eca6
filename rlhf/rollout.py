"""Rollouts: responses sampled for a batch of prompts, laid out as the tensors PPO and evaluation use.

A :class:`Rollout` holds the left-padded prompts followed by the responses (``[B, P + R]``), the
response mask (up to and including the first EOS), the labels of the response (-100 where masked)
and the index of each row's last response token, where the reward model's score is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import position_ids_from_mask
from .generation import generate_responses, left_pad


@dataclass
class Rollout:
    input_ids: torch.Tensor
    """``[B, P + R]`` left-padded prompt, then the response (padding after its end)."""
    attention_mask: torch.Tensor
    """``[B, P + R]`` 1 on prompt and response tokens."""
    position_ids: torch.Tensor
    """``[B, P + R]`` positions counting real tokens only."""
    responses: torch.Tensor
    """``[B, R]`` response token ids (pad after the first EOS)."""
    response_mask: torch.Tensor
    """``[B, R]`` bool: the response's tokens, up to and including its first EOS."""
    has_eos: torch.Tensor
    """``[B]`` bool: the response ended with EOS (else it ran to the token limit)."""

    @property
    def labels(self) -> torch.Tensor:
        """``[B, R]`` the response tokens, -100 where masked."""
        return self.responses.masked_fill(~self.response_mask, -100)

    @property
    def last(self) -> torch.Tensor:
        """``[B]`` index of each row's last response token (in ``[0, R)``)."""
        return self.response_mask.sum(1) - 1

    @property
    def response_length(self) -> int:
        return self.responses.shape[1]

    def response_lists(self) -> list[list[int]]:
        """Each row's response token ids (up to and including EOS) as a list."""
        return [r[m].tolist() for r, m in zip(self.responses, self.response_mask)]

    def last_token_scores(self, token_scores: torch.Tensor) -> torch.Tensor:
        """``[B]``: per-position scores ``[B, P + R]`` read at each row's last response token."""
        rows = torch.arange(token_scores.shape[0], device=token_scores.device)
        return token_scores[:, -self.response_length:][rows, self.last]


def sample_rollout(policy, prompts: list[list[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, device=None) -> Rollout:
    """Sample one response per prompt (token id lists) with :func:`rlhf.generation.generate_responses`."""
    device = device or next(policy.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    responses, response_mask, has_eos = generate_responses(
        policy, prompt_ids, prompt_mask, eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p)
    input_ids = torch.cat([prompt_ids, responses], 1)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], 1)
    return Rollout(input_ids, attention_mask, position_ids_from_mask(attention_mask), responses,
                   response_mask, has_eos)
