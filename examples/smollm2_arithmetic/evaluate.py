"""Held-out accuracy of a model on the arithmetic prompts: greedy, and sampled at temperature 1.

    python examples/smollm2_arithmetic/evaluate.py MODEL_FOLDER EVAL_JSONL [--samples 8] [--seed 0]

Greedy accuracy is the share of prompts whose greedy completion ends in the right number; sampled
accuracy is the share of ``--samples`` completions per prompt (temperature 1, the distribution GRPO
trains) that do.  Scored by the same ``exact_number`` the training reward uses.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rewards import exact_number

from rlhf.generation import generate
from rlhf.models import load_policy, load_tokenizer


def encode(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def accuracy(model, tok, records, temperature: float, samples: int, max_new_tokens: int, seed: int) -> float:
    prompts = [encode(tok, r["prompt"]) for r in records for _ in range(samples)]
    answers = [r["answer"] for r in records for _ in range(samples)]
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(0, len(prompts), 64):
        out = generate(model, prompts[i : i + 64], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       max_new_tokens=max_new_tokens, temperature=temperature, generator=gen)
        texts += [tok.decode(o, skip_special_tokens=True) for o in out]
    scores = exact_number(None, texts, answers)
    return sum(scores) / len(scores), texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("eval_jsonl")
    ap.add_argument("--samples", type=int, default=8, help="completions per prompt for the sampled accuracy")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with open(args.eval_jsonl) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    start = time.time()
    tok = load_tokenizer(args.model)
    model = load_policy(args.model, tok, "cpu", trainable=False)
    greedy, texts = accuracy(model, tok, records, 0.0, 1, args.max_new_tokens, args.seed)
    sampled, _ = accuracy(model, tok, records, 1.0, args.samples, args.max_new_tokens, args.seed)
    result = {"model": args.model, "prompts": len(records), "greedy_accuracy": round(greedy, 4),
              "sampled_accuracy": round(sampled, 4), "samples_per_prompt": args.samples,
              "seconds": round(time.time() - start, 1), "examples": texts[:4]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
