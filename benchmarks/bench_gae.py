"""gae: advantages and returns [B, T] from rewards, values and a right-padded response mask.

Providers: every rlhf_kernels backend that runs here; ``eager`` = the Python loop over time steps
that TRL, OpenRLHF and verl run (inputs zeroed outside the mask, one step of vector ops per t);
``torch_compile`` is skipped (see ``COMPILE_SKIP``).  No gradient flows through GAE in training
(it runs under ``no_grad`` on rollout data), so only the forward is measured.

Minimum traffic: read rewards, values and the mask once, write advantages and returns (fp32).
"""

from __future__ import annotations

import sys

import torch

import common
import rlhf_kernels as rk

GAMMA, LAM = 1.0, 0.95
COMPILE_SKIP = (
    "torch.compile of the reference unrolls its Python loop over T time steps into one graph "
    "(T=1024: thousands of ops); compiling takes minutes (measured on the dev CPU box: 29 s at T=32, "
    "128 s at T=128), so it is left out"
)


def _shapes(cfg):
    if cfg.quick:
        return [{"B": 8, "T": 64}]
    return [{"B": 256, "T": 1024}, {"B": 512, "T": 2048}]


def _inputs(shape, dtype, device):
    b, t = shape["B"], shape["T"]
    rewards = torch.randn(b, t, device=device).to(dtype)
    values = torch.randn(b, t, device=device).to(dtype)
    lengths = torch.randint(t // 2, t + 1, (b,), device=device)
    mask = torch.arange(t, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    return common.Inputs({"rewards": rewards, "values": values, "mask": mask}, mask=mask)


def eager_gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """The loop peers run: textbook GAE over a right-padded batch, one time step per iteration."""
    m = mask.float()
    r = rewards.float() * m
    v = values.float() * m
    t_len = r.shape[1]
    last = torch.zeros_like(r[:, 0])
    reversed_advs = []
    for t in range(t_len - 1, -1, -1):
        v_next = v[:, t + 1] if t + 1 < t_len else 0.0
        delta = r[:, t] + gamma * v_next - v[:, t]
        last = delta + gamma * lam * last
        reversed_advs.append(last)
    advantages = torch.stack(reversed_advs[::-1], dim=1)
    returns = advantages + v
    return advantages, returns


def _floor(shape, dtype, mode):
    n = shape["B"] * shape["T"]
    s = torch.finfo(dtype).bits // 8
    return n * (2 * s + 1 + 2 * 4)


BENCHES = [
    common.OpBench(
        op="gae",
        shapes=_shapes,
        dtypes=lambda cfg: [torch.float32],
        make_inputs=_inputs,
        call_backend=lambda inp, b: rk.gae(inp.args["rewards"], inp.args["values"], inp.args["mask"],
                                           gamma=GAMMA, lam=LAM, backend=b),
        eager=lambda inp: eager_gae(inp.args["rewards"], inp.args["values"], inp.args["mask"]),
        floor_bytes=_floor,
        modes=("forward",),
        compile_skip_reason=COMPILE_SKIP,
        small=True,
        outputs=lambda out: tuple(out),
        atol=1e-3,
        rtol=1e-4,
    )
]


def test_bench(bench_case, run_bench):
    run_bench(bench_case)


if __name__ == "__main__":
    sys.exit(common.script_main(__file__))
