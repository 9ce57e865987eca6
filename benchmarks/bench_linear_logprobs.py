"""linear_token_logprobs: per-token log-probs straight from hidden states [N, H] and the LM head [V, H].

Providers: every rlhf_kernels backend of ``linear_token_logprobs`` that runs here; ``eager`` =
``hidden @ W.T``, ``log_softmax``, ``gather`` (the [N, V] logits and log-softmax exist); ``torch_compile``
= that formula under ``torch.compile``; ``trl_chunked`` = TRL's ``ChunkedLogProbFunction`` (TRL 1.16's
fused LM head) where ``trl.kernels.chunked_logprob`` imports (its backward imports
``trl.trainer.utils``, which needs pandas, accelerate and datasets: ``pip install --no-deps trl`` then
``pip install -c <file pinning torch> pandas accelerate datasets``), with the chunk size TRL's trainers use (32768);
``liger_flce`` = Liger's fused linear cross entropy (``reduction="none"``) and ``cce`` = Apple's Cut
Cross-Entropy, where installed, on CUDA only (both need a GPU; on CPU they are recorded as skipped,
with the reason).

Every provider is first checked against the reference backend (values, and the three gradients at the
test shape).  Each provider then runs in a fresh subprocess: the inputs are built, one forward +
backward is done as a warm-up (compilation included), then ``--repeats`` timed forward + backward
calls (the median is reported) and the extra peak memory of one call: on CPU the growth of the
process's peak resident set (``VmHWM`` reset through ``/proc/self/clear_refs``, after
``malloc_trim``: ``benchmarks/common.py``'s method), on CUDA ``max_memory_allocated`` minus the
memory before the call; also that peak less the gradients the call returns (d hidden and d weight,
which every provider must allocate: 517 MB at the CPU shape), the working memory the issue's "extra
memory" target is about.  Rows (``op=linear_token_logprobs``, ``mode=full``) go to
``benchmarks/results/<device>.jsonl`` like every other script's.

    python benchmarks/bench_linear_logprobs.py                      # CPU: N=4096 H=1024 V=128256 fp32
    python benchmarks/bench_linear_logprobs.py --device cuda        # N=16384 H=4096 V=128256 bf16
    python benchmarks/bench_linear_logprobs.py --quick              # tiny shape, proves it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common
import torch

import rlhf_kernels as rk

TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


def shape_for(device: str, quick: bool) -> dict:
    if quick:
        return {"N": 96, "H": 32, "V": 1000, "dtype": "float32"}
    if device == "cuda":
        return {"N": 16384, "H": 4096, "V": 128256, "dtype": "bfloat16"}
    return {"N": 4096, "H": 1024, "V": 128256, "dtype": "float32"}


def make_inputs(shape: dict, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, shape["dtype"])
    n, h, v = shape["N"], shape["H"], shape["V"]
    hidden = (torch.randn(n, h, generator=g) / h ** 0.25).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.25).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[: n // 8] = -100  # a prompt: ignored positions, as in a training batch
    return hidden, weight, labels


def eager(hidden, weight, labels):
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    valid = labels != -100
    out = logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    return out * valid


def _trl_module():
    """TRL's chunked log-prob module (its backward imports ``trl.trainer.utils``, so trl's own
    dependencies must be importable: pandas, accelerate, datasets)."""
    import importlib

    return importlib.import_module("trl.kernels.chunked_logprob")


def _trl(hidden, weight, labels):
    mod = _trl_module()
    valid = labels != -100
    lp = mod.ChunkedLogProbFunction.apply(hidden[valid], weight, None, labels[valid], 1.0, TRL_CHUNK, None, 1.0, ())[0]
    return lp.new_zeros(labels.shape).masked_scatter(valid, lp)


def _liger(hidden, weight, labels):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    loss = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, labels, None, None, -100, 0.0, 0.0, "none")
    return -(loss[0] if isinstance(loss, tuple) else loss)


def _cce(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, labels, reduction="none", ignore_index=-100).float()


def providers(device: str) -> dict[str, str | None]:
    """provider -> None (runs here) or the reason it is skipped."""
    out: dict[str, str | None] = {}
    for b in rk.BACKEND_NAMES:
        if b == "auto":
            continue
        if device == "cpu" and b == "triton":
            out[f"rk_{b}"] = "triton runs on CPU tensors only in the interpreter (not a benchmark)"
            continue
        try:
            from rlhf_kernels._dispatch import resolve

            resolve("linear_token_logprobs", b, torch.device(device), (torch.float32,))
            out[f"rk_{b}"] = None
        except Exception as e:  # noqa: BLE001 - the reason is recorded
            out[f"rk_{b}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    out["eager"] = None
    out["torch_compile"] = None
    try:
        _trl_module()
        out["trl_chunked"] = None
    except Exception as e:  # noqa: BLE001
        out["trl_chunked"] = f"trl.kernels.chunked_logprob not importable ({type(e).__name__}: {e})"
    for name, mod in (("liger_flce", "liger_kernel"), ("cce", "cut_cross_entropy")):
        if device != "cuda":
            out[name] = "GPU only (its kernels need CUDA)"
            continue
        try:
            __import__(mod)
            out[name] = None
        except Exception as e:  # noqa: BLE001
            out[name] = f"{mod} not installed ({type(e).__name__})"
    return out


def provider_fn(name: str):
    if name.startswith("rk_"):
        b = name[3:]
        return lambda h, w, lab: rk.linear_token_logprobs(h, w, lab, backend=b)
    if name == "eager":
        return eager
    if name == "torch_compile":
        return torch.compile(eager)
    return {"trl_chunked": _trl, "liger_flce": _liger, "cce": _cce}[name]


def check(name: str, device: str) -> None:
    """Values and gradients of ``name`` equal the reference backend's at a small shape."""
    shape = {"N": 64, "H": 48, "V": 3001, "dtype": "float32" if device == "cpu" else "bfloat16"}
    fn = provider_fn(name)
    results = []
    for f in (fn, lambda h, w, lab: rk.linear_token_logprobs(h, w, lab, backend="reference")):
        h, w, lab = make_inputs(shape, device, seed=1)
        lp = f(h, w, lab).float()
        gh, gw = torch.autograd.grad((lp * torch.linspace(0.5, 1.5, lp.numel(), device=device)).sum(), (h, w))
        results.append((lp.detach(), gh.float(), gw.float()))
    tol = {"rtol": 1e-4, "atol": 1e-4} if device == "cpu" else {"rtol": 2e-2, "atol": 2e-2}
    for got, want, what in zip(results[0], results[1], ("logprobs", "grad hidden", "grad weight")):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, what=what: f"{name} {what}: {m}")


