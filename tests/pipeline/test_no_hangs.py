"""No silent hangs: a multi-process run whose peer dies, or never arrives, fails within a bounded time
with a message naming the rank (and the step), instead of waiting forever.

The two processes are started by hand (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``,
as torchrun sets them) rather than by torchrun, whose agent would kill the survivor itself."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from rlhf.metrics_log import read_metrics

from .helpers import write_jsonl
from .test_trainers import sft_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(rank: int, world: int, port: int, argv: list[str], cwd: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
           "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RLHF_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "rlhf", *argv], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _sft_argv(tmp_path, model, out, timeout):
    data = write_jsonl(tmp_path / "d.jsonl", sft_records("prompt_completion", 64))
    return ["sft", "--model", model, "--dataset", data, "--output-dir", str(out), "--max-steps", "100000",
            "--per-device-batch-size", "2", "--max-length", "16", "--eval-fraction", "0", "--logging-steps", "1",
            "--no-progress-bar", "--ddp-timeout", str(timeout)]


def test_a_killed_peer_ends_the_run_naming_rank_and_step(tmp_path, tiny_models):
    out = tmp_path / "out"
    argv = _sft_argv(tmp_path, tiny_models["llama"], out, timeout=20)
    port = _port()
    procs = [_start(r, 2, port, argv, str(tmp_path)) for r in (0, 1)]
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").exists() or len(read_metrics(str(out))) < 2:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)  # rank 1 dies mid-run
        t0 = time.time()
        _, err = procs[0].communicate(timeout=120)  # bounded: it must not wait forever
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode not in (0, None), err
    assert waited < 60, waited
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlhf sft: error: rank 0 of 2 at step "), err[-2000:]
    assert "another process failed or did not answer" in last


def test_a_peer_that_never_arrives_fails_within_the_timeout(tmp_path, tiny_models):
    argv = _sft_argv(tmp_path, tiny_models["llama"], tmp_path / "out", timeout=5)
    t0 = time.time()
    proc = _start(0, 2, _port(), argv, str(tmp_path))  # rank 1 is never started
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode not in (0, None)
    assert time.time() - t0 < 90
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlhf sft: error: rank 0 of 2 before training started:"), err[-2000:]
    assert "--ddp-timeout 5 s" in last


@pytest.mark.parametrize("trainer", ["sft", "reward", "dpo", "ppo"])
def test_run_command_leaves_the_group_after_the_model_is_gone(trainer, monkeypatch):
    """The order that cannot deadlock: the DDP model and optimizer are freed (the trainer's frame
    returned and was collected) before the process group is destroyed."""
    import gc
    import weakref

    import torch

    from rlhf import distributed

    module = __import__(f"rlhf.{trainer}", fromlist=["main"])
    alive = {}

    class Model(torch.nn.Module):
        pass

    def fake_train(cfg):
        model = Model()
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        model.cycle = model  # a reference cycle: only the garbage collector frees it
        alive["model"], alive["optimizer"] = weakref.ref(model), weakref.ref(optimizer)
        return {}

    order = []
    monkeypatch.setattr(module, f"train_{trainer}", fake_train)
    monkeypatch.setattr(distributed, "cleanup", lambda: order.append(
        ("destroy", alive["model"]() is None, alive["optimizer"]() is None)))
    gc.disable()
    try:
        assert module.main(["--output-dir", "unused"]) == 0
    finally:
        gc.enable()
    assert order == [("destroy", True, True)]
