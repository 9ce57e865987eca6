"""GRPO on the built-in task, for several seeds: the pipeline's SFT stage, its GRPO stage (default
settings, 60 steps, the gold scorer as reward) and its report evaluation (256 held-out prompts of
the report's stream, sampled at temperature 1 with the run's seed), without the reward-model, PPO
and DPO stages.  ``rlhf pipeline --seed S`` computes the same GRPO row in its report.

    PYTHONPATH=. python examples/grpo_builtin.py --seeds 0 1 2 --out outputs/grpo_seeds
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def run_seed(seed: int, out: str) -> dict:
    from rlhf.evaluate import evaluate_policy
    from rlhf.grpo import GRPOConfig, train_grpo
    from rlhf.models import load_policy, load_tokenizer
    from rlhf.sft import SFTConfig, train_sft
    from rlhf.tasks import DEFAULT_TASK, get_task

    sft_dir, grpo_dir = (os.path.join(out, f"seed{seed}", s) for s in ("sft", "grpo"))
    t0 = time.time()
    train_sft(SFTConfig(output_dir=sft_dir, gold_eval_prompts=0, seed=seed, progress_bar=False,
                        overwrite_output_dir=True))
    t1 = time.time()
    train_grpo(GRPOConfig(model=sft_dir, output_dir=grpo_dir, max_steps=60, eval_steps=10, eval_prompts=128,
                          seed=seed, progress_bar=False, overwrite_output_dir=True))
    t2 = time.time()
    task = get_task(DEFAULT_TASK)
    tok = load_tokenizer(sft_dir)
    device = torch.device("cpu")
    prompts = [r["prompt"] for r in task.prompts(256, seed=10_000 + seed)]  # the pipeline report's prompts
    sft = load_policy(sft_dir, tok, device, trainable=False)
    grpo = load_policy(grpo_dir, tok, device, trainable=False)
    res = {name: evaluate_policy(model, sft, None, tok, prompts, gold_fn=task.gold_score, max_new_tokens=8,
                                 seed=seed)
           for name, model in (("sft", sft), ("grpo", grpo))}
    res["seconds"] = {"sft": round(t1 - t0, 1), "grpo": round(t2 - t1, 1)}
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="outputs/grpo_seeds")
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    for seed in args.seeds:
        res = run_seed(seed, args.out)
        print(json.dumps({"seed": seed, **res}), flush=True)


if __name__ == "__main__":
    main()
