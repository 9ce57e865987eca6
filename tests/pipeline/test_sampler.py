"""The pipeline's one sampler (rlhf.generation): what it keeps, that it samples what transformers'
``generate`` samples for the same seed, and its token-list form."""

import pytest
import torch

from rlhf.generation import filter_logits, generate, generate_responses, left_pad

transformers = pytest.importorskip("transformers")

VOCAB, PAD, BOS, EOS = 24, 0, 1, 2


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the random model so that EOS comes up now and then
        model.lm_head.weight.mul_(8)
    return model


PROMPTS = [[BOS, 5, 6, 7], [BOS, 9], [BOS, 3, 4], [BOS, 11, 12, 13, 14, 15]] * 4


def test_filter_logits_matches_the_definitions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 12, generator=g, dtype=torch.float64)
    for top_p in (0.05, 0.3, 0.7, 0.95):
        kept = filter_logits(logits, top_p=top_p).isfinite()
        probs = logits.softmax(-1)
        for row, keep in zip(probs, kept):
            order = row.argsort(descending=True)
            mass = row[order].cumsum(0)
            n = int((mass < top_p).sum()) + 1  # smallest prefix whose mass reaches top_p
            assert set(order[:n].tolist()) == set(keep.nonzero().flatten().tolist())
    for k in (1, 5, 12, 50):
        kept = filter_logits(logits, top_k=k).isfinite()
        assert (kept.sum(-1) == min(k, 12)).all()
        assert (logits.masked_fill(~kept, float("inf")).min(-1).values
                >= logits.masked_fill(kept, float("-inf")).max(-1).values).all()
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=-1)


@pytest.mark.parametrize("kw", [{}, {"top_p": 0.8}, {"temperature": 0.7, "top_k": 5}], ids=str)
def test_samples_what_transformers_generate_samples(lm, kw):
    """Same global seed, same tokens: PPO's rollouts did not change when the sampler was merged."""
    ids, mask = left_pad(PROMPTS, PAD, "cpu")
    torch.manual_seed(3)
    responses, resp_mask, has_eos = generate_responses(lm, ids, mask, eos_id=EOS, pad_id=PAD, max_new_tokens=10,
                                                       **kw)
    torch.manual_seed(3)
    hf = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD,
                     do_sample=True, **{"temperature": 1.0, "top_p": 1.0, "top_k": 0, **kw})[:, ids.shape[1]:]
    assert has_eos.any() and not has_eos.all()  # both endings are exercised
    assert responses.shape == hf.shape
    assert torch.equal(responses, hf.masked_fill(~resp_mask, PAD))


def test_greedy_and_the_token_list_form(lm):
    ids, mask = left_pad(PROMPTS[:4], PAD, "cpu")
    responses, resp_mask, _ = generate_responses(lm, ids, mask, eos_id=EOS, pad_id=PAD, max_new_tokens=6,
                                                 do_sample=False)
    hf = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD,
                     do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(responses, hf.masked_fill(~resp_mask, PAD))
    as_lists = generate(lm, PROMPTS[:4], eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=6, temperature=0)
    assert as_lists == [r[m].tolist() for r, m in zip(responses, resp_mask)]
    # a generator makes sampling reproducible without touching the global stream
    state = torch.random.get_rng_state()
    a = generate(lm, PROMPTS, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=6,
                 generator=torch.Generator().manual_seed(5))
    b = generate(lm, PROMPTS, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=6,
                 generator=torch.Generator().manual_seed(5))
    assert a == b and torch.equal(state, torch.random.get_rng_state())
    assert all(len(r) <= 6 and (EOS not in r[:-1]) for r in a)


def test_bad_arguments_are_named(lm):
    ids, mask = left_pad(PROMPTS[:2], PAD, "cpu")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_responses(lm, ids, mask, eos_id=EOS, pad_id=PAD, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_responses(lm, ids, mask, eos_id=EOS, pad_id=PAD, max_new_tokens=2, temperature=-1.0)


def test_the_prompt_forward_computes_the_last_positions_logits_only(lm):
    """The prompt's forward asks for the LM head on its last position only (``logits_to_keep=1``): the
    [B, P, V] logits of a long prompt batch were the largest tensor of a rollout and never used."""
    shapes = []
    handle = lm.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    try:
        ids, mask = left_pad(PROMPTS[:4], PAD, "cpu")
        generate_responses(lm, ids, mask, eos_id=EOS, pad_id=PAD, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert shapes and all(s == (4, 1, VOCAB) for s in shapes), shapes
