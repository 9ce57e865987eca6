"""Reward model: a scalar head on the SFT model trained with the Bradley-Terry pairwise loss.

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin)

(InstructGPT, Ouyang et al. 2022; the optional per-pair ``margin`` column as in Llama 2).  r is the
head's output at the last real token.  The held-out pairwise accuracy (r_chosen > r_rejected) is
logged as ``eval/accuracy``; for data with gold scores (the built-in task), also ``eval/accuracy_gold``,
the accuracy against the true ordering rather than the noisy labels.

    rlhf reward --model outputs/sft --output-dir outputs/rm      # built-in task preference pairs
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .config import TrainConfig, require
from .data import DataError, collate_preference, is_table, set_columns, tokenize_preference
from .models import ScalarHead, sequence_rewards, trainable_reward_model, unwrap
from .trainer_utils import run_command
from .training import Trainer


@dataclass
class RewardConfig(TrainConfig):
    """Reward-model settings.  The defaults are TRL's ``RewardConfig``'s; a model from the built-in task
    gets the task's own (``Task.defaults["reward"]``)."""

    DEFAULTS_KEY: ClassVar[str] = "reward"

    model: str = "outputs/sft"
    """The SFT model to initialise from (its body is loaded; the scalar head is new)."""
    output_dir: str = "outputs/rm"
    """Where checkpoints, the final reward model and metrics.jsonl are written."""
    max_length: int = 1024
    """Maximum tokens per sequence (prompt + response); responses are cut to fit, prompts never."""
    per_device_batch_size: int = 8
    """Pairs per micro-batch on each process."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    lr_scheduler: str = "linear"
    """Decay after warmup: ``cosine``, ``linear`` or ``constant``."""
    num_epochs: float = 3.0
    """Passes over the training pairs (ignored when ``max_steps`` > 0)."""
    eval_fraction: float = 0.0
    """Fraction of the pairs held out to measure pairwise accuracy."""
    margin_column: str = "margin"
    """Column with a per-pair margin subtracted inside the sigmoid, when the data has it."""

    def __post_init__(self):
        super().__post_init__()
        require(self.margin_column.strip() != "", "margin_column", "a column name", self.margin_column)


def attach_columns(tokenized: list[dict], records: list[dict], columns: tuple[str, ...]) -> list[dict]:
    """Copy numeric ``columns`` (margin, gold scores) from the records onto the tokenized examples
    (a list of dicts, or an :class:`~rlhf.data.ExampleTable` with records in a ``datasets.Dataset``)."""
    if is_table(records):
        for c in columns:
            if c not in records.column_names:
                continue
            values = records[c]
            for i, v in enumerate(values):
                if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise DataError(f"record {i}: column {c!r} must be a number, got {v!r:.40}")
            set_columns(tokenized, {c: [float(v) for v in values]})
        return tokenized
    for ex, rec in zip(tokenized, records):
        for c in columns:
            if c in rec and rec[c] is not None:
                if isinstance(rec[c], bool) or not isinstance(rec[c], (int, float)):
                    raise DataError(f"record {rec!r:.80}: column {c!r} must be a number, got {rec[c]!r:.40}")
                ex[c] = float(rec[c])
    return tokenized


def pair_rewards(model, examples: list[dict], pad_id: int, cfg, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]): chosen and rejected scored in one forward pass."""
    batch = {k: v.to(device) for k, v in collate_preference(examples, pad_id, cfg.padding_side).items()}
    r = sequence_rewards(model, batch)
    return r[: len(examples)], r[len(examples):]


class RewardTrainer(Trainer):
    """The reward model on the shared skeleton (:class:`~rlhf.training.Trainer`): the Bradley-Terry
    loss per pair, normalised by the pairs of the global batch."""

    name = "reward"
    data_kind = "preference"

    def tokenize(self, records, name):
        columns = (self.cfg.margin_column, "gold_chosen", "gold_rejected")
        return attach_columns(tokenize_preference(records, self.tokenizer, self.cfg.max_length, name),
                              records, columns)

    def load_model(self):
        cfg = self.cfg
        ckpt = self.run.checkpoint
        hf_model = trainable_reward_model(cfg, cfg.model, self.tokenizer, self.device, self.precision.weights,
                                          adapter_path=ckpt, resume_path=ckpt)
        return ScalarHead(hf_model)

    def loss(self, examples):
        cfg = self.cfg
        r_chosen, r_rejected = pair_rewards(self.model, examples, self.tokenizer.pad_token_id, cfg, self.device)
        margin = torch.tensor([e.get(cfg.margin_column, 0.0) for e in examples], device=r_chosen.device)
        losses = -F.logsigmoid(r_chosen - r_rejected - margin)
        d_c, d_r = r_chosen.detach(), r_rejected.detach()
        return losses.sum(), {
            "loss": losses.detach().sum(),
            "accuracy": (d_c > d_r).float().sum(),
            "rewards/chosen": d_c.sum(),
            "rewards/rejected": d_r.sum(),
            "rewards/margins": (d_c - d_r).sum(),
        }

    def evaluate(self):
        cfg, held_out = self.cfg, self.held_out
        if not held_out:
            return {}
        inner = ScalarHead(unwrap(self.model))
        rc, rr = [], []
        for i in range(0, len(held_out), cfg.per_device_batch_size):
            a, b = pair_rewards(inner, held_out[i:i + cfg.per_device_batch_size], self.tokenizer.pad_token_id, cfg,
                                self.device)
            rc.append(a)
            rr.append(b)
        rc, rr = torch.cat(rc).cpu(), torch.cat(rr).cpu()
        margin = torch.tensor([e.get(cfg.margin_column, 0.0) for e in held_out])
        metrics = {"eval/loss": float(-F.logsigmoid(rc - rr - margin).mean()),
                   "eval/accuracy": float((rc > rr).float().mean())}
        if all("gold_chosen" in e and "gold_rejected" in e for e in held_out):
            gold_order = torch.tensor([e["gold_chosen"] > e["gold_rejected"] for e in held_out])
            metrics["eval/accuracy_gold"] = float(((rc > rr) == gold_order).float().mean())
        return metrics


def train_reward(cfg: RewardConfig) -> dict:
    """Run ``rlhf reward``; returns the last logged metrics (with the final evaluation)."""
    return RewardTrainer(cfg).train()


def main(argv: list[str] | None = None) -> int:
    """Train a reward model on preference pairs (Bradley-Terry)."""
    return run_command(RewardConfig, train_reward, argv, "reward", __doc__.split("\n\n")[0])
