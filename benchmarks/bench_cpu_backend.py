"""CPU backend against eager PyTorch, as ratios measured in one run (same process, same load).

    python benchmarks/bench_cpu_backend.py [--threads N] [--json out.json] [--quick]

- gae: the C++ reverse scan vs the Python loop over time steps the way TRL, OpenRLHF and verl
  compute it (B = 256, T = 1024).
- token_logprobs: the fused C++ kernel vs eager ``log_softmax(logits.float() / T, -1).gather(...)``
  at N = 2048, V = 32000 fp32, forward and forward + backward, with the peak extra memory each
  allocates (measured by the CPU allocator profiler) beside the size of the logits.

Times are medians over repeats; each ratio pairs runs interleaved in the same loop so a noisy,
shared machine slows both sides alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import rlhf_kernels as rk


def python_loop_gae(rewards, values, mask, gamma, lam):
    """GAE as TRL / OpenRLHF / verl write it: a Python loop over time, right-padded batches."""
    values = values * mask
    rewards = rewards * mask
    lastgaelam = 0
    advantages_reversed = []
    T = rewards.shape[-1]
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def eager_token_logprobs(logits, labels, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def paired_times(fns: dict, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_extra_bytes(fn) -> int:
    """Peak CPU memory allocated by torch during fn (beyond what was live before)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Walk the ops in start order with the memory each allocates itself (net of its own frees, not
    # counting children), keeping a running total: a peak at op granularity.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run, not the acceptance shapes)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if rk.available_backends("gae", "cpu")["cpu"] is not None:
        raise SystemExit(f"cpu backend unavailable: {rk.available_backends('gae', 'cpu')['cpu']}")
    rows = []
    B, T = (64, 256) if args.quick else (256, 1024)
    g = torch.Generator().manual_seed(0)
    r = torch.randn(B, T, generator=g)
    v = torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    m = torch.arange(T)[None] < lengths[:, None]
    a_loop, _ = python_loop_gae(r, v, m.float(), 0.99, 0.95)
    a_cpu, _ = rk.gae(r, v, m, gamma=0.99, lam=0.95, backend="cpu")
    err = (torch.where(m, a_loop, 0.0) - a_cpu).abs().max().item()
    t = paired_times({"python_loop": lambda: python_loop_gae(r, v, m.float(), 0.99, 0.95),
                      "cpu": lambda: rk.gae(r, v, m, gamma=0.99, lam=0.95, backend="cpu")}, args.repeats)
    rows.append({"op": "gae", "shape": f"B={B},T={T}", "baseline": "python loop over T",
                 "baseline_ms": t["python_loop"] * 1e3, "cpu_ms": t["cpu"] * 1e3,
                 "speedup": t["python_loop"] / t["cpu"], "max_abs_diff": err})

    N, V = (256, 32000) if args.quick else (2048, 32000)
    logits = torch.randn(N, V, generator=g) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    ref = eager_token_logprobs(logits, labels)
    out = rk.token_logprobs(logits, labels, backend="cpu")
    err = (ref - out).abs().max().item()
    t = paired_times({"eager": lambda: eager_token_logprobs(logits, labels),
                      "cpu": lambda: rk.token_logprobs(logits, labels, backend="cpu")}, args.repeats)
    rows.append({"op": "token_logprobs fwd", "shape": f"N={N},V={V} fp32", "baseline": "eager log_softmax.gather",
                 "baseline_ms": t["eager"] * 1e3, "cpu_ms": t["cpu"] * 1e3, "speedup": t["eager"] / t["cpu"],
                 "max_abs_diff": err})

    x = logits.clone().requires_grad_(True)
    w = torch.randn(N, generator=g)

    def eager_fb():
        x.grad = None
        (eager_token_logprobs(x, labels) * w).sum().backward()

    def cpu_fb():
        x.grad = None
        (rk.token_logprobs(x, labels, backend="cpu") * w).sum().backward()

    t = paired_times({"eager": eager_fb, "cpu": cpu_fb}, args.repeats)
    grad_bytes = logits.numel() * logits.element_size()
    # Extra memory: the peak allocated during forward + backward beyond the logits gradient itself.
    x.grad = None
    mem_eager = peak_extra_bytes(lambda: (eager_token_logprobs(x, labels) * w).sum().backward()) - grad_bytes
    x.grad = None
    mem_cpu = peak_extra_bytes(lambda: (rk.token_logprobs(x, labels, backend="cpu") * w).sum().backward()) - grad_bytes
    rows.append({"op": "token_logprobs fwd+bwd", "shape": f"N={N},V={V} fp32", "baseline": "eager log_softmax.gather",
                 "baseline_ms": t["eager"] * 1e3, "cpu_ms": t["cpu"] * 1e3, "speedup": t["eager"] / t["cpu"],
                 "baseline_extra_MB": mem_eager / 2**20, "cpu_extra_MB": mem_cpu / 2**20,
                 "extra_memory_ratio": mem_cpu / max(mem_eager, 1)})

    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
            platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "extension": rk._extension.build_info()}
    print(f"torch {meta['torch']}, {meta['threads']} threads, {meta['date']}")
    for row in rows:
        extra = ""
        if "extra_memory_ratio" in row:
            extra = (f"  extra memory {row['cpu_extra_MB'] * 1024:.1f} KB vs eager {row['baseline_extra_MB']:.1f} MB "
                     f"({100 * row['extra_memory_ratio']:.4f}%)")
        print(f"{row['op']:<24} {row['shape']:<20} {row['baseline']}: {row['baseline_ms']:9.2f} ms   "
              f"cpu: {row['cpu_ms']:8.2f} ms   speedup {row['speedup']:6.1f}x{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
