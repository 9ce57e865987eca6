"""The trainers' log-probs from whole logits with shifted labels equal the old sliced-logits computation,
values and gradients, and the logits are not sliced on the way to the kernel."""

import pytest
import torch

import rlhf_kernels as rk
from rlhf.actor_critic import ActorCritic
from rlhf.data import IGNORE_INDEX, collate_sft
from rlhf.models import policy_logprobs, response_logprobs, shift_labels, token_logprobs

transformers = pytest.importorskip("transformers")

BACKENDS = ["reference", "cpu"]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def _batch():
    ids = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]]
    labels = [[IGNORE_INDEX] * 3 + s[3:] for s in ids]  # prompt of 3 tokens, then the completion
    return collate_sft([{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)], 0)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_shift_labels():
    labels = torch.tensor([[7, 8, 9], [-100, 4, 5]])
    assert shift_labels(labels).tolist() == [[8, 9, -100], [4, 5, -100]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sft_dpo_logprobs_equal_the_sliced_computation(lm, backend, temperature):
    batch = _batch()
    new, new_h = token_logprobs(lm, batch, temperature, backend, return_entropy=True)
    g_new = _grads(lm, new.sum() + 0.3 * new_h.sum())
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False).logits
    old, old_h = rk.token_logprobs(logits[:, :-1], batch["labels"][:, 1:], temperature=temperature,
                                   return_entropy=True, backend=backend)
    g_old = _grads(lm, old.sum() + 0.3 * old_h.sum())
    assert new.shape == old.shape == (3, 7)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-5)
    torch.testing.assert_close(new_h, old_h, rtol=0, atol=1e-5)
    for a, b in zip(g_new, g_old):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_response_logprobs_equal_the_sliced_computation(lm, backend):
    torch.manual_seed(1)
    B, P, R = 4, 5, 6
    input_ids = torch.randint(3, 50, (B, P + R))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # a left-padded prompt
    attention_mask[1, -2:] = 0  # a response that ended early
    labels = input_ids[:, P:].masked_fill(attention_mask[:, P:] == 0, IGNORE_INDEX)
    ac = ActorCritic(lm)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    fused, fused_h, values = ac(input_ids, attention_mask, position_ids, labels, 0.9, backend)
    assert fused.shape == fused_h.shape == values.shape == (B, R)
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    new, new_h = response_logprobs(logits, labels, 0.9, backend, return_entropy=True)
    # the actor-critic's fused log-probs (no logits) equal the whole-logits path, values and gradients
    torch.testing.assert_close(fused, new, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_h, new_h, rtol=1e-5, atol=1e-5)
    g_fused = _grads(lm, (fused * 1.5 + fused_h).sum())
    g_whole = _grads(lm, (new * 1.5 + new_h).sum())
    for a, b in zip(g_fused, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    new, new_h = response_logprobs(logits, labels, 0.9, backend, return_entropy=True)
    old, old_h = rk.token_logprobs(logits[:, -R - 1:-1], labels, temperature=0.9, return_entropy=True,
                                   backend=backend)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    torch.testing.assert_close(new_h, old_h, rtol=0, atol=1e-6)
    g_new = torch.autograd.grad((new * 1.5 + new_h).sum(), logits, retain_graph=True)[0]
    g_old = torch.autograd.grad((old * 1.5 + old_h).sum(), logits)[0]
    torch.testing.assert_close(g_new, g_old, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(policy_logprobs(lm, input_ids, attention_mask, labels, 0.9, backend), new.detach(),
                               rtol=0, atol=1e-5)


def _vocab_slices(out: torch.Tensor, vocab: int) -> list[str]:
    """Autograd nodes behind ``out`` that slice a tensor whose last dimension is the vocabulary: their
    backward allocates a zero-filled gradient of the whole tensor and copies into it."""
    seen, todo, found = set(), [out.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        sizes = getattr(fn, "_saved_self_sym_sizes", None)
        if fn.name().startswith("SliceBackward") and sizes and int(sizes[-1]) == vocab:
            found.append(fn.name())
        todo.extend(n for n, _ in fn.next_functions)
    return found


def test_no_slice_of_the_logits_in_the_graph(lm):
    batch = _batch()
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False).logits
    sliced = rk.token_logprobs(logits[:, :-1], batch["labels"][:, 1:], backend="reference")
    assert _vocab_slices(sliced, 50)  # the old path slices the logits (the check sees it) ...
    assert not _vocab_slices(token_logprobs(lm, batch, backend="reference"), 50)  # ... the trainers' does not
    R = 3
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False).logits
    assert not _vocab_slices(response_logprobs(logits, batch["input_ids"][:, -R:], backend="reference"), 50)
