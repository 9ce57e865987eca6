"""The built-in task: "shift each letter by one", with a graded gold scorer and a noisy demonstrator.

A prompt is a word of 4 letters from ``a``..``l`` followed by ``=``, e.g. ``dbca=``.  The ideal
response replaces each letter by the next one in the alphabet, wrapping ``l`` to ``a``: ``ecdb``.

- Gold scorer (:func:`gold_score`): the fraction of positions that are right, divided by the longer
  of the two lengths, so a response is graded on 0..1 in steps (not only right/wrong) and a wrong
  length costs.
- Demonstrations (:func:`make_demonstrations`): written by a careless demonstrator that gets each
  letter right with probability ``p_correct`` (0.5) and otherwise writes a random letter.  SFT learns
  to imitate it, so a sampled SFT response scores about 0.5-0.55: room for preference training.
- Preference pairs (:func:`make_preference_pairs`): two responses for the same prompt sampled from
  demonstrators of varied care (per-letter accuracy uniform in 0.1..0.9, mean 0.5), ordered by the gold scorer, with ``flip`` (25%) of the labels flipped, since
  human raters agree only about 73% of the time (InstructGPT).  Ties are not used.
- Prompts (:func:`make_prompts`): prompt-only records for RL.

The model is a tiny Llama (:func:`tiny_llama_config`) and the tokenizer is character-level
(:func:`build_tokenizer`); neither needs a download.  Everything is a pure function of the seed.
The task registers itself as ``builtin`` (:data:`TASK`, see :mod:`rlhf.tasks.registry`), with the
settings tuned for the tiny model per command (:data:`SFT_DEFAULTS`, :data:`REWARD_DEFAULTS`,
:data:`DPO_DEFAULTS`, :data:`PPO_DEFAULTS`, :data:`GRPO_DEFAULTS`); the commands' own defaults are for real models.
"""

from __future__ import annotations

import random

from .registry import DEFAULT_TASK, Task, register_task

LETTERS = "abcdefghijkl"
SEPARATOR = "="
SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
MIN_LEN, MAX_LEN = 4, 4
GOLD_TASK = "shift"

# A chat template, so the `messages` format works with the built-in tokenizer too: the user's
# word, then "=", then the assistant's answer and </s>.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}" + SEPARATOR + "{% endif %}"
    "{% endfor %}"
)


def ideal_response(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in word)


def _word_of(prompt: str) -> str:
    return prompt[:-1] if prompt.endswith(SEPARATOR) else prompt


def gold_score(prompt: str, response: str) -> float:
    """Graded score in [0, 1]: positions matching the ideal response / max(len(ideal), len(response))."""
    ideal = ideal_response(_word_of(prompt))
    response = response.strip()
    hits = sum(a == b for a, b in zip(ideal, response))
    return hits / max(len(ideal), len(response), 1)


def _random_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def demonstrator_response(word: str, rng: random.Random, p_correct: float = 0.5) -> str:
    """The careless demonstrator: each letter right with probability ``p_correct``, else random."""
    ideal = ideal_response(word)
    return "".join(c if rng.random() < p_correct else rng.choice(LETTERS) for c in ideal)


