"""The PPO policy and its critic behind one ``forward``, so that DDP syncs both in one backward.

The critic is a separate scalar-head model (a :class:`rlhf.models.ScalarHead`, in PPO initialised
from the reward model) or, without one, a linear value head on the policy's last hidden state.
Either may be a peft model (LoRA): ``save_pretrained`` then writes adapter folders.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from .models import ScalarHead, fused_response_logprobs


class ActorCritic(nn.Module):
    """``forward`` returns the policy's log-probs and entropies ``[B, R]`` of the response ``labels``
    ``[B, R]`` (the last R tokens), computed from its hidden states without calling the LM head (the
    ``[B, T, V]`` logits never exist: :func:`rlhf.models.fused_response_logprobs`), and the values
    ``[B, R]`` of the R positions that predict the response tokens (position t predicts token t + 1).
    Both heads run inside this one ``forward``, so DDP wrapping this module syncs both.
    ``save_pretrained`` writes the policy in Hugging Face format and the critic beside it
    (``value_model/`` or ``value_head.pt``).
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

    @property
    def critic(self) -> nn.Module:
        """The critic's trainable module: the value model, or the value head."""
        return self.value_head if self.value_head is not None else self.value_model

    def forward(self, input_ids, attention_mask, position_ids, labels, temperature: float = 1.0,
                backend: str = "auto"):
        R = labels.shape[1]
        out = fused_response_logprobs(self.policy, input_ids, attention_mask, position_ids, labels, temperature,
                                      backend, return_entropy=True, return_hidden=self.value_head is not None)
        window = slice(-R - 1, -1)
        if self.value_head is not None:
            hidden = out.last_hidden_state[:, window]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
            logprobs, entropy = out.logprobs, out.entropy
        else:
            logprobs, entropy = out
            values = self.value_model(input_ids, attention_mask, position_ids)[:, window]
        return logprobs, entropy, values

    def save_pretrained(self, path: str) -> None:
        self.policy.save_pretrained(path)
        if self.value_head is not None:
            torch.save(self.value_head.state_dict(), os.path.join(path, "value_head.pt"))
        else:
            self.value_model.model.save_pretrained(os.path.join(path, "value_model"))
