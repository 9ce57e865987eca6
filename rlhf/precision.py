"""Mixed precision that keeps every update: fp32 master weights, bf16/fp16 compute under autocast.

Two options decide it (:class:`rlhf.config.RunConfig`):

- ``dtype``: the *compute* dtype.  ``auto`` is bf16 on CUDA and fp32 elsewhere; ``bfloat16`` or
  ``float16`` runs forward passes under ``torch.autocast`` (matmuls in that dtype, reductions and
  norms in fp32, the fused log-prob head accumulating in fp32) while the weights, their gradients and
  AdamW's state stay fp32.  An update of lr 2e-5 changes an fp32 weight; added to a bf16 weight (8
  significant bits) most such updates round away, which is why the weights are not stored in the
  compute dtype by default.  fp16 compute scales the loss (``torch.amp.GradScaler``) so small
  gradients do not underflow; steps with inf/NaN gradients are skipped and the scale lowered (the
  scale is not checkpointed: a resumed fp16 run starts again from the default scale).
- ``weights_dtype``: the dtype the trained weights are *stored* in.  ``float32`` (default) as above;
  ``bfloat16`` stores them in bf16 (half the memory of weights, gradients and AdamW state, the
  pre-autocast behaviour) and computes in bf16 without autocast: updates smaller than a bf16 weight's
  rounding step are lost.  The final model is saved in the weights' dtype: fp32 unless bf16 storage
  was asked for.

The frozen models (DPO/PPO reference, PPO reward model) are loaded like the trained one (fp32 weights,
same autocast), so at step 0 the policy and its reference give identical log-probs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import UserError

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype ``--dtype`` names on ``device`` (``auto``: bf16 on CUDA, fp32 elsewhere)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got {dtype!r}")
    return DTYPE_NAMES[dtype]


@dataclass
class Precision:
    """How a run computes and stores: ``compute`` (the autocast dtype, or fp32), ``weights`` (the
    dtype every model's parameters are stored in) and the device type autocast runs on."""

    compute: torch.dtype = torch.float32
    weights: torch.dtype = torch.float32
    device_type: str = "cpu"

    @property
    def uses_autocast(self) -> bool:
        return self.compute != self.weights

    def autocast(self):
        """The context every forward pass of the run goes under (a no-op without autocast)."""
        if not self.uses_autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled for fp16 compute over fp32 weights only."""
        enabled = self.compute == torch.float16 and self.weights == torch.float32
        return torch.amp.GradScaler(self.device_type, enabled=enabled)


def resolve_precision(dtype: str = "auto", weights_dtype: str = "float32",
                      device: torch.device | str = "cpu") -> Precision:
    """The :class:`Precision` of ``--dtype`` / ``--weights-dtype`` on ``device``."""
    device = torch.device(device)
    compute = compute_dtype(dtype, device)
    weights = DTYPE_NAMES.get(weights_dtype)
    if weights not in (torch.float32, torch.bfloat16):
        raise UserError(f"--weights-dtype must be float32 or bfloat16, got {weights_dtype!r}")
    if weights == torch.bfloat16:
        if dtype not in ("auto", "bfloat16", "bf16"):
            raise UserError(f"--weights-dtype bfloat16 computes in bf16; it cannot be combined with --dtype {dtype}")
        compute = torch.bfloat16
    return Precision(compute=compute, weights=weights, device_type=device.type)


def precision_of(cfg, device: torch.device) -> Precision:
    return resolve_precision(cfg.dtype, cfg.weights_dtype, device)


def optimizer_step(optimizer, scaler: torch.amp.GradScaler, clip) -> torch.Tensor:
    """Unscale the gradients (fp16), clip them with ``clip()`` (which returns the global norm), step
    and update the scale; returns the norm.  The scaler skips a step whose gradients hold inf/NaN."""
    scaler.unscale_(optimizer)
    norm = clip()
    scaler.step(optimizer)
    scaler.update()
    return norm
