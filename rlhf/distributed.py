"""Data parallelism with ``torchrun``: DDP over gloo on CPU, NCCL on GPU; a no-op in one process.

Launch any trainer as ``torchrun --nproc_per_node=N -m rlhf <command> ...``.  Every rank reads the
same data and takes its own slice of each global batch (see ``trainer_utils.rank_slice``), so the
loss curve does not depend on the number of processes for a fixed global batch.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# Where this process is, for the message of a failed multi-process run ("rank 1 of 2 at step 7").
_WHERE = {"step": None, "timeout": None}


def set_step(step: int | None) -> None:
    """Record the (1-based) optimizer step this process is running, for error messages."""
    _WHERE["step"] = step


class PeerError(RuntimeError):
    """A multi-process run lost a peer (it died, or did not answer within the timeout)."""


def describe_failure(exc: BaseException) -> str | None:
    """A one-line message naming this rank and step when ``exc`` is a process-group failure of a
    multi-process run (a peer died, never joined, or timed out); None for anything else."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    dist_errors = tuple(getattr(dist, n) for n in ("DistError",) if hasattr(dist, n))
    text = " ".join(str(exc).split())
    if not (isinstance(exc, (PeerError, *dist_errors)) or (
            isinstance(exc, RuntimeError) and any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection",
                                                                      "connection", "Timed out", "timed out")))):
        return None
    rank = int(os.environ.get("RANK", "0"))
    step = _WHERE["step"]
    where = f"at step {step}" if step is not None else "before training started"
    timeout = _WHERE["timeout"]
    limit = f" within --ddp-timeout {timeout:g} s" if timeout else ""
    return (f"rank {rank} of {world} {where}: another process failed or did not answer{limit} "
            f"({type(exc).__name__}: {text[:300]})")


def init_distributed(device: torch.device, timeout: float | None = None) -> DistInfo:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1); pick this rank's device.

    ``timeout`` (seconds) bounds how long this process waits for the others, when joining and in
    every collective, so a run whose peer died or never arrived fails instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    _WHERE["timeout"] = timeout
    set_step(None)
    if world > 1 and not dist.is_initialized():
        kw = {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kw)
        except Exception as e:  # the store or a peer never answered
            raise PeerError(f"could not join the process group of {world} processes: "
                            f"{' '.join(str(e).split())[:300]}") from e
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when running distributed, else ``model``."""
    if not info.enabled:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; identity in one process)."""
    t = t.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def masked_whiten_global(x: torch.Tensor, mask: torch.Tensor, *, backend: str = "auto",
                         eps: float = 1e-8) -> torch.Tensor:
    """``rlhf_kernels.masked_whiten`` with the mean and unbiased variance taken over the valid
    entries of every rank, so advantages are whitened over the whole global batch (as one process
    would) rather than per rank.  In one process it is ``rlhf_kernels.masked_whiten`` itself."""
    import rlhf_kernels as rk

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rk.masked_whiten(x, mask, backend=backend)
    mask = mask.bool()
    xf = torch.where(mask, x.float(), 0.0)
    sums = all_reduce_sum(torch.stack([xf.sum(), mask.sum().float()]))
    count = sums[1]
    mean = sums[0] / count.clamp(min=1)
    centered = torch.where(mask, xf - mean, 0.0)
    sq = all_reduce_sum((centered * centered).sum())
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), sq)  # Bessel, as masked_whiten
    return torch.where(mask, centered * torch.rsqrt(var + eps), 0.0).to(x.dtype)


def all_gather_cat(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate the first dim of ``t`` from every rank (rank r contributes ``sizes[r]`` rows)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    width = max(sizes)
    padded = torch.zeros((width,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group.  Call it only after every DDP model, optimizer and pending
    collective of the run is gone (see :func:`teardown`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def teardown(exc: BaseException | None = None) -> None:
    """End a run's use of the process group, in an order that cannot deadlock: the frames of the
    run (which hold the DDP wrapper, its reducer and the optimizer) are dropped first, pending work
    is collected, and only then is the group destroyed.  (Destroying the group while a DDP model
    is still alive left its reducer to free the gloo process group later, from a thread holding the
    GIL while gloo's worker thread waited for it: a run that finished and never exited.)"""
    if exc is not None and exc.__traceback__ is not None:
        import traceback

        traceback.clear_frames(exc.__traceback__)  # the locals of the failed run, not the line numbers
    gc.collect()
    cleanup()
    gc.collect()
