"""Mixed precision that learns (CPU autocast runs bf16 and fp16): with fp32 master weights a small learning
rate moves the weights an fp32 run moves; bf16-stored weights (``--weights-dtype bfloat16``, the old
``--dtype bfloat16``) lose most such updates to rounding.  The fused log-prob head works under autocast
(bf16 hidden states, fp32 head weight), and PPO samples and trains under it."""

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import ConfigError
from rlhf.models import load_policy, load_tokenizer
from rlhf.ppo import PPOConfig, train_ppo
from rlhf.precision import resolve_precision
from rlhf.sft import SFTConfig, train_sft
from rlhf_kernels.integrations.hf import causal_lm_logprobs

from .helpers import write_jsonl
from .test_trainers import pref_records, sft_records


def _fraction_changed(before: dict, after: dict) -> float:
    changed = total = 0
    for name, w in after.items():
        changed += int((w != before[name].to(w.dtype)).sum())
        total += w.numel()
    return changed / total


def test_small_lr_updates_survive_with_fp32_master_weights(tmp_path, tiny_models):
    base = tiny_models["llama"]
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records("prompt_completion"))
    before = load_file(f"{base}/model.safetensors")
    runs = {"fp32": dict(dtype="float32"), "bf16_weights": dict(dtype="bfloat16", weights_dtype="bfloat16"),
            "bf16_autocast": dict(dtype="bfloat16"), "fp16_autocast": dict(dtype="float16")}
    frac, dtypes, loss = {}, {}, {}
    for name, kw in runs.items():
        out = str(tmp_path / name)
        last = train_sft(SFTConfig(model=base, dataset=data, output_dir=out, lr=2e-5, max_steps=3, per_device_batch_size=8,
                                   logging_steps=1, warmup_steps=0, lr_scheduler="constant", progress_bar=False,
                                   max_length=16, eval_fraction=0.0, gold_eval_prompts=0, **kw))
        after = load_file(f"{out}/model.safetensors")
        frac[name], loss[name] = _fraction_changed(before, after), last["loss"]
        dtypes[name] = {w.dtype for w in after.values()}
    # the saved model is fp32 unless bf16 storage was asked for
    assert dtypes == {"fp32": {torch.float32}, "bf16_weights": {torch.bfloat16}, "bf16_autocast": {torch.float32},
                      "fp16_autocast": {torch.float32}}
    assert frac["fp32"] > 0.9, frac  # AdamW's first steps move nearly every weight by ~lr
    assert frac["bf16_weights"] < 0.6 * frac["fp32"], frac  # most updates round away in bf16 storage
    for name in ("bf16_autocast", "fp16_autocast"):
        assert frac[name] >= 0.98 * frac["fp32"], (name, frac)
        # autocast did run: the low-precision forward gives a (slightly) different loss
        assert loss[name] != loss["fp32"] and loss[name] == pytest.approx(loss["fp32"], rel=1e-2)


def test_fused_logprobs_under_autocast_match_the_autocast_logits(tiny_models):
    tok = load_tokenizer(tiny_models["llama"])
    model = load_policy(tiny_models["llama"], tok, "cpu")
    enc = tok(["12+3=15", "7*8=56"], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = causal_lm_logprobs(model, ids, mask)
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16  # the unfused head ran in bf16: the fused one must too
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, 0)
    want = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, labels[..., None]).squeeze(-1) * mask[:, 1:]
    torch.testing.assert_close(fused[:, :-1], want, rtol=0, atol=2e-2)
    fused.sum().backward()  # gradients reach the fp32 master weights in fp32
    head = model.get_output_embeddings().weight
    assert head.dtype == torch.float32 and head.grad is not None and head.grad.dtype == torch.float32
    assert torch.isfinite(head.grad).all() and head.grad.abs().sum() > 0


def test_ppo_samples_and_trains_under_bf16_autocast(tmp_path, tiny_models):
    base = tiny_models["llama"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pref_records("explicit")])
    out = str(tmp_path / "ppo")
    last = train_ppo(PPOConfig(model=base, reward_model=base, dataset=data, output_dir=out, max_steps=1,
                               rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, eval_prompts=4,
                               dtype="bfloat16", value_model="policy_head", progress_bar=False))
    assert last["objective/kl"] == pytest.approx(0.0, abs=1e-3)  # policy == reference at the first rollout
    assert all(w.dtype == torch.float32 for w in load_file(f"{out}/model.safetensors").values())


def test_precision_options():
    p = resolve_precision("auto", "float32", "cpu")
    assert (p.compute, p.weights, p.uses_autocast) == (torch.float32, torch.float32, False)
    p = resolve_precision("bfloat16", "float32", "cpu")
    assert (p.compute, p.weights, p.uses_autocast) == (torch.bfloat16, torch.float32, True)
    assert not p.grad_scaler().is_enabled() and resolve_precision("float16", "float32", "cpu").grad_scaler().is_enabled()
    p = resolve_precision("auto", "bfloat16", "cpu")
    assert (p.compute, p.weights, p.uses_autocast) == (torch.bfloat16, torch.bfloat16, False)
    with pytest.raises(ConfigError, match="--dtype"):
        SFTConfig(dtype="float32", weights_dtype="bfloat16")
    with pytest.raises(ConfigError, match="--weights-dtype"):
        SFTConfig(weights_dtype="float16")