def make_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt-only records ``{"prompt": "dbca="}``."""
    rng = random.Random(f"prompts-{seed}")
    return [{"prompt": _random_word(rng) + SEPARATOR} for _ in range(n)]


def make_demonstrations(n: int, seed: int = 0, p_correct: float = 0.5) -> list[dict]:
    """``n`` SFT records ``{"prompt", "completion"}`` written by the careless demonstrator."""
    rng = random.Random(f"demos-{seed}")
    out = []
    for _ in range(n):
        word = _random_word(rng)
        out.append({"prompt": word + SEPARATOR, "completion": demonstrator_response(word, rng, p_correct)})
    return out


def make_preference_pairs(n: int, seed: int = 0, flip: float = 0.25,
                          p_correct: tuple[float, float] = (0.1, 0.9)) -> list[dict]:
    """``n`` records ``{"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}``.

    Each response is sampled from a demonstrator whose per-letter accuracy is drawn uniformly from
    ``p_correct`` (responses of varied quality, as InstructGPT compared samples from several
    policies; the mean is the SFT demonstrator's 0.5); the one with the higher gold score is chosen,
    except that a fraction ``flip`` of labels are swapped.
    ``gold_chosen``/``gold_rejected`` keep the true scores so accuracy against gold can be measured.
    """
    rng = random.Random(f"pairs-{seed}")
    out = []
    while len(out) < n:
        word = _random_word(rng)
        prompt = word + SEPARATOR
        a = demonstrator_response(word, rng, rng.uniform(*p_correct))
        b = demonstrator_response(word, rng, rng.uniform(*p_correct))
        ga, gb = gold_score(prompt, a), gold_score(prompt, b)
        if ga == gb:
            continue
        if ga < gb:
            a, b, ga, gb = b, a, gb, ga
        if rng.random() < flip:
            a, b, ga, gb = b, a, gb, ga
        out.append({"prompt": prompt, "chosen": a, "rejected": b, "gold_chosen": ga, "gold_rejected": gb})
    return out


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over the task's alphabet (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = list(SPECIAL.values()) + list(LETTERS) + [SEPARATOR, " "]
    vocab = {s: i for i, s in enumerate(symbols)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    # Every character is a token; special tokens are matched whole before this runs.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL["pad"],
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama_config(vocab_size: int, **overrides):
    """A ~100k-parameter Llama-style config that learns the task on 2 CPU cores in about a minute."""
    from transformers import LlamaConfig

    kw = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    kw.update(overrides)
    return LlamaConfig(**kw)


def evaluate_gold(model, tokenizer, n_prompts: int = 256, seed: int = 0, temperature: float = 1.0,
                  samples_per_prompt: int = 1, batch_size: int = 128) -> dict:
    """Mean gold score of responses sampled from ``model`` on held-out prompts (a seed stream
    disjoint from the training data's).  Returns ``{"gold/mean_score", "gold/exact"}``."""
    import torch

    from ..generation import generate

    rng = random.Random(f"eval-prompts-{seed}")
    prompts = [_random_word(rng) + SEPARATOR for _ in range(n_prompts)] * samples_per_prompt
    g = torch.Generator().manual_seed(seed)
    scores = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in chunk]
        outs = generate(model, ids, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        max_new_tokens=MAX_LEN + 2, temperature=temperature, generator=g)
        for p, o in zip(chunk, outs):
            scores.append(gold_score(p, tokenizer.decode(o, skip_special_tokens=True)))
    return {"gold/mean_score": sum(scores) / len(scores), "gold/exact": sum(s == 1.0 for s in scores) / len(scores)}


def build_model(vocab_size: int):
    """A freshly initialised tiny Llama (:func:`tiny_llama_config`) for a vocabulary of ``vocab_size``."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(vocab_size))


# Settings tuned for the tiny model, per command (the commands' own defaults are TRL's, for real models).
_TINY = {"max_length": 32, "per_device_batch_size": 32, "lr_scheduler": "cosine"}
SFT_DEFAULTS = {**_TINY, "lr": 3e-3, "warmup_steps": 20, "num_epochs": 2.0, "eval_fraction": 0.05}
REWARD_DEFAULTS = {**_TINY, "lr": 1e-3, "warmup_steps": 10, "num_epochs": 3.0, "eval_fraction": 0.1}
DPO_DEFAULTS = {**_TINY, "lr": 2e-4, "warmup_steps": 10, "num_epochs": 1.0, "eval_fraction": 0.05}
PPO_DEFAULTS = {
    "rollout_batch_size": 64,
    "mini_batch_size": 16,
    "ppo_epochs": 4,
    "lr": 3e-4,
    "value_lr": 3e-4,
    "max_new_tokens": 8,
    "kl_coef": 0.05,
    "max_length": 32,
}
GRPO_DEFAULTS = {
    "generation_batch_size": 128,
    "max_completion_length": 8,
    "lr": 1e-3,
    "max_length": 32,
    "logging_steps": 1,
}

TASK = register_task(Task(
    name=DEFAULT_TASK,
    build_tokenizer=build_tokenizer,
    build_model=build_model,
    make_records={"sft": make_demonstrations, "preference": make_preference_pairs, "prompts": make_prompts},
    data_sizes={"sft": 4000, "preference": 6000, "prompts": 1000},
    gold_score=gold_score,
    evaluate_gold=evaluate_gold,
    defaults={"sft": SFT_DEFAULTS, "reward": REWARD_DEFAULTS, "dpo": DPO_DEFAULTS, "ppo": PPO_DEFAULTS,
              "grpo": GRPO_DEFAULTS},
))
