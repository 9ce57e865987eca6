"""A short, honest tour of rlhf_kernels on random data (no model, no download)."""

from __future__ import annotations

import time

import torch

import rlhf_kernels as rk


def _timed(fn, repeat=3):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_demo(tokens: int = 512, vocab: int = 32000, backend: str = "auto") -> dict:
    torch.manual_seed(0)
    B = 8
    T = max(tokens // B, 1)
    logits = torch.randn(B, T, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (B, T))
    mask = torch.arange(T).expand(B, T) < torch.randint(1, T + 1, (B, 1))

    logprobs, entropy = rk.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    old_logprobs = logprobs.detach() + 0.05 * torch.randn_like(logprobs)
    ref_logprobs = logprobs.detach() + 0.1 * torch.randn_like(logprobs)
    kl = rk.kl_penalty(logprobs.detach(), ref_logprobs, estimator="k1", backend=backend)
    rewards = -0.05 * kl
    rewards[torch.arange(B), mask.sum(1) - 1] += torch.randn(B)
    values = torch.randn(B, T)
    adv, ret = rk.gae(rewards, values, mask, gamma=1.0, lam=0.95, backend=backend)
    adv = rk.masked_whiten(adv, mask)
    pg_loss, stats = rk.ppo_policy_loss(logprobs, old_logprobs, adv, mask, clip_low=0.2, backend=backend)
    pg_loss.backward()

    print(f"rlhf_kernels {rk.__version__} demo: B={B}, T={T}, V={vocab}, backend={backend}")
    print(
        f"  token_logprobs: mean log-prob {rk.masked_mean(logprobs.detach(), mask).item():.3f}, "
        f"mean entropy {rk.masked_mean(entropy.detach(), mask).item():.3f} nats"
    )
    print(f"  kl_penalty(k1): mean {rk.masked_mean(kl, mask).item():.4f}")
    print(f"  gae: advantages whitened, mean return {rk.masked_mean(ret, mask).item():.3f}")
    print(
        f"  ppo_policy_loss: {pg_loss.item():.4f}, clipfrac {stats['clipfrac'].item():.3f}, "
        f"approx_kl {stats['approx_kl'].item():.4f}; d/dlogits norm {logits.grad.norm().item():.3f}"
    )

    # Side by side, in this run: the fused log-prob path against the eager one used by peers.
    x = logits.detach().reshape(-1, vocab)
    y = labels.reshape(-1)
    t_kernel = _timed(lambda: rk.token_logprobs(x, y, backend=backend))
    t_eager = _timed(lambda: torch.log_softmax(x.float(), -1).gather(-1, y[:, None]))
    print(
        f"  forward time, {x.shape[0]} x {vocab} fp32 on CPU: rlhf_kernels {t_kernel * 1e3:.1f} ms, "
        f"eager log_softmax+gather {t_eager * 1e3:.1f} ms (ratio {t_eager / t_kernel:.2f}x)"
    )
    return {"pg_loss": pg_loss.item(), **{k: v.item() for k, v in stats.items()}}
