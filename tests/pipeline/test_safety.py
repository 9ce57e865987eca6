"""Nothing lost, nothing executed: checkpoints load without running code, a folder holding another run
is refused, pruning removes only this run's checkpoints, a corrupt newest checkpoint is skipped on
``--resume``, files are fsynced before the rename that publishes a checkpoint, and a full disk is
named in one line with the earlier checkpoints intact."""

import errno
import os
import random
import re

import numpy as np
import pytest
import torch

from rlhf import checkpoint as ckpt
from rlhf.metrics_log import read_metrics
from rlhf.sft import SFTConfig, train_sft

from .helpers import write_jsonl
from .test_trainers import COMMON, sft_records


class Payload:
    """Unpickling this calls ``open(marker, "w")``, creating the marker: a stand-in for ``os.system``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker, keep=None):
    """Overwrite ``path`` with a pickle (torch.save format) whose loading would create ``marker``."""
    obj = dict(keep or {})
    obj["payload"] = Payload(marker)
    torch.save(obj, path)


def _cfg(tmp_path, model, out="out", **kw):
    data = write_jsonl(tmp_path / "d.jsonl", sft_records("prompt_completion"))
    base = dict(model=model, dataset=data, output_dir=str(tmp_path / out), lr=5e-3, max_steps=6, save_steps=2,
                save_total_limit=0, eval_fraction=0.0, **{**COMMON, "lr_scheduler": "cosine"})
    return SFTConfig(**{**base, **kw})


def _main(argv):
    from rlhf.cli import main

    return main(argv)


def _cli(cfg, *extra):
    return ["sft", "--model", cfg.model, "--dataset", cfg.dataset, "--output-dir", cfg.output_dir,
            "--max-steps", str(cfg.max_steps), "--save-steps", str(cfg.save_steps), "--save-total-limit",
            str(cfg.save_total_limit), "--eval-fraction", "0", "--no-progress-bar", "--max-length", "16",
            "--per-device-batch-size", "8", "--logging-steps", "1", "--lr", str(cfg.lr), "--warmup-steps",
            str(cfg.warmup_steps), "--lr-scheduler", cfg.lr_scheduler, *extra]


# ---------------------------------------------------------------------------------------------- security


def test_rng_state_roundtrips_through_weights_only_load(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.random(), np.random.randn(), torch.rand(1)  # move every generator
    np.random.standard_normal()  # numpy's cached Gaussian is part of its state
    path = tmp_path / "rng.pt"
    torch.save(ckpt.rng_state(), path)
    expected = (random.random(), float(np.random.randn()), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ckpt.set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), float(np.random.randn()), float(torch.rand(1))) == expected


@pytest.mark.parametrize("target", ["trainer_state.pt", "rng_state_0.pt"])
def test_planted_pickle_payload_is_never_executed_on_resume(tmp_path, tiny_models, target, capsys):
    cfg = _cfg(tmp_path, tiny_models["llama"], max_steps=4)
    train_sft(cfg)
    marker = tmp_path / "PWNED"
    newest = os.path.join(cfg.output_dir, "checkpoint-4")
    _plant(os.path.join(newest, target), marker)
    code = _main(_cli(cfg, "--resume", "--max-steps", "6"))
    assert not marker.exists(), "the checkpoint ran code on --resume"
    err = capsys.readouterr().err
    # it fell back to checkpoint-2 and said why checkpoint-4 was skipped
    assert code == 0, err
    assert re.search(rf"skipped checkpoint-4 .*{re.escape(target)} holds something other than tensors", err), err
    assert "resuming from checkpoint-2" in err


def test_planted_payload_in_the_only_checkpoint_fails_resume_with_one_line(tmp_path, tiny_models, capsys):
    cfg = _cfg(tmp_path, tiny_models["llama"], max_steps=4, save_steps=3)  # only checkpoint-3 (and final 4)
    train_sft(cfg)
    marker = tmp_path / "PWNED"
    for step in (3, 4):
        _plant(os.path.join(cfg.output_dir, f"checkpoint-{step}", "trainer_state.pt"), marker)
    capsys.readouterr()
    assert _main(_cli(cfg, "--resume")) == 2
    assert not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf sft: error: --resume: no checkpoint in"), err
    assert "checkpoint-4: trainer_state.pt holds something other than tensors" in err[0]


def test_load_training_state_refuses_a_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    (tmp_path / "c").mkdir()
    _plant(tmp_path / "c" / "trainer_state.pt", marker)
    with pytest.raises(ckpt.CheckpointError, match="holds something other than tensors"):
        ckpt.load_training_state(str(tmp_path / "c"), None, None, ckpt.DistInfo())
    assert not marker.exists()


def test_rlhf_ppo_resume_never_runs_a_planted_payload(tmp_path, tiny_models, capsys):
    model, out = tiny_models["llama"], str(tmp_path / "ppo")
    argv = ["ppo", "--model", model, "--reward-model", model, "--output-dir", out, "--rollout-batch-size", "8",
            "--mini-batch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "4", "--eval-prompts", "8",
            "--kernel-backend", "reference", "--no-progress-bar", "--max-steps", "3", "--save-steps", "1"]
    assert _main(argv) == 0  # checkpoint-1, checkpoint-2
    marker = tmp_path / "PWNED"
    _plant(os.path.join(out, "checkpoint-2", "trainer_state.pt"), marker)
    _plant(os.path.join(out, "checkpoint-1", "rng_state_0.pt"), marker)
    capsys.readouterr()
    assert _main(argv + ["--resume"]) == 2
    assert not marker.exists(), "rlhf ppo --resume ran code from a checkpoint"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint-2: trainer_state.pt holds something other than tensors" in err[0], err
    assert "checkpoint-1: rng_state_0.pt holds something other than tensors" in err[0], err


# ---------------------------------------------------------------------------------------------- folders


def test_a_folder_holding_a_run_is_refused(tmp_path, tiny_models, capsys):
    cfg = _cfg(tmp_path, tiny_models["llama"], max_steps=2, save_steps=0)
    train_sft(cfg)
    before = {n: os.path.getmtime(os.path.join(cfg.output_dir, n)) for n in os.listdir(cfg.output_dir)}
    metrics = read_metrics(cfg.output_dir)
    capsys.readouterr()
    assert _main(_cli(cfg)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a previous run" in err[0] and "--overwrite-output-dir" in err[0], err
    assert {n: os.path.getmtime(os.path.join(cfg.output_dir, n)) for n in os.listdir(cfg.output_dir)} == before
    assert read_metrics(cfg.output_dir) == metrics
    # asked for explicitly: a new run over it
    assert _main(_cli(cfg, "--overwrite-output-dir", "--max-steps", "3")) == 0
    assert [r["step"] for r in read_metrics(cfg.output_dir) if "loss" in r] == [1, 2, 3]


def test_an_empty_existing_folder_is_fine(tmp_path, tiny_models):
    cfg = _cfg(tmp_path, tiny_models["llama"], max_steps=1, save_steps=0)
    os.makedirs(cfg.output_dir)
    train_sft(cfg)
    assert os.path.exists(os.path.join(cfg.output_dir, "model.safetensors"))


def test_pruning_removes_only_this_runs_checkpoints(tmp_path, tiny_models):
    old = _cfg(tmp_path, tiny_models["llama"], max_steps=8, save_steps=4, save_total_limit=2)
    train_sft(old)  # the old run: checkpoint-4, checkpoint-8
    assert sorted(os.listdir(old.output_dir)).count("checkpoint-8") == 1
    new = _cfg(tmp_path, tiny_models["llama"], max_steps=6, save_steps=2, save_total_limit=2,
               overwrite_output_dir=True)
    train_sft(new)  # writes 2, 4, 6 and keeps its own two newest
    names = sorted(n for n in os.listdir(new.output_dir) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    own = ckpt.folder_run_id(new.output_dir)
    assert ckpt.checkpoint_run_id(os.path.join(new.output_dir, "checkpoint-8")) != own  # the old run's, kept
    assert ckpt.checkpoint_run_id(os.path.join(new.output_dir, "checkpoint-6")) == own
    # and --resume continues the new run (checkpoint-6), never the old run's higher-numbered one
    assert ckpt.latest_checkpoint(new.output_dir).endswith("checkpoint-6")


# ---------------------------------------------------------------------------------------------- corruption


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_models, capsys):
    # a constant schedule: a run of 4 steps continued to 6 is the same as a run of 6
    straight = _cfg(tmp_path, tiny_models["llama"], out="straight", max_steps=6, save_steps=2,
                    lr_scheduler="constant")
    train_sft(straight)
    cfg = _cfg(tmp_path, tiny_models["llama"], out="cut", max_steps=4, save_steps=2, lr_scheduler="constant")
    train_sft(cfg)  # checkpoint-2, checkpoint-4
    weights = os.path.join(cfg.output_dir, "checkpoint-4", "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    assert _main(_cli(cfg, "--resume", "--max-steps", "6")) == 0
    err = capsys.readouterr().err
    assert "skipped checkpoint-4" in err and "model.safetensors is truncated or corrupt" in err, err
    assert "resuming from checkpoint-2" in err
    # resumed from step 2: the same result as the uninterrupted run
    a = [r for r in read_metrics(straight.output_dir) if "loss" in r]
    b = [r for r in read_metrics(cfg.output_dir) if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), ra["step"]


def test_truncated_trainer_state_is_skipped(tmp_path, tiny_models):
    cfg = _cfg(tmp_path, tiny_models["llama"], max_steps=4, save_steps=2)
    train_sft(cfg)
    state = os.path.join(cfg.output_dir, "checkpoint-4", "trainer_state.pt")
    with open(state, "r+b") as fh:
        fh.truncate(100)
    assert ckpt.check_checkpoint(os.path.dirname(state)).startswith("trainer_state.pt is truncated or corrupt")
    assert ckpt.resume_checkpoint(cfg.output_dir, announce=False).endswith("checkpoint-2")


def test_files_are_fsynced_before_the_rename_that_publishes(tmp_path, tiny_models, monkeypatch):
    cfg = _cfg(tmp_path, tiny_models["llama"], max_steps=2, save_steps=1)
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd))
        return real_fsync(fd)

    def rename(a, b, *args, **kw):
        events.append(("rename", str(a), str(b)))
        return real_rename(a, b, *args, **kw)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "rename", rename)
    train_sft(cfg)
    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2].endswith("checkpoint-1"))
    synced = {os.path.basename(e[1]) for e in events[:publish] if e[0] == "fsync" and ".tmp-checkpoint-1" in str(e[1])}
    assert {"trainer_state.pt", "rng_state_0.pt", "model.safetensors", ".tmp-checkpoint-1"} <= synced, synced
    # the folder holding the rename is synced after it
    assert any(e[0] == "fsync" and os.path.abspath(str(e[1])) == os.path.abspath(cfg.output_dir)
               for e in events[publish:])


# ---------------------------------------------------------------------------------------------- disk full


def _enospc_oserror(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _enospc_torch(*a, **k):  # the form torch's zip writer raises on a short write
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1200")


@pytest.mark.parametrize("fail", [_enospc_oserror, _enospc_torch], ids=["OSError", "inline_container"])
def test_disk_full_while_writing_a_checkpoint(tmp_path, tiny_models, monkeypatch, capsys, fail):
    cfg = _cfg(tmp_path, tiny_models["llama"], max_steps=4, save_steps=2)
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, path, *a, **k):  # the second checkpoint's trainer_state.pt hits the full disk
        if str(path).endswith("trainer_state.pt.partial"):
            calls["n"] += 1
            if calls["n"] == 2:
                fail()
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", save)
    assert _main(_cli(cfg)) == 2
    err = capsys.readouterr().err  # (transformers' load/save progress bars come before)
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == \
        f"rlhf sft: error: no space left on device while writing checkpoint-4 in {cfg.output_dir}", err
    names = sorted(os.listdir(cfg.output_dir))
    assert not [n for n in names if n.startswith(".tmp")], names  # the temporary folder is removed
    assert "checkpoint-2" in names and ckpt.check_checkpoint(os.path.join(cfg.output_dir, "checkpoint-2")) is None
