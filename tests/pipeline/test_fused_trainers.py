"""No training or evaluation forward of the trainers calls the LM head: SFT's NLL, DPO's sequence
log-probs, PPO's actor-critic (policy log-probs, entropy and values), the reference policy and the
evaluation KL all take log-probs from the hidden states (rlhf_kernels.linear_token_logprobs)."""

import pytest
import torch

from rlhf.actor_critic import ActorCritic
from rlhf.data import IGNORE_INDEX, collate_sft
from rlhf.models import policy_logprobs, sequence_logprobs, token_logprobs

transformers = pytest.importorskip("transformers")


@pytest.fixture
def lm():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


class _Calls:
    def __init__(self, model):
        self.n = 0
        self.handle = model.get_output_embeddings().register_forward_hook(self)

    def __call__(self, *_):
        self.n += 1


def _batch():
    ids = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]]
    labels = [[IGNORE_INDEX] * 3 + s[3:] for s in ids]
    return collate_sft([{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)], 0)


def test_the_hook_sees_the_logits_path(lm):
    calls = _Calls(lm)
    batch = _batch()
    lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert calls.n == 1


@pytest.mark.parametrize("value_model", [False, True])
def test_sft_dpo_ppo_steps_never_call_the_lm_head(lm, value_model):
    calls = _Calls(lm)
    batch = _batch()
    opt = torch.optim.SGD(lm.parameters(), lr=1e-3)
    # SFT step: NLL = minus the mean log-prob of the completion tokens
    lp = token_logprobs(lm, batch)
    (-lp.sum() / (batch["labels"][:, 1:] != IGNORE_INDEX).sum()).backward()
    opt.step()
    # DPO: summed sequence log-probs of the policy and of a frozen reference
    seq = sequence_logprobs(lm, batch)
    with torch.no_grad():
        ref = sequence_logprobs(lm, batch)
    (-(seq - ref).sum()).backward()
    # PPO learning step and scoring: actor-critic forward, reference / evaluation log-probs
    critic = None
    if value_model:
        torch.manual_seed(1)
        critic = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, num_labels=1, pad_token_id=0))
    ac = ActorCritic(lm, critic)
    R = 3
    labels = batch["input_ids"][:, -R:]
    logprobs, entropy, values = ac(batch["input_ids"], batch["attention_mask"], batch["position_ids"], labels)
    (logprobs.sum() + entropy.sum() + values.sum()).backward()
    assert all(p.grad is not None for p in ac.critic.parameters())
    policy_logprobs(lm, batch["input_ids"], batch["attention_mask"], labels)
    assert calls.n == 0
