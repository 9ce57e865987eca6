"""Peak memory of one SFT, DPO and PPO learning step on CPU: fused (no logits) vs whole logits vs sliced logits.

The trainers now take log-probs straight from the hidden states (``--path fused``:
``rlhf.models.token_logprobs`` and ``rlhf.actor_critic.ActorCritic`` call
``rlhf_kernels.linear_token_logprobs`` with the LM head's weight; the ``[B, T, V]`` logits never exist).
``--path logits`` (alias ``whole``) is the computation they replaced, kept here to measure it:

The trainers pass the model's whole logits ``[B, T, V]`` to ``rlhf_kernels.token_logprobs`` with the
labels shifted and padded with -100 (``rlhf.models.token_logprobs`` / ``response_logprobs``).  The
old path sliced the logits first (``logits[:, :-1]``, PPO ``logits[:, -R-1:-1]``): the slice's
backward allocates a zero-filled ``[B, T, V]`` gradient and copies the sliced gradient into it.
The sliced path is kept here only, behind ``--path sliced``, to measure the difference.

Each (step, path) runs in a fresh subprocess: a tiny Llama (vocabulary 32000, width 64, 2 layers) is
built, one batch of 8 sequences x 128 tokens is made, and one learning step runs (forward, loss,
backward, AdamW step).  Reported: the process's peak resident set (``ru_maxrss``) minus its resident
set just before the step, i.e. the memory the step itself needed at its peak.

    python benchmarks/step_memory.py            # the table (9 subprocesses, ~1 minute on 1 thread)
    # the 128k-vocabulary Llama of the README (4 layers, width 256, batch 8 x 256), DPO and PPO:
    python benchmarks/step_memory.py --vocab 128256 --width 256 --layers 4 --seq 256 --cases dpo,ppo --paths logits,fused
    python benchmarks/step_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = ("sft", "dpo", "ppo")
PATHS = ("sliced", "logits", "fused")
ALIASES = {"whole": "logits"}  # the name of the logits path before the trainers went fused


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _model(vocab: int, width: int, layers: int, seq: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _child(args) -> dict:
    """One learning step; returns the peak memory it added."""
    import torch

    import rlhf_kernels as rk
    from rlhf.actor_critic import ActorCritic
    from rlhf.data import IGNORE_INDEX, position_ids_from_mask
    from rlhf.models import logits_logprobs, response_logprobs, token_logprobs

    torch.set_num_threads(args.threads)
    path = ALIASES.get(args.path, args.path)
    sliced = path == "sliced"
    B, T, V = args.batch, args.seq, args.vocab
    model = _model(V, args.width, args.layers, T)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, V, (B, T), generator=g)
    attention_mask = torch.ones_like(input_ids)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "position_ids": position_ids_from_mask(attention_mask)}
    prompt = T // 2
    labels = input_ids.clone()
    labels[:, :prompt] = IGNORE_INDEX  # the completion is the second half
    batch["labels"] = labels
    backend = args.backend

    def seq_logprobs(m):
        """``[B, T-1]`` per-token log-probs of the labels (the SFT / DPO computation)."""
        if path == "fused":  # the trainers' code: hidden states -> linear_token_logprobs
            return token_logprobs(m, batch, backend=backend)
        logits = m(input_ids=input_ids, attention_mask=attention_mask, position_ids=batch["position_ids"],
                   use_cache=False).logits
        if path == "logits":  # whole logits, shifted labels
            return logits_logprobs(logits, labels, backend=backend)[:, :-1]
        return rk.token_logprobs(logits[:, :-1], labels[:, 1:], backend=backend)

    if args.case == "ppo":
        module = ActorCritic(model)  # value head on the policy, as --value-model policy_head
    else:
        module = model
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    # Adam's state is allocated at the first step: take one step before measuring, so that the
    # measured step is a steady-state step of training.
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    before = _rss_bytes()
    t0 = time.perf_counter()
    if args.case == "sft":
        lp = seq_logprobs(model)
        loss = -lp.sum() / (labels[:, 1:] != IGNORE_INDEX).sum()
    elif args.case == "dpo":  # B sequences = B/2 (chosen, rejected) pairs; reference log-probs precomputed
        seq = seq_logprobs(model).sum(-1)
        ref = seq.detach() + torch.randn(B, generator=g)
        losses, _, _ = rk.dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=0.1, backend=backend)
        loss = losses.mean()
    else:  # one PPO minibatch: the response is the second half
        R = T - prompt
        resp_labels = labels[:, prompt:]
        if path == "fused":  # the trainers' code: the actor-critic never makes logits
            logprobs, _, values = module(input_ids, attention_mask, batch["position_ids"], resp_labels,
                                         backend=backend)
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=batch["position_ids"],
                        use_cache=False, output_hidden_states=True)
            values = module.value_head(out.hidden_states[-1][:, -R - 1:-1]).squeeze(-1).float()
            if sliced:
                logprobs, _ = rk.token_logprobs(out.logits[:, -R - 1:-1], resp_labels, return_entropy=True,
                                                backend=backend)
            else:
                logprobs, _ = response_logprobs(out.logits, resp_labels, backend=backend, return_entropy=True)
        mask = resp_labels != IGNORE_INDEX
        old = logprobs.detach() + 0.01 * torch.randn(B, R, generator=g)
        adv = torch.randn(B, R, generator=g)
        pg, _ = rk.ppo_policy_loss(logprobs, old, adv, mask, backend=backend)
        vf, _ = rk.ppo_value_loss(values, values.detach() + 0.1, adv, mask, backend=backend)
        loss = pg + 0.1 * vf  # the entropy is computed (as PPO logs it) but not trained on
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"case": args.case, "path": args.path, "step_peak_mib": (peak - before) / 2**20,
            "process_peak_mib": peak / 2**20, "seconds": seconds, "loss": loss.item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=CASES, help="run one case in this process (used by the driver)")
    p.add_argument("--path", choices=PATHS + tuple(ALIASES), default="fused",
                   help="fused: the trainers' code (log-probs from hidden states, no logits); logits (alias "
                        "whole): the whole logits with shifted labels; sliced: the logits sliced first")
    p.add_argument("--paths", default="sliced,logits,fused", help="the paths the table compares (driver)")
    p.add_argument("--cases", default=",".join(CASES), help="the steps the table runs (driver)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="auto", help="rlhf_kernels backend")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_child(args)))
        return 0
    shape = ["--vocab", str(args.vocab), "--width", str(args.width), "--layers", str(args.layers),
             "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
             "--backend", args.backend]
    paths = [ALIASES.get(x, x) for x in args.paths.split(",") if x]
    cases = [c for c in args.cases.split(",") if c]
    results = []
    for case in cases:
        for path in paths:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", case, "--path", path, *shape],
                                 check=True, capture_output=True, text=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    n_logits = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"one learning step, tiny Llama V={args.vocab} width={args.width} layers={args.layers}, "
          f"batch {args.batch} x {args.seq}, fp32 logits {n_logits:.0f} MiB, backend {args.backend}, "
          f"{args.threads} thread(s)")
    print("| step | " + " | ".join(f"{x}: peak MiB" for x in paths) + " | " + " | ".join(f"{x} s" for x in paths) + " |")
    print("|---" * (1 + 2 * len(paths)) + "|")
    by = {(r["case"], r["path"]): r for r in results}
    for case in cases:
        rs = [by[case, x] for x in paths]
        print(f"| {case} | " + " | ".join(f"{r['step_peak_mib']:.0f}" for r in rs) + " | "
              + " | ".join(f"{r['seconds']:.2f}" for r in rs) + " |")
        for r in rs[1:]:
            if abs(r["loss"] - rs[0]["loss"]) > 1e-3 * max(1.0, abs(rs[0]["loss"])):
                raise SystemExit(f"{case}: the paths disagree on the loss ({rs[0]['loss']} vs {r['loss']})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
