"""SFT and DPO under ``torchrun --nproc_per_node=2`` on CPU (gloo) give the same loss curve as one
process with the same global batch (2 processes x 2 sequences x 2 accumulation steps = 1 x 8)."""

import os
import subprocess
import sys

import pytest
import torch

from rlhf.dpo import DPOConfig, train_dpo
from rlhf.metrics_log import read_metrics
from rlhf.sft import SFTConfig, train_sft

from .helpers import write_jsonl
from .test_trainers import pref_records, sft_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--max-steps", "4", "--logging-steps", "1", "--lr", "1e-2", "--max-length", "16",
          "--eval-fraction", "0", "--no-progress-bar", "--lr-scheduler", "linear", "--warmup-steps", "1"]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_torchrun_two_processes_match_one(tmp_path, tiny_models, stage):
    from transformers import AutoModelForCausalLM

    records = sft_records("prompt_completion") if stage == "sft" else pref_records("explicit")
    data = write_jsonl(tmp_path / "d.jsonl", records)
    model = tiny_models["llama"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")

    cfg_cls, train = (SFTConfig, train_sft) if stage == "sft" else (DPOConfig, train_dpo)
    train(cfg_cls(model=model, dataset=data, output_dir=one, max_steps=4, logging_steps=1, lr=1e-2,
                  max_length=16, eval_fraction=0.0, progress_bar=False, lr_scheduler="linear", warmup_steps=1,
                  per_device_batch_size=8, gradient_accumulation_steps=1))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "rlhf", stage, "--model", model, "--dataset", data, "--output-dir", two,
           "--per-device-batch-size", "2", "--gradient-accumulation-steps", "2", *COMMON]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    a = [r for r in read_metrics(one) if "loss" in r]
    b = [r for r in read_metrics(two) if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ["loss", "grad_norm"] + (["rewards/chosen", "rewards/accuracies"] if stage == "dpo" else [])
    for ra, rb in zip(a, b):
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k, ra[k], rb[k])
    ma, mb = AutoModelForCausalLM.from_pretrained(one), AutoModelForCausalLM.from_pretrained(two)
    m0 = AutoModelForCausalLM.from_pretrained(model)
    assert not torch.allclose(ma.model.embed_tokens.weight, m0.model.embed_tokens.weight)  # it trained
    # Same weights up to float rounding: the two runs sum gradients in different orders (per rank, then
    # all-reduce), and Adam divides by sqrt(v), so an element whose gradient is ~0 can move by a rounding
    # error's worth of lr (seen: one of 2048 elements 1.2e-5 apart after 4 steps at lr 1e-2, on an
    # AVX-512 machine).  Each tensor's difference must be tiny against how far training moved it.
    s0 = m0.state_dict()
    for (n, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
        moved = float((x - s0[n]).norm())
        assert float((x - y).norm()) <= 1e-3 * moved + 1e-7, (n, float((x - y).norm()), moved)
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=n)


def _whiten_worker(rank: int, world: int, port: int, x: torch.Tensor, mask: torch.Tensor, out: dict):
    import torch.distributed as dist

    from rlhf.distributed import masked_whiten_global

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = x.shape[0] // world
        part = slice(rank * rows, (rank + 1) * rows)
        out[rank] = masked_whiten_global(x[part], mask[part])
    finally:
        dist.destroy_process_group()


def test_advantage_whitening_under_ddp_uses_the_global_batch():
    """Two ranks, each with half of a batch whose halves have very different statistics, must
    whiten exactly as one process whitening the whole batch (float64 truth from the formula)."""
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(3, 7, generator=g) + 5.0, 3.0 * torch.randn(3, 7, generator=g)])
    mask = torch.rand(6, 7, generator=g) > 0.3
    x[~mask] = float("nan")  # never read
    valid = x[mask].double()
    expected = torch.zeros(6, 7, dtype=torch.float64)
    expected[mask] = (valid - valid.mean()) / torch.sqrt(valid.var(unbiased=True) + 1e-8)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_whiten_worker, args=(2, port, x, mask, out), nprocs=2, join=True)
    got = torch.cat([out[0], out[1]])
    assert torch.allclose(got.double(), expected, atol=1e-5), (got, expected)
    # the per-rank whitening this replaces would be visibly different here
    from rlhf_kernels import masked_whiten

    local = torch.cat([masked_whiten(x[:3], mask[:3]), masked_whiten(x[3:], mask[3:])])
    assert not torch.allclose(local.double(), expected, atol=1e-2)
