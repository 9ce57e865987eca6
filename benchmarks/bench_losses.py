"""kl_penalty (k3), ppo_policy_loss and ppo_value_loss on [B, T] per-token tensors.

Providers: every rlhf_kernels backend that runs here; ``eager`` = the formulas as TRL/verl write
them (a chain of elementwise ops and masked means, with the ``clipfrac``/``approx_kl`` statistics
they log); ``torch_compile`` = ``torch.compile`` of the reference implementation.  Liger-Kernel has
no kernel for these ops.

Minimum traffic (one kernel per direction): forward reads every input once (fp32, mask 1 byte) and
writes the output; backward reads the upstream gradient and the inputs the derivative needs and
writes the gradient; full = both.
"""

from __future__ import annotations

import sys

import torch

import common
import rlhf_kernels as rk
from rlhf_kernels import reference as ref

CLIP = 0.2
T_LEN = 1024


def _shapes(cfg):
    if cfg.quick:
        return [{"B": 4, "T": 256}]
    return [{"B": n // T_LEN, "T": T_LEN} for n in (16384, 262144)]


def _dtypes(cfg):
    return [torch.float32]


def _mask(b, t, device):
    lengths = torch.randint(t // 2, t + 1, (b,), device=device)
    return torch.arange(t, device=device).unsqueeze(0) < lengths.unsqueeze(1)


# --- kl_penalty ------------------------------------------------------------------------------------

def _kl_inputs(shape, dtype, device):
    b, t = shape["B"], shape["T"]
    lp = (-torch.rand(b, t, device=device) * 5).to(dtype).requires_grad_()
    ref_lp = (lp.detach() + 0.3 * torch.randn(b, t, device=device)).to(dtype)
    return common.Inputs({"logprobs": lp, "ref_logprobs": ref_lp}, grad_names=("logprobs",))


def eager_kl_k3(logprobs, ref_logprobs):
    d = logprobs.float() - ref_logprobs.float()
    return torch.exp(-d) - 1 + d


def _kl_compiled():
    f = torch.compile(lambda lp, r: ref.kl_penalty(lp, r, "k3"))
    return lambda inp: f(inp.args["logprobs"], inp.args["ref_logprobs"])


def _kl_floor(shape, dtype, mode):
    n = shape["B"] * shape["T"]
    fwd = n * 4 * 3                   # read 2, write 1
    bwd = n * 4 * 4                   # read grad_out + 2 inputs, write the gradient
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


# --- ppo policy loss -------------------------------------------------------------------------------

def _policy_inputs(shape, dtype, device):
    b, t = shape["B"], shape["T"]
    old = -torch.rand(b, t, device=device) * 5
    lp = (old + 0.2 * torch.randn(b, t, device=device)).to(dtype).requires_grad_()
    adv = torch.randn(b, t, device=device).to(dtype)
    mask = _mask(b, t, device)
    return common.Inputs({"logprobs": lp, "old_logprobs": old.to(dtype), "advantages": adv, "mask": mask},
                         grad_names=("logprobs",))


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1)


def eager_ppo_policy(logprobs, old_logprobs, advantages, mask, clip=CLIP):
    m = mask.float()
    log_ratio = (logprobs.float() - old_logprobs.float()).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = _masked_mean(torch.maximum(unclipped, clipped), m)
    clipfrac = _masked_mean((clipped > unclipped).float(), m).detach()
    approx_kl = _masked_mean(-log_ratio, m).detach()
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def _args(inp, *names):
    return [inp.args[n] for n in names]


_POLICY = ("logprobs", "old_logprobs", "advantages", "mask")


def _policy_compiled():
    f = torch.compile(lambda lp, old, a, m: ref.ppo_policy_loss(lp, old, a, m, CLIP, CLIP, None, "token-mean"))
    return lambda inp: f(*_args(inp, *_POLICY))


def _loss_floor(shape, dtype, mode):
    n = shape["B"] * shape["T"]
    fwd = n * (3 * 4 + 1)             # three fp32 inputs and the mask; the outputs are scalars
    bwd = n * (3 * 4 + 1 + 4)         # the same reads, one fp32 gradient written
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


# --- ppo value loss --------------------------------------------------------------------------------

def _value_inputs(shape, dtype, device):
    b, t = shape["B"], shape["T"]
    old = torch.randn(b, t, device=device)
    values = (old + 0.3 * torch.randn(b, t, device=device)).to(dtype).requires_grad_()
    returns = torch.randn(b, t, device=device).to(dtype)
    mask = _mask(b, t, device)
    return common.Inputs({"values": values, "old_values": old.to(dtype), "returns": returns, "mask": mask},
                         grad_names=("values",))


def eager_ppo_value(values, old_values, returns, mask, clip=CLIP):
    m = mask.float()
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    loss1 = (values - returns) ** 2
    loss2 = (v_clip - returns) ** 2
    loss = 0.5 * _masked_mean(torch.maximum(loss1, loss2), m)
    clipfrac = _masked_mean((loss2 > loss1).float(), m).detach()
    return loss, {"clipfrac": clipfrac}


_VALUE = ("values", "old_values", "returns", "mask")


def _value_compiled():
    f = torch.compile(lambda v, old, r, m: ref.ppo_value_loss(v, old, r, m, CLIP, "token-mean"))
    return lambda inp: f(*_args(inp, *_VALUE))


def _loss_outputs(out):
    loss, stats = out
    return (loss, stats["clipfrac"])


BENCHES = [
    common.OpBench(
        op="kl_penalty",
        shapes=_shapes,
        dtypes=_dtypes,
        make_inputs=_kl_inputs,
        call_backend=lambda inp, b: rk.kl_penalty(inp.args["logprobs"], inp.args["ref_logprobs"],
                                                  estimator="k3", backend=b),
        eager=lambda inp: eager_kl_k3(inp.args["logprobs"], inp.args["ref_logprobs"]),
        floor_bytes=_kl_floor,
        compiled_fn=_kl_compiled,
        small=True,
        atol=1e-5,
        rtol=1e-4,
    ),
    common.OpBench(
        op="ppo_policy_loss",
        shapes=_shapes,
        dtypes=_dtypes,
        make_inputs=_policy_inputs,
        call_backend=lambda inp, b: rk.ppo_policy_loss(*_args(inp, *_POLICY), clip_low=CLIP, backend=b),
        eager=lambda inp: eager_ppo_policy(*_args(inp, *_POLICY)),
        floor_bytes=_loss_floor,
        compiled_fn=_policy_compiled,
        small=True,
        outputs=_loss_outputs,
        atol=1e-5,
        rtol=1e-4,
    ),
    common.OpBench(
        op="ppo_value_loss",
        shapes=_shapes,
        dtypes=_dtypes,
        make_inputs=_value_inputs,
        call_backend=lambda inp, b: rk.ppo_value_loss(*_args(inp, *_VALUE), clip=CLIP, backend=b),
        eager=lambda inp: eager_ppo_value(*_args(inp, *_VALUE)),
        floor_bytes=_loss_floor,
        compiled_fn=_value_compiled,
        small=True,
        outputs=_loss_outputs,
        atol=1e-5,
        rtol=1e-4,
    ),
]


def test_bench(bench_case, run_bench):
    run_bench(bench_case)


if __name__ == "__main__":
    sys.exit(common.script_main(__file__))