def child(args) -> dict:
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = json.loads(args.shape)
    check(args.child, device)
    fn = provider_fn(args.child)
    hidden, weight, labels = make_inputs(shape, device)

    def step():
        hidden.grad = weight.grad = None
        lp = fn(hidden, weight, labels)
        lp.sum().backward()

    step()  # warm-up (and compilation)
    times = []
    for _ in range(args.repeats):
        common.sync(device)
        t0 = time.perf_counter()
        step()
        common.sync(device)
        times.append(time.perf_counter() - t0)
    # The gradients every provider must return (d hidden, d weight) are part of its extra peak; their
    # size is reported too, so the working memory beyond them can be compared.
    grad_mb = sum(t.numel() * t.element_size() for t in (hidden, weight)) / 2**20
    hidden.grad = weight.grad = None
    if device == "cuda":
        mem = common.gpu_peak_extra_mb(step)
    else:
        mem = common.cpu_peak_extra_mb(step)
    return {"time_ms": statistics.median(times) * 1e3, "times_ms": [t * 1e3 for t in times], "peak_extra_mb": mem,
            "grad_mb": grad_mb}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed forward+backward calls (default 2 CPU, 10 GPU)")
    p.add_argument("--only", default="", help="comma-separated providers")
    p.add_argument("--results-dir", default=str(common.DEFAULT_RESULTS_DIR))
    p.add_argument("--run-id", default=None)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per provider")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or common.default_device()
    if args.repeats is None:
        args.repeats = 1 if args.quick else (2 if args.device == "cpu" else 10)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    cfg = common.Config(device=args.device, quick=args.quick, threads=args.threads,
                        results_dir=Path(args.results_dir), run_id=args.run_id or common.new_run_id(),
                        record=not args.no_record)
    common.apply_threads(cfg)
    rec = common.Recorder(cfg)
    shape = shape_for(args.device, args.quick)
    base = {"op": "linear_token_logprobs", "shape": {k: shape[k] for k in "NHV"},
            "shape_str": f"N={shape['N']} H={shape['H']} V={shape['V']}", "dtype": shape["dtype"], "mode": "full"}
    only = {s for s in args.only.split(",") if s}
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(common.ROOT), env.get("PYTHONPATH", "")])
    results = {}
    print(f"run {cfg.run_id}: linear_token_logprobs forward+backward, {base['shape_str']} {shape['dtype']} "
          f"on {rec.env['device_name']}", flush=True)
    for name, skip in providers(args.device).items():
        if only and name not in only:
            continue
        if skip is not None:
            rec.row(**base, provider=name, metric="skipped", value=None, unit="", reason=skip)
            print(f"  {name:14s} skipped: {skip}", flush=True)
            continue
        cmd = [sys.executable, __file__, "--child", name, "--shape", json.dumps(shape), "--device", args.device,
               "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
        try:
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                                 check=False)
            lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
            if run.returncode != 0 or not lines:
                raise RuntimeError((run.stderr or run.stdout).strip().splitlines()[-1][:300])
            r = json.loads(lines[-1][7:])
        except Exception as e:  # noqa: BLE001 - a failing provider is recorded, the others still run
            reason = "timeout" if isinstance(e, subprocess.TimeoutExpired) else str(e)
            rec.row(**base, provider=name, metric="failed", value=None, unit="", reason=reason)
            print(f"  {name:14s} FAILED: {reason}", flush=True)
            continue
        results[name] = r
        rec.row(**base, provider=name, metric="time_ms", value=r["time_ms"], unit="ms", timer="wall_median"
                if args.device == "cpu" else "cuda_synced_wall_median", repeats=args.repeats)
        if r["peak_extra_mb"] is not None:
            rec.row(**base, provider=name, metric="peak_extra_mb", value=r["peak_extra_mb"], unit="MB")
            rec.row(**base, provider=name, metric="peak_extra_beyond_grads_mb",
                    value=max(0.0, r["peak_extra_mb"] - r["grad_mb"]), unit="MB", grad_mb=r["grad_mb"])
        print(f"  {name:14s} {r['time_ms']:10.1f} ms  extra peak {r['peak_extra_mb'] if r['peak_extra_mb'] is not None else float('nan'):9.1f} MB",
              flush=True)
    if "eager" in results:
        e = results["eager"]
        print("ratios to eager (time; extra peak memory, and the same beyond the returned gradients); and time "
              "to TRL's chunked function:")

        def ratio(a, b):
            return "n/a" if a is None or not b else f"{a / b:.3f}"

        def beyond(r):
            return None if r["peak_extra_mb"] is None else max(0.0, r["peak_extra_mb"] - r["grad_mb"])

        for name, r in results.items():
            trl = results.get("trl_chunked")
            vs_trl = f"  time/trl {r['time_ms'] / trl['time_ms']:.2f}" if trl else ""
            print(f"  {name:14s} time/eager {r['time_ms'] / e['time_ms']:.2f}  "
                  f"mem/eager {ratio(r['peak_extra_mb'], e['peak_extra_mb'])}  "
                  f"beyond-grads/eager {ratio(beyond(r), beyond(e))}{vs_trl}")
    print(f"rows in {rec.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
