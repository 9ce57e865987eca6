"""The one sampler of the pipeline: completions from a causal LM for batches of prompts.

Every stage samples through :func:`generate_responses`: PPO rollouts, the PPO and pipeline
evaluations (:mod:`rlhf.evaluate`) and the SFT/DPO gold evaluation of the built-in task (through
:func:`generate`, its token-list form).

Prompts are left-padded; position ids come from the attention mask, so padding does not change a
row's output.  Each step runs the model on the new token only (KV cache), scales the last logits by
1/temperature, keeps the ``top_k`` most likely tokens and then the nucleus of mass ``top_p``, and
draws one token per row with ``torch.multinomial`` (from ``generator`` when given, else from torch's
global random stream).  ``temperature=0`` is greedy decoding.  A row stops at its first EOS (later
positions are padding); sampling stops when every row has stopped or after ``max_new_tokens``.
"""

from __future__ import annotations

import inspect

import torch

from .data import pad_batch, position_ids_from_mask


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> left-padded ``input_ids`` and ``attention_mask`` ``[B, P]`` on ``device``."""
    ids = pad_batch(prompts, pad_id, "left")
    mask = pad_batch([[1] * len(p) for p in prompts], 0, "left")
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits [B, V]`` with every token outside the top ``k`` (0: all) and then outside the nucleus
    set to -inf.  The nucleus is the smallest set of most likely tokens whose probability reaches
    ``top_p`` (1.0: all); the most likely token is always kept."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _forward_keywords(model) -> tuple[str, dict]:
    """The model's KV-cache keyword, and ``{"logits_to_keep": 1}`` when its forward takes it: the
    prompt's forward then runs the LM head on the last position only, not on every prompt token."""
    # transformers 5 names the KV cache `cache` in some models; 4.x and Llama name it `past_key_values`.
    # A peft wrapper forwards the keyword to the Hugging Face model inside: ask that one.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    return cache, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


@torch.no_grad()
def generate_responses(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample responses to left-padded prompts ``[B, P]``.

    Returns ``(responses [B, R], response_mask [B, R] bool, has_eos [B] bool)`` where ``R`` is the
    number of steps run (at most ``max_new_tokens``).  A response ends at its first EOS (kept, and
    covered by the mask); positions after it hold ``pad_id``.  ``do_sample=False`` (or
    ``temperature=0``) decodes greedily.  The model is run in eval mode and restored.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    greedy = not do_sample or temperature == 0
    device = prompt_ids.device
    was_training = model.training
    model.eval()
    B = prompt_ids.shape[0]
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache_kw, last_only = _forward_keywords(model)
    past = None
    step_ids, attention_mask = prompt_ids, prompt_mask
    position_ids = position_ids_from_mask(attention_mask)
    steps = 0
    for t in range(max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, **{cache_kw: past}, **last_only)
        past = res[cache_kw]
        logits = res.logits[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), -1)
            if generator is not None and generator.device != probs.device:
                probs = probs.to(generator.device)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        steps = t + 1
        finished |= nxt == eos_id
        if bool(finished.all()):
            break
        step_ids = nxt[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], -1)
        position_ids = position_ids[:, -1:] + 1
    model.train(was_training)
    responses = out[:, :steps]
    is_eos = responses == eos_id
    has_eos = is_eos.any(-1)
    # the mask covers tokens up to and including the first EOS (all of them without one)
    first_eos = torch.where(has_eos, is_eos.int().argmax(-1), torch.full_like(has_eos, steps - 1, dtype=torch.long))
    response_mask = torch.arange(steps, device=device)[None] <= first_eos[:, None]
    return responses.masked_fill(~response_mask, pad_id), response_mask, has_eos


def generate(model, prompt_ids: list[list[int]], *, eos_token_id: int, pad_token_id: int,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, device=None) -> list[list[int]]:
    """:func:`generate_responses` on token-id lists: the completion ids of each prompt (up to and
    including EOS).  ``temperature=0`` is greedy decoding."""
    device = device or next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, pad_token_id, device)
    responses, response_mask, _ = generate_responses(
        model, ids, mask, eos_id=eos_token_id, pad_id=pad_token_id, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return [r[m].tolist() for r, m in zip(responses, response_mask)]
