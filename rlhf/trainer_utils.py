"""Optimizer, schedule, seeding, batching and the run setup the trainers share (the step loop of SFT,
reward model and DPO is :mod:`rlhf.training`; PPO steps over rollouts in :mod:`rlhf.ppo`).

Batching is defined on the *global* batch so results do not depend on the process count: step s
of a run takes global batch s from a seeded shuffle of the data (one shuffle per epoch), every rank
takes its strided slice (``rank_slice``), cuts it into micro-batches, and each micro-batch loss is a
*sum* divided by a normalizer computed from the whole global batch (tokens for SFT, pairs for DPO).
With DDP averaging gradients over ranks, the update is exactly the one-process update.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Callable

import numpy as np
import torch

from .checkpoint import load_training_state
from .config import UserError
from .distributed import DistInfo
from .metrics_log import MetricsLogger


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases or norm weights)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))


def lr_lambda(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine / linear decay to 0, or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"lr_scheduler must be cosine, linear or constant; got {kind!r}")


def build_scheduler(optimizer, cfg, total_steps: int):
    lr_lambda(0, cfg.warmup_steps, total_steps, cfg.lr_scheduler)  # validate the name early
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, total_steps, cfg.lr_scheduler))


def global_batch_size(cfg, info: DistInfo) -> int:
    return cfg.per_device_batch_size * cfg.gradient_accumulation_steps * info.world_size


class DataSizeError(UserError, ValueError):
    """The data is too small for the batch the options ask for."""


def total_steps(cfg, n_examples: int, global_batch: int) -> int:
    steps_per_epoch = n_examples // global_batch
    if steps_per_epoch == 0:
        raise DataSizeError(f"the dataset has {n_examples} examples, fewer than one global batch of {global_batch} "
                         f"(per_device_batch_size x gradient_accumulation_steps x processes)")
    return cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_epochs * steps_per_epoch))


def global_batch_indices(step: int, n_examples: int, global_batch: int, seed: int) -> list[int]:
    """Indices of global batch ``step`` (0-based): a seeded shuffle per epoch, last partial batch dropped."""
    per_epoch = n_examples // global_batch
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=g).tolist()
    return order[k * global_batch:(k + 1) * global_batch]


def rank_slice(items: list, info: DistInfo) -> list:
    """This rank's share of a global batch (strided, so ranks get equal shares)."""
    return items[info.rank::info.world_size]


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (after DDP's all-reduce, so every rank clips alike); returns it."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))


def due(done: int, every: int, total: int) -> bool:
    """Whether a periodic action (evaluation, checkpoint) runs after step ``done`` of ``total``: every
    ``every`` steps (0: never), but not after the last step, which every loop handles on its own."""
    return every > 0 and done % every == 0 and done != total


def log_due(done: int, every: int, total: int) -> bool:
    """Whether metrics are logged after step ``done`` of ``total``: every ``every`` steps, and always
    after the first and the last."""
    return done % max(every, 1) == 0 or done in (1, total)


def resume_state(cfg, optimizer, scheduler, info: DistInfo, checkpoint: str | None) -> int:
    """Load optimizer/scheduler/RNG from ``checkpoint`` (when resuming) and return the step to start at."""
    if checkpoint is None:
        return 0
    step, _ = load_training_state(checkpoint, optimizer, scheduler, info)
    return step


# --------------------------------------------------------------------------------------------
# Run setup shared by the trainers


def load_records_for(cfg, kind: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) records for ``kind`` in ``sft | preference | prompts``: ``cfg.dataset`` (or a
    built-in task's data), with ``cfg.eval_dataset`` or an ``eval_fraction`` hold-out as eval."""
    from .data import PREFERENCE_FORMATS, SFT_FORMATS, detect_format, load_records, split_holdout
    from .tasks import get_task

    task = get_task(cfg.dataset)
    if task is not None:
        records = task.records(kind, seed=0)
    else:
        records = load_records(cfg.dataset, cfg.dataset_split, cfg.dataset_config)
    allowed = {"sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "prompts": None}[kind]
    detect_format(records, allowed, f"dataset {cfg.dataset!r}")  # checks every record before any split
    if cfg.eval_dataset:
        return records, load_records(cfg.eval_dataset, cfg.dataset_split, cfg.dataset_config)
    train, held_out = split_holdout(records, cfg.eval_fraction, seed=1234)
    if not train:
        from .data import DataError

        raise DataError(f"dataset {cfg.dataset!r} has {len(records)} record(s) and --eval-fraction "
                        f"{cfg.eval_fraction:g} holds out {len(held_out)} for evaluation, leaving none to train on; "
                        f"add data, lower --eval-fraction or pass --eval-dataset")
    return train, held_out


def load_rl_prompts(cfg, tokenizer) -> tuple[list[dict], list[list[int]], list[dict], object]:
    """The prompts of an RL run (``rlhf ppo``, ``rlhf grpo``): ``(records, prompt token ids, evaluation
    records, task)``.  The evaluation records are ``cfg.eval_prompts`` of the held-out records, or on
    a built-in task fresh prompts (seeded apart from the training ones), or else the first training
    records (each has a ``prompt``, and whatever other columns the dataset has); ``task`` is the
    built-in task ``cfg.dataset`` names, or None."""
    from .data import column, take, tokenize_prompts
    from .tasks import get_task

    records, eval_records = load_records_for(cfg, "prompts")
    # a column view: prompts of a datasets table stay in Arrow until read
    prompts = column(tokenize_prompts(records, tokenizer, cfg.max_length, name=f"dataset {cfg.dataset!r}"),
                     "prompt_ids")
    task = get_task(cfg.dataset)
    if not eval_records:  # a built-in task: fresh prompts; otherwise the first training prompts
        eval_records = task.prompts(cfg.eval_prompts, seed=cfg.seed + 777) if task is not None else records
    return records, prompts, [dict(r) for r in take(eval_records, cfg.eval_prompts)], task


class RunContext:
    """What every trainer sets up first: processes, device, seed, the output folder (refusing one that
    holds another run), the resume point, tokenizer and logger."""

    def __init__(self, cfg):
        import yaml

        from .checkpoint import holds_run, resume_checkpoint, start_run
        from .config import to_dict
        from .distributed import barrier, init_distributed
        from .models import check_model_path, load_tokenizer, resolve_device

        self.cfg = cfg
        from .config import report_targets
        from .optional import required

        for target in report_targets(cfg.report_to):  # before any folder is made or model loaded
            required(target, f"--report-to {target}")
        self.info = init_distributed(resolve_device(cfg.device), timeout=cfg.ddp_timeout)
        self.device = self.info.device
        seed_everything(cfg.seed)
        if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
            raise UserError(f"--output-dir {cfg.output_dir!r} is a file, not a folder")
        if not cfg.resume and not cfg.overwrite_output_dir and holds_run(cfg.output_dir):
            raise UserError(f"--output-dir {cfg.output_dir!r} holds a previous run; pass --resume to continue it, "
                            f"--overwrite-output-dir to start a new run over it, or choose another folder")
        self.checkpoint = resume_checkpoint(cfg.output_dir, announce=self.info.is_main) if cfg.resume else None
        self.start_step = int(os.path.basename(self.checkpoint).split("-")[-1]) if self.checkpoint else 0
        if cfg.resume and self.checkpoint is None and self.info.is_main:
            print(f"--resume: no checkpoint in {cfg.output_dir}; starting from step 0")
        # Resuming: the weights (and tokenizer) come from the checkpoint folder.
        self.model_path = self.checkpoint or cfg.model
        if self.checkpoint:
            self.tokenizer = load_tokenizer(self.checkpoint, what="checkpoint")
        elif cfg.tokenizer:
            check_model_path(cfg.model, "model")
            self.tokenizer = load_tokenizer(cfg.tokenizer, what="tokenizer")
        else:
            self.tokenizer = load_tokenizer(cfg.model, what="model")
        barrier()  # every rank has checked the folder before the main one writes into it
        if self.info.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            self.run_id = start_run(cfg.output_dir, resume=cfg.resume)
        self.logger = MetricsLogger(cfg.output_dir, enabled=self.info.is_main,
                                    resume_step=self.start_step if self.checkpoint else None,
                                    report_to=cfg.report_to, config=to_dict(cfg))
        if self.info.is_main:
            with open(os.path.join(cfg.output_dir, "run_config.yaml"), "w") as fh:
                yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)

    def close(self) -> None:
        """Close the logger.  The process group is left by :func:`run_command` once the run's
        models and optimizer are gone (see ``distributed.teardown``)."""
        self.logger.close()


def command_body(name: str, argv: list[str] | None, body: Callable[[], int]) -> int:
    """Run ``body()`` as ``rlhf <name>``: a :class:`~rlhf.config.UserError` prints one line
    ``rlhf <name>: error: ...`` on stderr and returns 2 (the traceback too with ``--debug`` or
    ``RLHF_DEBUG=1``); a multi-process failure (a peer died or timed out) prints one line naming
    this rank and step and returns 1; anything else (a bug) propagates with its traceback.  In
    every case the process group is left in an order that cannot hang."""
    import traceback

    from .config import debug_requested
    from .distributed import describe_failure, teardown
    from .optional import set_command

    debug = debug_requested(argv)
    set_command(name)
    try:
        code = body()
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"rlhf {name}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        teardown(e)
        return 2
    except BaseException as e:
        message = describe_failure(e)
        if message is None:
            teardown(e)
            raise
        if debug:
            traceback.print_exc()
        print(f"rlhf {name}: error: {message}", file=sys.stderr, flush=True)
        # A peer is gone: the group cannot be left cleanly (its barrier would wait for the dead).
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
    teardown()
    return code


def run_command(cfg_cls: type, train_fn, argv: list[str] | None, name: str, description: str) -> int:
    """Body of every ``rlhf <name>`` command: parse the config (YAML + overrides), train, and print
    the last logged metrics once (on rank 0 under torchrun)."""
    from .config import parse_config

    def body() -> int:
        cfg = parse_config(cfg_cls, argv, prog=f"rlhf {name}", description=description)
        last = train_fn(cfg)  # the run's models and optimizer are freed when it returns
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{name} done:", {k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()})
        return 0

    return command_body(name, argv, body)

