"""Checkpoints: Hugging Face folders (``save_pretrained``) plus the trainer state, written atomically.

Layout under ``output_dir``::

    checkpoint-<step>/     model + tokenizer (save_pretrained), trainer_state.pt (optimizer,
                           scheduler, step), rng_state_<rank>.pt (every RNG, per process), run_id
    config.json, model.safetensors, tokenizer files   the final model (``save_final``)
    .rlhf_run              the id of the run that owns the folder

A checkpoint is written into ``.tmp-checkpoint-<step>``, every file is fsynced, and the folder is
renamed when complete, so a run killed mid-write never leaves a half checkpoint that ``--resume``
would pick up.  Everything is stored as tensors and plain Python values and loaded with
``torch.load(weights_only=True)``: a checkpoint cannot run code.  ``--resume`` takes the newest
checkpoint of the folder's run that loads completely, and says which newer ones it skipped and why.
Pruning (``save_total_limit``) only removes checkpoints of the run that is writing.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import sys
import uuid

import numpy as np
import torch

from .config import UserError
from .distributed import DistInfo, barrier
from .models import unwrap

_CKPT = re.compile(r"^checkpoint-(\d+)$")
RUN_FILE = ".rlhf_run"
STAMP = "run_id"
LEGACY = "legacy"  # checkpoints and folders written before runs had ids


class CheckpointError(UserError):
    """A checkpoint could not be written or read; the message names it and why."""


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Which run owns a folder and its checkpoints


def holds_run(output_dir: str) -> bool:
    """Whether ``output_dir`` holds the results of a previous run: logged metrics, a model, a
    checkpoint or a report.  (A run that failed before its first step leaves nothing to protect.)"""
    if not os.path.isdir(output_dir):
        return False
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if _CKPT.match(name) or name in ("config.json", "model.safetensors", "model.safetensors.index.json",
                                         "pytorch_model.bin", "report.json", "trainer_state.pt"):
            return True
        if name == "metrics.jsonl" and os.path.getsize(path) > 0:
            return True
    return False


def folder_run_id(output_dir: str) -> str | None:
    try:
        with open(os.path.join(output_dir, RUN_FILE)) as fh:
            return fh.read().strip() or LEGACY
    except FileNotFoundError:
        return None


def start_run(output_dir: str, resume: bool) -> str:
    """Claim ``output_dir`` for this run (main process): a new id, or on ``resume`` the folder's
    (a folder from before run ids gets ``legacy``, which its unstamped checkpoints share)."""
    current = folder_run_id(output_dir)
    run_id = (current or LEGACY) if resume else uuid.uuid4().hex
    if run_id != current:
        _write_durably(os.path.join(output_dir, RUN_FILE), run_id + "\n")
    return run_id


def checkpoint_run_id(path: str) -> str:
    try:
        with open(os.path.join(path, STAMP)) as fh:
            return fh.read().strip() or LEGACY
    except FileNotFoundError:
        return LEGACY


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


def run_checkpoints(output_dir: str, run_id: str | None = None) -> list[tuple[int, str]]:
    """:func:`list_checkpoints` written by run ``run_id`` (default: the run owning the folder)."""
    run_id = run_id or folder_run_id(output_dir) or LEGACY
    return [(s, p) for s, p in list_checkpoints(output_dir) if checkpoint_run_id(p) == run_id]


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the newest complete checkpoint of the folder's run, or None."""
    found = run_checkpoints(output_dir)
    return found[-1][1] if found else None


