"""Sampling completions from a causal LM for batches of prompts of different lengths.

Prompts are left-padded; position ids come from the attention mask, so padding does not change a
row's output.  Uses the model's KV cache.  Deterministic for a given ``torch.Generator``.
"""

from __future__ import annotations

import inspect

import torch

from .data import pad_batch


@torch.no_grad()
def generate(model, prompt_ids: list[list[int]], *, eos_token_id: int, pad_token_id: int,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, device=None) -> list[list[int]]:
    """Sample a completion for each prompt; returns the completion ids (up to and including EOS).

    ``temperature=0`` is greedy decoding.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    input_ids = pad_batch(prompt_ids, pad_token_id, "left").to(device)
    attention_mask = pad_batch([[1] * len(p) for p in prompt_ids], 0, "left").to(device)
    B = input_ids.shape[0]
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    # transformers 5 names the KV cache `cache`; 4.x names it `past_key_values`.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = None
    step_ids = input_ids
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    for t in range(max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, **{cache_kw: past})
        past = res[cache_kw]
        logits = res.logits[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, -1)
            nxt = torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu"
                                    else probs, 1, generator=generator).squeeze(-1).to(device)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        out[:, t] = nxt
        newly = (~finished) & (nxt == eos_token_id)
        lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
        finished |= newly
        if bool(finished.all()):
            break
        step_ids = nxt[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], -1)
        position_ids = position_ids[:, -1:] + 1
    model.train(was_training)
    return [out[i, : int(lengths[i])].tolist() for i in range(B)]
