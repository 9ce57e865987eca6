"""Metrics: a JSONL file always (``<output_dir>/metrics.jsonl``, one record per log call), the same
scalars to TensorBoard (``<output_dir>/tensorboard``) and/or Weights & Biases with ``--report-to``, and a
progress bar on long loops.  Only the main process writes or reports."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """``log(step, metrics)`` appends ``{"step": step, **metrics}`` to metrics.jsonl and sends the
    numeric values to the ``report_to`` targets (``tensorboard``, ``wandb``; see
    :func:`rlhf.config.report_targets`).

    With ``resume_step`` set, records after that step (from the run that was interrupted) are dropped
    first, so the file reads as one uninterrupted run.  ``config`` (a dict of the run's settings) goes
    to wandb as the run's config.  A target whose package is missing is an error
    (:func:`rlhf.optional.required`), raised before any training.
    """

    def __init__(self, output_dir: str, enabled: bool = True, resume_step: int | None = None,
                 report_to: str | list[str] = "none", config: dict[str, Any] | None = None):
        from .config import report_targets

        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.targets = report_targets(report_to) if isinstance(report_to, str) else list(report_to)
        self.tb = None
        self.wandb_run = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in kept)
        from .optional import required

        if "tensorboard" in self.targets:
            required("tensorboard", "--report-to tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=
                                    resume_step + 1 if resume_step is not None else None)
        if "wandb" in self.targets:
            wandb = required("wandb", "--report-to wandb")
            self.wandb_run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "rlhf"),
                dir=output_dir,
                mode=os.environ.get("WANDB_MODE") or None,
                config=config or {},
            )

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            scalars = {k: v for k, v in record.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if self.tb is not None:
                for k, v in scalars.items():
                    self.tb.add_scalar(k, v, step)
            if self.wandb_run is not None and scalars:
                self.wandb_run.log(scalars, step=step)
        return record

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (or of ``<dir>/metrics.jsonl``)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class Progress:
    """A tqdm bar on the main process when stderr is a terminal; otherwise a line every ~10%."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True):
        self.total, self.n, self.desc, self.enabled = total, initial, desc, enabled
        self.bar = None
        self._last_print = initial
        self._t0 = time.time()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, postfix: dict[str, Any] | None = None) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{_plain(v):.4g}" if isinstance(_plain(v), float) else v
                                      for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)
        elif self.n == self.total or self.n - self._last_print >= max(1, self.total // 10):
            self._last_print = self.n
            extra = " ".join(f"{k}={_plain(v):.4g}" for k, v in (postfix or {}).items()
                             if isinstance(_plain(v), (int, float)))
            print(f"[{self.desc}] step {self.n}/{self.total} ({time.time() - self._t0:.0f}s) {extra}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