def _load(path: str):
    """``torch.load(weights_only=True)``: tensors and plain values only, never code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def check_checkpoint(path: str) -> str | None:
    """None when every file of checkpoint ``path`` loads; else the reason it cannot be resumed."""
    import pickle

    state = None
    for root, _, files in os.walk(path):
        for name in sorted(files):
            f = os.path.join(root, name)
            rel = os.path.relpath(f, path)
            try:
                if name.endswith((".pt", ".bin")):
                    obj = _load(f)
                    if rel == "trainer_state.pt":
                        state = obj
                elif name.endswith(".safetensors"):
                    from safetensors import safe_open

                    with safe_open(f, framework="pt") as st:
                        for key in st.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                            st.get_slice(key)
            except pickle.UnpicklingError as e:
                return (f"{rel} holds something other than tensors and plain values, refused "
                        f"(weights_only load: {' '.join(str(e).split()[:12])} ...)")
            except Exception as e:  # noqa: BLE001 - a short read, a bad zip or safetensors header, ...
                return f"{rel} is truncated or corrupt ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    if not (isinstance(state, dict) and {"step", "optimizer", "scheduler"} <= set(state)):
        return "trainer_state.pt lacks step/optimizer/scheduler"
    return None


def resume_checkpoint(output_dir: str, announce: bool = True) -> str | None:
    """The newest checkpoint of the folder's run that loads completely (None when it has none).

    Newer ones that do not load are skipped with a message saying why; when every checkpoint
    fails, :class:`CheckpointError` lists them."""
    found = run_checkpoints(output_dir)
    skipped = []
    for _, path in reversed(found):
        reason = check_checkpoint(path)
        if reason is None:
            if skipped and announce:
                for name, why in skipped:
                    print(f"--resume: skipped {name} in {output_dir}: {why}", file=sys.stderr, flush=True)
                print(f"--resume: resuming from {os.path.basename(path)}", file=sys.stderr, flush=True)
            return path
        skipped.append((os.path.basename(path), reason))
    if skipped:
        raise CheckpointError(f"--resume: no checkpoint in {output_dir} can be loaded: "
                              + "; ".join(f"{n}: {w}" for n, w in skipped))
    return None


# --------------------------------------------------------------------------------------------
# Writing


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_tree(path: str) -> None:
    """fsync every file and folder under ``path`` (the folder itself last)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _save(obj, path: str) -> None:
    torch.save(obj, path)
    _fsync(path)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk: ENOSPC / EDQUOT, or the ``unexpected
    pos`` / ``file write failed`` RuntimeError torch's zip writer raises when a write comes up short."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        text = str(exc)
        if "No space left on device" in text or "unexpected pos" in text or "file write failed" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def save_checkpoint(output_dir: str, step: int, model, tokenizer, optimizer, scheduler, info: DistInfo,
                    extra: dict | None = None, total_limit: int = 2) -> str:
    """Write ``checkpoint-<step>`` atomically (all ranks must call this); returns its path.

    Every file is fsynced before the rename that publishes the checkpoint.  On a full disk the
    temporary folder is removed, earlier checkpoints are untouched, and :class:`CheckpointError`
    says so.  Then at most ``total_limit`` checkpoints of this run are kept (0: all)."""
    name = f"checkpoint-{step}"
    final = os.path.join(output_dir, name)
    tmp = os.path.join(output_dir, f".tmp-{name}")
    try:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            unwrap(model).save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            _save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "world_size": info.world_size, "extra": extra or {}},
                  os.path.join(tmp, "trainer_state.pt.partial"))
            _write_durably(os.path.join(tmp, STAMP), (folder_run_id(output_dir) or LEGACY) + "\n")
        barrier()
        _save(rng_state(), os.path.join(tmp, f"rng_state_{info.rank}.pt"))
        barrier()
        if info.is_main:
            # trainer_state.pt is what marks a checkpoint complete; write it last, then rename the folder.
            os.replace(os.path.join(tmp, "trainer_state.pt.partial"), os.path.join(tmp, "trainer_state.pt"))
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            _fsync(output_dir)
    except Exception as e:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise CheckpointError(f"no space left on device while writing {name} in {output_dir}") from e
        raise
    if info.is_main and total_limit > 0:
        for _, old in run_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_training_state(path: str, optimizer, scheduler, info: DistInfo) -> tuple[int, dict]:
    """Restore optimizer, scheduler and this rank's RNG from a checkpoint; returns (step, extra).

    The model weights are loaded separately, with ``from_pretrained(path)``."""
    import pickle

    def load(name):
        try:
            return _load(os.path.join(path, name))
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{os.path.join(path, name)} holds something other than tensors and plain "
                                  f"values; refusing to load it ({' '.join(str(e).split()[:12])} ...)") from e
        except Exception as e:
            raise CheckpointError(f"{os.path.join(path, name)} cannot be loaded ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:200]})") from e

    state = load("trainer_state.pt")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if os.path.exists(os.path.join(path, f"rng_state_{info.rank}.pt")):
        set_rng_state(load(f"rng_state_{info.rank}.pt"))
    return int(state["step"]), state.get("extra", {})


def save_final(output_dir: str, model, tokenizer, info: DistInfo, merge_adapters: bool = False) -> None:
    """``save_pretrained`` the model and tokenizer into ``output_dir`` (files moved in when complete).

    The weights are saved in the dtype they are stored in (fp32 master weights unless
    ``--weights-dtype bfloat16``).  A peft model saves its adapter folder; with ``merge_adapters``
    the adapters are merged into the weights first (in place: call this last) and a plain
    ``from_pretrained`` folder is saved."""
    if info.is_main:
        tmp = os.path.join(output_dir, ".tmp-final")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        inner = unwrap(model)
        if merge_adapters and hasattr(inner, "merge_and_unload"):
            inner = inner.merge_and_unload()
        else:
            stale = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin") \
                if hasattr(inner, "peft_config") else ("adapter_config.json", "adapter_model.safetensors")
            for name in stale:  # left by an earlier run over this folder: the new model must be unambiguous
                if os.path.exists(os.path.join(output_dir, name)):
                    os.remove(os.path.join(output_dir, name))
        inner.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        os.rmdir(tmp)
    barrier()
