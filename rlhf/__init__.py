"""rlhf: a thin, readable RLHF pipeline (SFT, reward model, PPO, DPO) built on rlhf_kernels."""

__version__ = "0.1.0"
