"""The whole pipeline on the built-in task, for several seeds: SFT, then a reward model and DPO from
the SFT model.  Prints, per seed, the mean gold score of sampled responses (temperature 1, the same
held-out prompts) after SFT and after DPO, and the reward model's held-out pairwise accuracy against
the noisy labels and against the gold ordering.

    PYTHONPATH=. python examples/builtin_task.py --seeds 0 1 --out outputs/builtin
"""

from __future__ import annotations

import argparse
import json
import os
import time

from rlhf.config import make_config
from rlhf.dpo import DPOConfig, train_dpo
from rlhf.reward import RewardConfig, train_reward
from rlhf.sft import SFTConfig, train_sft


def run_seed(seed: int, out: str) -> dict:
    t0 = time.time()
    sft_dir, rm_dir, dpo_dir = (os.path.join(out, f"seed{seed}", s) for s in ("sft", "rm", "dpo"))
    sft = train_sft(make_config(SFTConfig, {"seed": seed, "output_dir": sft_dir, "progress_bar": False}))
    rm = train_reward(make_config(RewardConfig, {"seed": seed, "model": sft_dir, "output_dir": rm_dir,
                                                 "progress_bar": False}))
    dpo = train_dpo(make_config(DPOConfig, {"seed": seed, "model": sft_dir, "output_dir": dpo_dir,
                                            "progress_bar": False}))
    return {
        "seed": seed,
        "sft_gold": sft["gold/mean_score"],
        "dpo_gold": dpo["gold/mean_score"],
        "sft_exact": sft["gold/exact"],
        "dpo_exact": dpo["gold/exact"],
        "rm_accuracy": rm["eval/accuracy"],
        "rm_accuracy_gold": rm["eval/accuracy_gold"],
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="outputs/builtin")
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args.out))
        print(json.dumps(rows[-1]), flush=True)
    n = len(rows)
    mean = {k: sum(r[k] for r in rows) / n for k in rows[0] if k != "seed"}
    print("mean over seeds:", json.dumps({k: round(v, 4) for k, v in mean.items()}))
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"per_seed": rows, "mean": mean}, fh, indent=1)


if __name__ == "__main__":
    main()
