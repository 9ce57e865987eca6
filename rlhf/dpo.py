"""Direct Preference Optimization (Rafailov et al., 2023) from an SFT model, with a frozen reference.

Per pair, with log-probs summed over the response tokens (``rlhf_kernels.token_logprobs``)::

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
    sigmoid loss = -log sigmoid(beta * h)            (also ipo, hinge, robust: rlhf_kernels.dpo_loss)

The reference log-probs are computed once, before training (the reference never changes).  With
``--use-peft`` (and no ``--ref-model``) the reference is the policy's base: the same model with its
LoRA adapters disabled, so no second copy is loaded.  Logged
as TRL users expect: ``rewards/chosen`` = beta * (log pi - log ref) on chosen responses,
``rewards/rejected``, ``rewards/accuracies`` (chosen reward > rejected), ``rewards/margins``.

    rlhf dpo --model outputs/sft --output-dir outputs/dpo        # built-in task preference pairs
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import rlhf_kernels as rk

from .config import TrainConfig, require, require_choice
from .data import collate_preference, set_columns, tokenize_preference
from .distributed import all_gather_cat
from .lora import adapters_disabled
from .models import load_reference, sequence_logprobs, trainable_policy, unwrap
from .trainer_utils import run_command
from .training import Trainer


@dataclass
class DPOConfig(TrainConfig):
    """DPO settings.  The defaults are TRL's ``DPOConfig``'s; a model from the built-in task gets the
    task's own (``Task.defaults["dpo"]``)."""

    DEFAULTS_KEY: ClassVar[str] = "dpo"

    model: str = "outputs/sft"
    """The SFT model to start from."""
    ref_model: str | None = None
    """The frozen reference model; defaults to ``model`` (the SFT model)."""
    output_dir: str = "outputs/dpo"
    """Where checkpoints, the final policy and metrics.jsonl are written."""
    beta: float = 0.1
    """Strength of the implicit KL constraint to the reference."""
    loss_type: str = "sigmoid"
    """``sigmoid`` (DPO), ``ipo``, ``hinge`` or ``robust``."""
    label_smoothing: float = 0.0
    """Assumed fraction of flipped labels in [0, 0.5) (cDPO / robust DPO)."""
    max_length: int = 1024
    """Maximum tokens per sequence (prompt + response); responses are cut to fit, prompts never."""
    per_device_batch_size: int = 8
    """Pairs per micro-batch on each process."""
    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    lr_scheduler: str = "linear"
    """Decay after warmup: ``cosine``, ``linear`` or ``constant``."""
    num_epochs: float = 3.0
    """Passes over the training pairs (ignored when ``max_steps`` > 0)."""
    eval_fraction: float = 0.0
    """Fraction of the pairs held out for eval/loss and eval/rewards/accuracies."""
    gold_eval_prompts: int = 256
    """Built-in task only: held-out prompts sampled (temperature 1) to report gold/mean_score."""

    def __post_init__(self):
        super().__post_init__()
        # Checked here, before the (slow) reference pass, on settings rlhf_kernels.dpo_loss would reject.
        require_choice("loss_type", self.loss_type, ("sigmoid", "ipo", "hinge", "robust"))
        require(self.beta > 0, "beta", "> 0", self.beta)
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", "in [0, 0.5)", self.label_smoothing)
        require(self.gold_eval_prompts >= 0, "gold_eval_prompts", ">= 0", self.gold_eval_prompts)


