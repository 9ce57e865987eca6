"""Supervised fine-tuning: token-level negative log-likelihood on completion / assistant tokens.

    loss = - sum_{completion tokens t} log pi(y_t | y_<t, x) / (number of completion tokens)

The mean is over all completion tokens of the global batch (not per sequence), so the result is the
same for any split into processes and micro-batches.  Log-probs come from
``rlhf_kernels.token_logprobs``.

    rlhf sft                                    # the built-in task, tiny Llama, ~1 minute on CPU
    rlhf sft --model Qwen/Qwen2.5-0.5B --dataset data.jsonl --output-dir out/sft
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .config import TrainConfig, require
from .data import IGNORE_INDEX, collate_sft, tokenize_sft
from .models import token_logprobs, trainable_policy, unwrap
from .trainer_utils import run_command
from .training import Trainer


@dataclass
class SFTConfig(TrainConfig):
    """SFT settings.  The defaults are TRL's ``SFTConfig``'s; the built-in task's tiny model gets the
    task's own (``Task.defaults["sft"]``: it learns the task in about a minute)."""

    DEFAULTS_KEY: ClassVar[str] = "sft"

    output_dir: str = "outputs/sft"
    """Where checkpoints, the final model and metrics.jsonl are written."""
    max_length: int = 1024
    """Maximum tokens per sequence (prompt + completion); completions are cut to fit, prompts never."""
    per_device_batch_size: int = 8
    """Sequences per micro-batch on each process."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    lr_scheduler: str = "linear"
    """Decay after warmup: ``cosine``, ``linear`` or ``constant``."""
    num_epochs: float = 3.0
    """Passes over the training data (ignored when ``max_steps`` > 0)."""
    eval_fraction: float = 0.0
    """Fraction of the data held out to report eval/loss."""
    gold_eval_prompts: int = 256
    """Built-in task only: held-out prompts sampled (temperature 1) to report gold/mean_score."""

    def __post_init__(self):
        super().__post_init__()
        require(self.gold_eval_prompts >= 0, "gold_eval_prompts", ">= 0", self.gold_eval_prompts)


def _completion_nll(model, examples: list[dict], pad_id: int, cfg, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over completion tokens, number of completion tokens) for ``examples``."""
    batch = {k: v.to(device) for k, v in collate_sft(examples, pad_id, cfg.padding_side).items()}
    logprobs = token_logprobs(model, batch, backend=cfg.kernel_backend)
    n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    return -logprobs.sum(), n_tokens


class SFTTrainer(Trainer):
    """SFT on the shared skeleton (:class:`~rlhf.training.Trainer`): the loss is the summed NLL of
    the completion tokens, normalised by the completion tokens of the whole global batch."""

    name = "sft"
    data_kind = "sft"

    def tokenize(self, records, name):
        return tokenize_sft(records, self.tokenizer, self.cfg.max_length, name=name)

    def load_model(self):
        cfg = self.cfg
        return trainable_policy(cfg, self.run, self.tokenizer, self.device, self.precision.weights, seed=cfg.seed)

    def loss(self, examples):
        nll_sum, _ = _completion_nll(self.model, examples, self.tokenizer.pad_token_id, self.cfg, self.device)
        return nll_sum, {"loss": nll_sum.detach()}

    def normalizer(self, examples):  # completion tokens in the whole global batch
        return sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)

    def evaluate(self):
        metrics = {}
        if self.held_out:
            total, count = 0.0, 0
            for i in range(0, len(self.held_out), self.cfg.per_device_batch_size):
                s, n = _completion_nll(unwrap(self.model), self.held_out[i:i + self.cfg.per_device_batch_size],
                                       self.tokenizer.pad_token_id, self.cfg, self.device)
                total, count = total + float(s), count + int(n)
            metrics["eval/loss"] = total / max(count, 1)
        metrics.update(self.gold_metrics(self.cfg.gold_eval_prompts))
        return metrics


def train_sft(cfg: SFTConfig) -> dict:
    """Run ``rlhf sft``; returns the last logged metrics (with the final evaluation)."""
    return SFTTrainer(cfg).train()


def main(argv: list[str] | None = None) -> int:
    """Supervised fine-tuning (loss on completion / assistant tokens only)."""
    return run_command(SFTConfig, train_sft, argv, "sft", __doc__.split("\n\n")[0])
