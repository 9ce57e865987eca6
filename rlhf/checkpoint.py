"""Checkpoints: Hugging Face folders (``save_pretrained``) plus the trainer state, written atomically.

Layout under ``output_dir``::

    checkpoint-<step>/     model + tokenizer (save_pretrained), trainer_state.pt (optimizer,
                           scheduler, step, config), rng_state_<rank>.pt (every RNG, per process)
    config.json, model.safetensors, tokenizer files   the final model (``save_final``)

A checkpoint is written into ``.tmp-checkpoint-<step>`` and renamed when complete, so a run killed
mid-write never leaves a half checkpoint that ``--resume`` would pick up.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from .distributed import DistInfo, barrier
from .models import unwrap

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, "trainer_state.pt")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(output_dir: str, step: int, model, tokenizer, optimizer, scheduler, info: DistInfo,
                    extra: dict | None = None, total_limit: int = 2) -> str:
    """Write ``checkpoint-<step>`` atomically (all ranks must call this); returns its path."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        unwrap(model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "world_size": info.world_size, "extra": extra or {}},
                   os.path.join(tmp, "trainer_state.pt.partial"))
    barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{info.rank}.pt"))
    barrier()
    if info.is_main:
        # trainer_state.pt is what marks a checkpoint complete; write it last, then rename the folder.
        os.replace(os.path.join(tmp, "trainer_state.pt.partial"), os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for _, old in list_checkpoints(output_dir)[:-total_limit] if total_limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_training_state(path: str, optimizer, scheduler, info: DistInfo) -> tuple[int, dict]:
    """Restore optimizer, scheduler and this rank's RNG from a checkpoint; returns (step, extra).

    The model weights are loaded separately, with ``from_pretrained(path)``."""
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_path = os.path.join(path, f"rng_state_{info.rank}.pt")
    if os.path.exists(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    return int(state["step"]), state.get("extra", {})


def save_final(output_dir: str, model, tokenizer, info: DistInfo) -> None:
    """``save_pretrained`` the model and tokenizer into ``output_dir`` (files moved in when complete)."""
    if info.is_main:
        tmp = os.path.join(output_dir, ".tmp-final")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        unwrap(model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        os.rmdir(tmp)
    barrier()
