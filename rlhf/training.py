"""The training skeleton of SFT, the reward model and DPO, written once.

A trainer is a :class:`Trainer` subclass that says only what is its own: how records become
examples (:meth:`Trainer.tokenize`), which model it trains (:meth:`Trainer.load_model`), the loss on
a micro-batch (:meth:`Trainer.loss`), what a global batch is normalised by (:meth:`Trainer.normalizer`)
and its evaluation (:meth:`Trainer.evaluate`).  :meth:`Trainer.train` runs the rest, in this order:

1. the run (:class:`~rlhf.trainer_utils.RunContext`: processes, device, seed, output folder, resume
   point, tokenizer, logger);
2. the records and their split (:func:`~rlhf.trainer_utils.load_records_for`), tokenized;
3. :meth:`Trainer.prepare` (DPO: the reference log-probs), then the model (:meth:`Trainer.after_load`:
   DPO with LoRA takes the reference log-probs here, adapters disabled), wrapped in DDP;
   every forward pass runs under the compute dtype's autocast over fp32 weights (:mod:`rlhf.precision`);
4. AdamW and the learning-rate schedule, restored from the checkpoint when resuming;
5. the step loop (:func:`train_loop`): gradient accumulation over micro-batches, clipping, logging,
   periodic evaluation and checkpoints; then the final evaluation and the final save.

PPO samples its batches instead of reading them, so it keeps its own loop (:mod:`rlhf.ppo`) on the
same run setup and the same cadence helpers (``log_due``, ``due``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from .checkpoint import save_checkpoint, save_final
from .distributed import DistInfo, all_reduce_sum, set_step, wrap_ddp
from .metrics_log import MetricsLogger, Progress
from .models import unwrap
from .precision import Precision, optimizer_step, precision_of
from .trainer_utils import (
    RunContext,
    build_optimizer,
    build_scheduler,
    chunks,
    clip_grad_norm,
    due,
    global_batch_indices,
    global_batch_size,
    load_records_for,
    log_due,
    rank_slice,
    resume_state,
    total_steps,
)

# A step function: (micro_batch_examples) -> (loss_sum, stat_sums).  loss_sum is a scalar tensor
# with gradient; stat_sums maps metric names to detached scalar sums over the micro-batch.
LossFn = Callable[[list], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def train_loop(
    *,
    cfg,
    info: DistInfo,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    examples: list,
    loss_fn: LossFn,
    normalizer: Callable[[list], float],
    tokenizer,
    logger: MetricsLogger,
    start_step: int = 0,
    eval_fn: Callable[[], dict] | None = None,
    desc: str = "train",
    precision: Precision | None = None,
) -> dict:
    """Run optimizer steps ``start_step`` .. ``total`` and return the last logged metrics.

    Per step: the global batch is fetched, this rank's slice is cut into micro-batches; each
    micro-batch's ``loss_sum / normalizer(global batch) * world_size`` is back-propagated (DDP
    averages over ranks, which undoes the ``* world_size``); gradients are clipped; AdamW steps.
    Logged metrics are ``stat_sums`` reduced over ranks and divided by the normalizer.
    Forward passes (and ``eval_fn``) run under ``precision``'s autocast; with fp16 compute the loss
    is scaled and a step with inf/NaN gradients skipped (:mod:`rlhf.precision`).
    """
    precision = precision or Precision()
    scaler = precision.grad_scaler()
    if eval_fn is not None:
        inner_eval = eval_fn

        def eval_fn():
            with precision.autocast():
                return inner_eval()
    gbs = global_batch_size(cfg, info)
    steps = total_steps(cfg, len(examples), gbs)
    progress = Progress(steps, initial=start_step, desc=desc, enabled=info.is_main and cfg.progress_bar)
    last: dict = {}
    for step in range(start_step, steps):
        set_step(step + 1)
        batch = [examples[i] for i in global_batch_indices(step, len(examples), gbs, cfg.seed)]
        norm = float(normalizer(batch))
        micro = chunks(rank_slice(batch, info), cfg.per_device_batch_size)
        totals: dict[str, torch.Tensor] = {}
        model.train()
        for j, mb in enumerate(micro):
            sync = j == len(micro) - 1 or not hasattr(model, "no_sync")
            with nullcontext() if sync else model.no_sync():
                with precision.autocast():
                    loss_sum, stats = loss_fn(mb)
                scaler.scale(loss_sum / max(norm, 1e-12) * info.world_size).backward()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v.detach().double().cpu()
        grad_norm = optimizer_step(optimizer, scaler, lambda: clip_grad_norm(model, cfg.max_grad_norm))
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        names = sorted(totals)
        reduced = all_reduce_sum(torch.stack([torch.as_tensor(totals[k], dtype=torch.float64) for k in names])) \
            if names else torch.zeros(0)
        metrics = {k: (reduced[i] / max(norm, 1e-12)).item() for i, k in enumerate(names)}
        metrics.update(grad_norm=float(grad_norm), lr=scheduler.get_last_lr()[0],
                       epoch=done * gbs / len(examples))
        progress.update({"loss": metrics.get("loss", float("nan"))})
        if log_due(done, cfg.logging_steps, steps):
            last = logger.log(done, metrics)
        if eval_fn is not None and due(done, cfg.eval_steps, steps):
            evaluated = eval_fn()
            if evaluated:
                logger.log(done, evaluated)
        if due(done, cfg.save_steps, steps):
            save_checkpoint(cfg.output_dir, done, model, tokenizer, optimizer, scheduler, info,
                            total_limit=cfg.save_total_limit)
    progress.close()
    evaluated = eval_fn() if eval_fn is not None else {}
    if evaluated:
        last = {**last, **logger.log(steps, evaluated)}
    if steps > start_step and cfg.save_steps > 0:
        save_checkpoint(cfg.output_dir, steps, model, tokenizer, optimizer, scheduler, info,
                        total_limit=cfg.save_total_limit)
    save_final(cfg.output_dir, model, tokenizer, info, merge_adapters=cfg.merge_adapters)
    return last


class Trainer:
    """One ``rlhf <name>`` training run over a dataset of ``data_kind`` records (see the module doc).

    Subclasses set :attr:`name` and :attr:`data_kind` and implement :meth:`tokenize`,
    :meth:`load_model` and :meth:`loss`; :meth:`normalizer`, :meth:`prepare` and :meth:`evaluate`
    have defaults.  While :meth:`train` runs, ``self.run``, ``self.tokenizer``, ``self.info``,
    ``self.device``, ``self.train_set``, ``self.held_out`` and ``self.model`` (DDP-wrapped when
    there are several processes) are set.
    """

    name = "train"
    """The command's name, shown on the progress bar."""
    data_kind = "sft"
    """The records it trains on: ``sft`` or ``preference`` (see ``load_records_for``)."""

    def __init__(self, cfg):
        self.cfg = cfg

    # ---- what each trainer says for itself

    def tokenize(self, records: list[dict], name: str) -> list[dict]:
        """Examples from ``records`` (``name`` names them in errors)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Work on the tokenized data before the model is loaded (default: none)."""

    def load_model(self) -> torch.nn.Module:
        """The model to train, on ``self.device``, not yet wrapped in DDP, its weights stored in
        ``self.precision.weights`` (see :func:`rlhf.models.trainable_policy`)."""
        raise NotImplementedError

    def after_load(self, model) -> None:
        """Work with the loaded model before it is wrapped and trained (default: none; DPO with LoRA:
        the reference log-probs, adapters disabled)."""

    def loss(self, examples: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the micro-batch ``examples``, with gradient; detached metric sums)."""
        raise NotImplementedError

    def normalizer(self, examples: list[dict]) -> float:
        """What the summed loss of the global batch ``examples`` is divided by (default: examples)."""
        return len(examples)

    def evaluate(self) -> dict:
        """Held-out metrics (default: none)."""
        return {}

    # ---- shared by the trainers

    def gold_metrics(self, n_prompts: int) -> dict:
        """The gold evaluation of the built-in task the dataset names on ``n_prompts`` held-out
        prompts ({} for real data, a task without one, or ``n_prompts`` 0)."""
        from .tasks import get_task

        task = get_task(self.cfg.dataset)
        if task is None or task.evaluate_gold is None or n_prompts <= 0:
            return {}
        return task.evaluate_gold(unwrap(self.model), self.tokenizer, n_prompts, seed=self.cfg.seed)

    def train(self) -> dict:
        """Run the whole training; returns the last logged metrics (with the final evaluation)."""
        cfg = self.cfg
        self.run = run = RunContext(cfg)
        self.tokenizer, self.info, self.device = run.tokenizer, run.info, run.device
        train_records, eval_records = load_records_for(cfg, self.data_kind)
        self.train_set = self.tokenize(train_records, f"dataset {cfg.dataset!r}")
        self.held_out = self.tokenize(eval_records, "eval dataset") if eval_records else []
        self.precision = precision_of(cfg, self.device)
        with self.precision.autocast():
            self.prepare()
        model = self.load_model()
        with self.precision.autocast():
            self.after_load(model)
        self.model = wrap_ddp(model, self.info)
        optimizer = build_optimizer(self.model, cfg)
        scheduler = build_scheduler(optimizer, cfg,
                                    total_steps(cfg, len(self.train_set), global_batch_size(cfg, self.info)))
        start = resume_state(cfg, optimizer, scheduler, self.info, run.checkpoint)
        last = train_loop(cfg=cfg, info=self.info, model=self.model, optimizer=optimizer, scheduler=scheduler,
                          examples=self.train_set, loss_fn=self.loss, normalizer=self.normalizer,
                          tokenizer=self.tokenizer, logger=run.logger, start_step=start,
                          eval_fn=torch.no_grad()(self.evaluate), desc=self.name, precision=self.precision)
        run.close()
        return last
