"""Wall time of one LoRA SFT step and one LoRA DPO step on a real model (default: SmolLM2-135M-Instruct
converted by ``rlhf convert-gguf smollm2``), at B sequences (pairs) x T tokens.

    rlhf convert-gguf smollm2 --output-dir models/smollm2
    PYTHONPATH=. python benchmarks/lora_step_time.py --model models/smollm2 --batch 8 --tokens 256

A step is what the trainers run: the fused log-probs (``rlhf.models.token_logprobs``) of the batch,
the loss, backward, gradient clipping and AdamW over the adapters.  DPO's reference log-probs (one
no-grad pass with the adapters disabled) are timed apart, as the trainer computes them once before
training.  One warm-up step, then the median of ``--repeats`` steps.  Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="compute dtype (autocast over fp32 weights)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-target-modules", default="q_proj,v_proj")
    args = ap.parse_args()

    import rlhf_kernels as rk
    from rlhf.lora import adapters_disabled, apply_lora
    from rlhf.models import load_policy, load_tokenizer, resolve_device, token_logprobs
    from rlhf.precision import resolve_precision
    from rlhf.sft import SFTConfig
    from rlhf.trainer_utils import build_optimizer, clip_grad_norm

    device = resolve_device(args.device)
    precision = resolve_precision(args.dtype, "float32", device)
    cfg = SFTConfig(model=args.model, use_peft=True, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                    lora_target_modules=args.lora_target_modules, lr=1e-4)
    tok = load_tokenizer(args.model)
    model = apply_lora(load_policy(args.model, tok, device), cfg, base_path=args.model)
    optimizer = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)

    def batch(rows: int) -> dict:
        ids = torch.randint(0, len(tok), (rows, args.tokens), generator=g)
        labels = ids.clone()
        labels[:, : args.tokens // 4] = -100  # a prompt quarter, as in completion-only training
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
                "labels": labels.to(device),
                "position_ids": torch.arange(args.tokens, device=device).expand(rows, -1).contiguous()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        times = []
        for i in range(args.repeats + 1):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i:  # the first is the warm-up
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def step(loss_fn):
        with precision.autocast():
            loss = loss_fn()
        loss.backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sft_batch = batch(args.batch)
    sft_s = timed(lambda: step(lambda: -token_logprobs(model, sft_batch).sum() / sft_batch["labels"].ne(-100).sum()))

    pair_batch = batch(2 * args.batch)  # chosen rows then rejected rows

    @torch.no_grad()
    def reference():
        with adapters_disabled(model), precision.autocast():
            return token_logprobs(model, pair_batch).sum(-1)

    ref_s = timed(reference)
    ref = reference()

    def dpo_loss():
        lp = token_logprobs(model, pair_batch).sum(-1)
        losses, _, _ = rk.dpo_loss(lp[: args.batch], lp[args.batch:], ref[: args.batch], ref[args.batch:], beta=0.1)
        return losses.mean()

    dpo_s = timed(lambda: step(dpo_loss))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model": args.model, "device": str(device), "threads": torch.get_num_threads(),
                      "compute_dtype": str(precision.compute).replace("torch.", ""), "batch": args.batch,
                      "tokens": args.tokens, "lora_r": args.lora_r, "targets": args.lora_target_modules,
                      "trainable_params": trainable, "total_params": total, "sft_step_s": round(sft_s, 3),
                      "dpo_step_s": round(dpo_s, 3), "dpo_reference_pass_s": round(ref_s, 3)}))


if __name__ == "__main__":
    main()
