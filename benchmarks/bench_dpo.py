"""dpo_loss (sigmoid) on [B] summed sequence log-probs of chosen and rejected completions.

Providers: every rlhf_kernels backend that runs here; ``eager`` = the formula as TRL writes it
(log-ratios, ``-logsigmoid(beta * h)``, detached rewards); ``torch_compile`` = ``torch.compile`` of
the reference implementation.  Liger-Kernel's DPO loss is fused with the LM head
(``LigerFusedLinearDPOLoss``), a different computation, so it is not a provider here.

The op is a few elementwise operations on B numbers: launch overhead dominates on GPU, which is
why CUDA graph replays are timed too.  Minimum traffic: read four fp32 [B], write three.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import common
import rlhf_kernels as rk
from rlhf_kernels import reference as ref

BETA = 0.1
_NAMES = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")


def _shapes(cfg):
    if cfg.quick:
        return [{"B": 64}]
    return [{"B": 256}, {"B": 16384}]


def _inputs(shape, dtype, device):
    b = shape["B"]
    args = {n: (-torch.rand(b, device=device) * 200).to(dtype) for n in _NAMES}
    args["policy_chosen"].requires_grad_()
    args["policy_rejected"].requires_grad_()
    return common.Inputs(args, grad_names=("policy_chosen", "policy_rejected"))


def eager_dpo(pc, pr, rc, rr, beta=BETA):
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    logits = chosen_logratios - rejected_logratios
    losses = -F.logsigmoid(beta * logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _compiled():
    f = torch.compile(lambda pc, pr, rc, rr: ref.dpo_loss(pc, pr, rc, rr, BETA, "sigmoid", 0.0))
    return lambda inp: f(*[inp.args[n] for n in _NAMES])


def _floor(shape, dtype, mode):
    b = shape["B"]
    fwd = b * 4 * (4 + 3)
    bwd = b * 4 * (1 + 4 + 2)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


BENCHES = [
    common.OpBench(
        op="dpo_loss",
        shapes=_shapes,
        dtypes=lambda cfg: [torch.float32],
        make_inputs=_inputs,
        call_backend=lambda inp, b: rk.dpo_loss(*[inp.args[n] for n in _NAMES], beta=BETA, backend=b),
        eager=lambda inp: eager_dpo(*[inp.args[n] for n in _NAMES]),
        floor_bytes=_floor,
        compiled_fn=_compiled,
        small=True,
        outputs=lambda out: tuple(out),
        atol=1e-5,
        rtol=1e-4,
    )
]


def test_bench(bench_case, run_bench):
    run_bench(bench_case)


if __name__ == "__main__":
    sys.exit(common.script_main(__file__))
