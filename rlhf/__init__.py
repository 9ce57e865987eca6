"""rlhf: a thin, readable RLHF pipeline (SFT, reward model, PPO, DPO, GRPO) built on rlhf_kernels."""

__version__ = "0.1.0"
