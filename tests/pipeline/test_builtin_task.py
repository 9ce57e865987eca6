"""The built-in task end to end, shortened for CI: SFT learns the task from the careless
demonstrator, and DPO on the gold-labeled (25% flipped) pairs raises the mean gold score of sampled
responses above SFT's on the same held-out prompts.  (The full measurement over several seeds, with
the reward model, is examples/builtin_task.py; its numbers are in README.md.)"""

from rlhf.dpo import DPOConfig, train_dpo
from rlhf.sft import SFTConfig, train_sft


def test_sft_then_dpo_raises_gold_score(tmp_path):
    sft_dir, dpo_dir = str(tmp_path / "sft"), str(tmp_path / "dpo")
    sft = train_sft(SFTConfig(output_dir=sft_dir, max_steps=150, eval_fraction=0.0, gold_eval_prompts=256,
                              progress_bar=False, logging_steps=50))
    # A random model scores ~0.04; the demonstrator itself 0.5 + 0.5/12 = 0.54.
    assert sft["gold/mean_score"] > 0.35, sft
    dpo = train_dpo(DPOConfig(model=sft_dir, output_dir=dpo_dir, max_steps=60, eval_fraction=0.0,
                              gold_eval_prompts=256, progress_bar=False, logging_steps=20))
    print(f"gold: sft {sft['gold/mean_score']:.3f} -> dpo {dpo['gold/mean_score']:.3f}")
    assert dpo["gold/mean_score"] > sft["gold/mean_score"] + 0.05, (sft, dpo)
    assert dpo["rewards/accuracies"] > 0.55