def pair_logprobs(model, examples: list[dict], pad_id: int, cfg, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(chosen) [B], log pi(rejected) [B]) summed over response tokens, one forward pass."""
    batch = {k: v.to(device) for k, v in collate_preference(examples, pad_id, cfg.padding_side).items()}
    lp = sequence_logprobs(model, batch, backend=cfg.kernel_backend)
    return lp[: len(examples)], lp[len(examples):]


@torch.no_grad()
def add_reference_logprobs(ref, examples: list[dict], pad_id: int, cfg, info) -> None:
    """Store ``ref_chosen`` / ``ref_rejected`` on every example; each rank computes a contiguous
    share and the shares are gathered, so every rank ends with all of them."""
    n, w = len(examples), info.world_size
    bounds = [n * r // w for r in range(w + 1)]
    mine = examples[bounds[info.rank]:bounds[info.rank + 1]]
    parts = []
    for i in range(0, len(mine), cfg.per_device_batch_size):
        c, r = pair_logprobs(ref, mine[i:i + cfg.per_device_batch_size], pad_id, cfg, info.device)
        parts.append(torch.stack([c, r], -1))
    local = torch.cat(parts) if parts else torch.zeros(0, 2, device=info.device)
    every = all_gather_cat(local, [bounds[r + 1] - bounds[r] for r in range(w)]).cpu()
    set_columns(examples, {"ref_chosen": every[:, 0].tolist(), "ref_rejected": every[:, 1].tolist()})


def dpo_terms(model, examples, pad_id, cfg, device):
    """(losses [B], chosen_rewards [B], rejected_rewards [B], policy log-probs) for a micro-batch."""
    pi_c, pi_r = pair_logprobs(model, examples, pad_id, cfg, device)
    ref_c = torch.tensor([e["ref_chosen"] for e in examples], device=pi_c.device)
    ref_r = torch.tensor([e["ref_rejected"] for e in examples], device=pi_c.device)
    losses, rew_c, rew_r = rk.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
                                       label_smoothing=cfg.label_smoothing, backend=cfg.kernel_backend)
    return losses, rew_c.detach(), rew_r.detach(), pi_c.detach(), pi_r.detach()


class DPOTrainer(Trainer):
    """DPO on the shared skeleton (:class:`~rlhf.training.Trainer`): the reference log-probs are
    computed once before the policy is loaded; the loss per pair is normalised by the pairs of the
    global batch."""

    name = "dpo"
    data_kind = "preference"

    def tokenize(self, records, name):
        return tokenize_preference(records, self.tokenizer, self.cfg.max_length, name)

    def prepare(self):
        cfg = self.cfg
        if cfg.use_peft and not cfg.ref_model:
            return  # the reference is the policy with its adapters disabled: after_load
        ref = load_reference(cfg.ref_model or cfg.model, self.tokenizer, self.device, self.precision.weights)
        add_reference_logprobs(ref, self.train_set + self.held_out, self.tokenizer.pad_token_id, cfg, self.info)
        del ref  # computed once; not needed any more

    def load_model(self):
        cfg = self.cfg
        return trainable_policy(cfg, self.run, self.tokenizer, self.device, self.precision.weights)

    def after_load(self, model):
        cfg = self.cfg
        if cfg.use_peft and not cfg.ref_model:
            # The base model (adapters disabled, eval mode: no dropout) is the reference; resuming,
            # the checkpoint's trained adapters are disabled alike.
            model.eval()
            with adapters_disabled(model):
                add_reference_logprobs(model, self.train_set + self.held_out, self.tokenizer.pad_token_id, cfg,
                                       self.info)
            model.train()

    def loss(self, examples):
        losses, rew_c, rew_r, pi_c, pi_r = dpo_terms(self.model, examples, self.tokenizer.pad_token_id, self.cfg,
                                                     self.device)
        return losses.sum(), {
            "loss": losses.detach().sum(),
            "rewards/chosen": rew_c.sum(),
            "rewards/rejected": rew_r.sum(),
            "rewards/accuracies": (rew_c > rew_r).float().sum(),
            "rewards/margins": (rew_c - rew_r).sum(),
            "logps/chosen": pi_c.sum(),
            "logps/rejected": pi_r.sum(),
        }

    def evaluate(self):
        cfg, held_out = self.cfg, self.held_out
        metrics = {}
        if held_out:
            sums = torch.zeros(3)
            for i in range(0, len(held_out), cfg.per_device_batch_size):
                losses, rc, rr, _, _ = dpo_terms(unwrap(self.model), held_out[i:i + cfg.per_device_batch_size],
                                                 self.tokenizer.pad_token_id, cfg, self.device)
                sums += torch.stack([losses.sum(), (rc > rr).float().sum(), (rc - rr).sum()]).cpu()
            metrics.update({"eval/loss": float(sums[0]) / len(held_out),
                            "eval/rewards/accuracies": float(sums[1]) / len(held_out),
                            "eval/rewards/margins": float(sums[2]) / len(held_out)})
        metrics.update(self.gold_metrics(cfg.gold_eval_prompts))
        return metrics


def train_dpo(cfg: DPOConfig) -> dict:
    """Run ``rlhf dpo``; returns the last logged metrics (with the final evaluation)."""
    return DPOTrainer(cfg).train()


def main(argv: list[str] | None = None) -> int:
    """Direct preference optimization from an SFT model."""
    return run_command(DPOConfig, train_dpo, argv, "dpo", __doc__.split("\n\n")[0])
