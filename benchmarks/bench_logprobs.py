"""token_logprobs: per-token log-probs from logits [N, V].

Providers: every rlhf_kernels backend that runs here; ``eager`` = what TRL, OpenRLHF and verl do,
``log_softmax(logits.float(), -1).gather(-1, labels)`` (it keeps the fp32 [N, V] log-softmax alive
for backward); ``torch_compile`` = that same defining formula under ``torch.compile`` (the reference
backend computes it in row chunks with a hand-written backward to bound eager memory, a strategy
inductor replaces with its own fusion); ``liger`` = Liger-Kernel's cross entropy with
``reduction="none"`` (minus the per-token loss is the log-prob), where installed.  The peers' own
helpers, each where its package imports: ``trl_selective_log_softmax`` (TRL's
``trl.trainer.utils.selective_log_softmax``: its Triton kernel on CUDA where it qualifies, else a loop
over rows: gather + logsumexp for fp32, log_softmax + gather for bf16/fp16), ``verl_logprobs_from_logits`` (``verl.utils.torch_functional.logprobs_from_logits``,
flash-attn's cross entropy where flash-attn is installed, else log_softmax + gather) and
``openrlhf_log_probs_from_logits`` (``openrlhf.models.utils.log_probs_from_logits``: flash-attn's cross
entropy for fp32 where installed, else gather + a chunked logsumexp; a row loop for bf16/fp16).

Minimum traffic: forward reads the logits once (N V bytes) plus labels and writes N fp32;
backward reads the logits again and writes the gradient; forward + backward = 3 N V bytes.
"""

from __future__ import annotations

import sys

import torch

import common
import rlhf_kernels as rk


def _shapes(cfg):
    if cfg.quick:
        return [{"N": 64, "V": 1000}]
    if cfg.device == "cpu":  # the design's CPU target shape; the GPU shapes take minutes per case on 1 thread
        return [{"N": 2048, "V": 32000}]
    return [{"N": n, "V": v} for n in (4096, 16384) for v in (32000, 128256, 151936)]


def _dtypes(cfg):
    return [torch.bfloat16] if cfg.quick else [torch.bfloat16, torch.float32]


def _inputs(shape, dtype, device):
    n, v = shape["N"], shape["V"]
    logits = (torch.randn(n, v, device=device) * 2.0).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    return common.Inputs({"logits": logits, "labels": labels}, grad_names=("logits",))


def eager_logprobs(logits, labels):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _compiled():
    f = torch.compile(eager_logprobs)
    return lambda inp: f(inp.args["logits"], inp.args["labels"])


def _liger():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss = LigerCrossEntropyLoss(reduction="none")
    # Liger writes the gradient into the logits buffer during the forward (its issue #272): the
    # benchmark inputs are overwritten, which changes no timing; the correctness check comes first.
    # Only its forward values are checked: the backward with reduction="none" is timed as it is.
    return lambda inp: -loss(inp.args["logits"], inp.args["labels"])


def _trl():
    from trl.trainer.utils import selective_log_softmax

    return lambda inp: selective_log_softmax(inp.args["logits"], inp.args["labels"])


def _verl():
    from verl.utils.torch_functional import logprobs_from_logits

    return lambda inp: logprobs_from_logits(inp.args["logits"], inp.args["labels"])


def _openrlhf():
    from openrlhf.models.utils import log_probs_from_logits

    return lambda inp: log_probs_from_logits(inp.args["logits"], inp.args["labels"])


def _floor(shape, dtype, mode):
    n, v = shape["N"], shape["V"]
    s = torch.finfo(dtype).bits // 8
    small = n * (8 + 4)
    return {"forward": n * v * s + small, "backward": 2 * n * v * s + small, "full": 3 * n * v * s + 2 * small}[mode]


BENCHES = [
    common.OpBench(
        op="token_logprobs",
        shapes=_shapes,
        dtypes=_dtypes,
        make_inputs=_inputs,
        call_backend=lambda inp, b: rk.token_logprobs(inp.args["logits"], inp.args["labels"], backend=b),
        eager=lambda inp: eager_logprobs(inp.args["logits"], inp.args["labels"]),
        floor_bytes=_floor,
        compiled_fn=_compiled,
        liger_fn=_liger,
        atol=2e-3,
        # Liger and TRL may round their result to the input dtype (bf16: 8 bits of mantissa)
        provider_tol={"liger": (1e-2, 1e-2), "trl_selective_log_softmax": (1e-2, 1e-2),
                      "verl_logprobs_from_logits": (1e-2, 1e-2), "openrlhf_log_probs_from_logits": (1e-2, 1e-2)},
        peers={
            "trl_selective_log_softmax": ("trl.trainer.utils", _trl),
            "verl_logprobs_from_logits": ("verl.utils.torch_functional", _verl),
            "openrlhf_log_probs_from_logits": ("openrlhf.models.utils", _openrlhf),
        },
    )
]


def test_bench(bench_case, run_bench):
    run_bench(bench_case)


if __name__ == "__main__":
    sys.exit(common.script_main(__file__))
