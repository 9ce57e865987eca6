"""LoRA (``--use-peft``) in every trainer on a tiny local Llama: only the adapters train, the reference is
the base (adapters disabled), the adapter folder loads with peft, the merged folder with
``from_pretrained`` and equals base + adapter, later stages start from adapter folders, resuming
continues the same run, the fused log-prob path sees LoRA on the LM head, and 2 processes match 1."""

import math
import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed: pip install 'rlhf-kernels[peft]'")

from safetensors.torch import load_file

from rlhf.dpo import DPOConfig, DPOTrainer, pair_logprobs
from rlhf.grpo import GRPOConfig, train_grpo
from rlhf.metrics_log import read_metrics
from rlhf.models import load_policy, load_reward_model, load_tokenizer, policy_logprobs, reference_of
from rlhf.ppo import PPOConfig, train_ppo
from rlhf.reward import RewardConfig, train_reward
from rlhf.sft import SFTConfig, train_sft
from rlhf_kernels.integrations.hf import causal_lm_logprobs

from .helpers import write_jsonl
from .test_trainers import easy_pairs, pref_records, sft_records

LORA = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="q_proj,v_proj,down_proj")
COMMON = dict(per_device_batch_size=8, logging_steps=1, warmup_steps=0, lr_scheduler="constant", progress_bar=False,
              max_length=16, eval_fraction=0.0, **LORA)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def losses(out):
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def _ids(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_sft_trains_only_the_adapters_and_the_merged_save_equals_base_plus_adapter(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    base = tiny_models["llama"]
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records("prompt_completion"))
    a, b = str(tmp_path / "adapter"), str(tmp_path / "merged")
    for out, merge in ((a, False), (b, True)):
        train_sft(SFTConfig(model=base, dataset=data, output_dir=out, lr=1e-2, max_steps=4, gold_eval_prompts=0,
                            merge_adapters=merge, **COMMON))
    # The adapter folder: only LoRA matrices (no base weight), trained (lora_B starts at 0), loadable by peft.
    assert os.path.exists(os.path.join(a, "adapter_config.json")) and not os.path.exists(os.path.join(a, "config.json"))
    saved = load_file(os.path.join(a, "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:4]
    assert all(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)
    adapted = peft.AutoPeftModelForCausalLM.from_pretrained(a).eval()
    # The merged folder: a plain model, fp32 (the master weights), equal to base + the saved adapter.
    # Had training changed a base weight, the in-memory merge would differ from base-on-disk + adapter.
    merged = AutoModelForCausalLM.from_pretrained(b).eval()
    assert not os.path.exists(os.path.join(b, "adapter_config.json"))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = load_tokenizer(base)
    ids, mask = _ids(tok, ["12+3=15", "7*8=56"])
    with torch.no_grad():
        want = adapted(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain(input_ids=ids, attention_mask=mask).logits, want, atol=1e-3)
        # an rlhf stage given the adapter folder as --model loads base + adapter
        via_folder = load_policy(a, tok, "cpu", trainable=False)
        torch.testing.assert_close(via_folder(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-4,
                                   atol=1e-5)


def test_dpo_reference_is_the_base_with_adapters_disabled_and_resume_continues(tmp_path, tiny_models):
    base = tiny_models["llama"]
    data = write_jsonl(tmp_path / "pref.jsonl", easy_pairs(64))
    cfg = dict(model=base, dataset=data, lr=3e-2, beta=0.5, gold_eval_prompts=0, **COMMON)
    whole = DPOTrainer(DPOConfig(output_dir=str(tmp_path / "whole"), max_steps=4, **cfg))
    whole.train()
    curve = losses(str(tmp_path / "whole"))
    assert curve[0] == pytest.approx(math.log(2), abs=1e-4)  # step 1: policy == reference
    assert curve[-1] < 0.6, curve  # the adapters learn the easy pairs
    # The reference log-probs (taken with the adapters disabled) are the base model's own.
    plain = load_policy(base, whole.tokenizer, "cpu", trainable=False)
    ex = whole.train_set[:8]
    c, r = pair_logprobs(plain, ex, whole.tokenizer.pad_token_id, whole.cfg, "cpu")
    torch.testing.assert_close(torch.tensor([e["ref_chosen"] for e in ex]), c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([e["ref_rejected"] for e in ex]), r, rtol=1e-5, atol=1e-5)

    # Interrupted after step 2, resumed from the adapter checkpoint: the same curve as the whole run
    # (the resumed run's reference is again the base: its trained adapters are disabled for it).
    split = str(tmp_path / "split")
    DPOTrainer(DPOConfig(output_dir=split, max_steps=2, save_steps=1, **cfg)).train()
    assert os.path.exists(os.path.join(split, "checkpoint-2", "adapter_config.json"))
    DPOTrainer(DPOConfig(output_dir=split, max_steps=4, resume=True, **cfg)).train()
    resumed = [r for r in read_metrics(split) if "loss" in r]
    assert [r["step"] for r in resumed][-2:] == [3, 4]
    assert [r["loss"] for r in resumed][-2:] == pytest.approx(curve[-2:], rel=1e-4, abs=1e-6)


def test_reward_model_trains_its_score_head_and_saves_it_with_the_adapters(tmp_path, tiny_models):
    from transformers import AutoModelForSequenceClassification

    base = tiny_models["llama"]
    data = write_jsonl(tmp_path / "pref.jsonl", easy_pairs(48))
    a, b = str(tmp_path / "rm"), str(tmp_path / "rm_merged")
    for out, merge in ((a, False), (b, True)):
        train_reward(RewardConfig(model=base, dataset=data, output_dir=out, lr=1e-2, max_steps=6, merge_adapters=merge,
                                  **COMMON))
    curve = losses(a)
    assert curve[-1] < curve[0], curve
    saved = load_file(os.path.join(a, "adapter_model.safetensors"))
    assert any("score" in k for k in saved), sorted(saved)  # modules_to_save: the head is trained and saved
    adapted = peft.AutoPeftModelForSequenceClassification.from_pretrained(a, num_labels=1).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(b).eval()
    tok = load_tokenizer(base)
    ids, mask = _ids(tok, ["ab=cdef", "gh=ijkl"])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits,
                                   adapted(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-5)
    # resumed from a checkpoint after step 3 (adapters and the score head restored): the same curve
    split = str(tmp_path / "split")
    cfg = dict(model=base, dataset=data, output_dir=split, lr=1e-2, **COMMON)
    train_reward(RewardConfig(max_steps=3, save_steps=1, **cfg))
    train_reward(RewardConfig(max_steps=6, resume=True, **cfg))
    assert losses(split)[-3:] == pytest.approx(curve[-3:], rel=1e-4, abs=1e-6)
    # PPO's frozen reward model can be the adapter folder itself
    rm = load_reward_model(a, tok, "cpu", trainable=False)
    with torch.no_grad():
        torch.testing.assert_close(rm(input_ids=ids, attention_mask=mask).logits,
                                   adapted(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-5)


def test_reference_view_is_the_base_model(tiny_models):
    base = tiny_models["llama"]
    tok = load_tokenizer(base)
    plain = load_policy(base, tok, "cpu", trainable=False)
    adapted = peft.get_peft_model(load_policy(base, tok, "cpu"), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
    ids, mask = _ids(tok, ["12+3=15", "7*8=56"])
    labels = ids[:, -3:].masked_fill(mask[:, -3:] == 0, -100)
    want = policy_logprobs(plain, ids, mask, labels)
    torch.testing.assert_close(policy_logprobs(reference_of(adapted), ids, mask, labels), want)
    assert not torch.allclose(policy_logprobs(adapted, ids, mask, labels), want, atol=1e-4)


def test_ppo_with_lora_trains_adapters_and_resumes(tmp_path, tiny_models):
    base = tiny_models["llama"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pref_records("explicit")])
    out = str(tmp_path / "ppo")
    cfg = dict(model=base, reward_model=base, dataset=data, output_dir=out, rollout_batch_size=8, mini_batch_size=4,
               ppo_epochs=1, max_new_tokens=4, eval_prompts=4, lr=1e-3, value_lr=1e-3, progress_bar=False,
               save_steps=1, **LORA)
    train_ppo(PPOConfig(max_steps=2, **cfg))
    ckpt = os.path.join(out, "checkpoint-1")  # PPO checkpoints every save_steps before the last step
    # the policy and the critic (the reward model with its own adapters and score head) save adapter folders
    assert os.path.exists(os.path.join(ckpt, "adapter_config.json"))
    assert os.path.exists(os.path.join(ckpt, "value_model", "adapter_config.json"))
    assert any("score" in k for k in load_file(os.path.join(ckpt, "value_model", "adapter_model.safetensors")))
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert all("lora_" in k for k in saved) and any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)
    first = [r for r in read_metrics(out) if "objective/kl" in r]
    assert first[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # step 1: policy == reference (base)
    train_ppo(PPOConfig(max_steps=3, resume=True, **cfg))
    steps = [r["step"] for r in read_metrics(out) if "objective/kl" in r]
    assert steps == [1, 2, 3]


def test_grpo_with_lora_trains_adapters_against_the_base_and_resumes(tmp_path, tiny_models):
    base = tiny_models["llama"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pref_records("explicit")])
    out = str(tmp_path / "grpo")
    cfg = dict(model=base, reward_model=base, dataset=data, output_dir=out, num_generations=2,
               generation_batch_size=4, max_completion_length=4, eval_prompts=4, lr=1e-3, beta=0.1,
               logging_steps=1, max_length=32, progress_bar=False, save_steps=1, **LORA)
    train_grpo(GRPOConfig(max_steps=2, **cfg))
    assert os.path.exists(os.path.join(out, "checkpoint-1", "adapter_config.json"))
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert all("lora_" in k for k in saved) and any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)
    rows = [r for r in read_metrics(out) if "kl" in r]
    # step 1 learns from the untouched policy: LoRA's B starts at 0, so policy == reference (the base)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["kl"] > 0.0  # after an update the adapters move the policy away from the base
    train_grpo(GRPOConfig(max_steps=3, resume=True, **cfg))
    assert [r["step"] for r in read_metrics(out) if "kl" in r] == [1, 2, 3]


def test_fused_logprobs_with_lora_on_the_lm_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)
    model = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(
        r=2, target_modules=["q_proj", "lm_head"], lora_dropout=0.0, init_lora_weights=False))
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids)
    fused = causal_lm_logprobs(model, ids, mask, backend="reference")
    head = model.base_model.model.lm_head
    grads_fused = torch.autograd.grad(fused.sum(), [head.lora_A["default"].weight, head.lora_B["default"].weight])
    logits = model(input_ids=ids, attention_mask=mask).logits
    want = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(fused[:, :-1], want, rtol=1e-5, atol=1e-5)
    grads_want = torch.autograd.grad(want.sum(), [head.lora_A["default"].weight, head.lora_B["default"].weight])
    for g, w in zip(grads_fused, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with model.disable_adapter():  # the head's adapter is off too
        off = causal_lm_logprobs(model, ids, mask, backend="reference")
        base_logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(off[:, :-1], torch.log_softmax(base_logits, -1)[:, :-1].gather(
        -1, ids[:, 1:, None]).squeeze(-1), rtol=1e-5, atol=1e-5)
    # dropout on the head's adapter input cannot be folded into one weight: refused while training
    dropped = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=2, target_modules=["lm_head"],
                                                                         lora_dropout=0.1))
    dropped.train()
    with pytest.raises(TypeError, match="lora_dropout"):
        causal_lm_logprobs(dropped, ids, mask)


def test_lora_under_torchrun_two_processes_matches_one(tmp_path, tiny_models):
    model = tiny_models["llama"]
    data = write_jsonl(tmp_path / "d.jsonl", sft_records("prompt_completion"))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train_sft(SFTConfig(model=model, dataset=data, output_dir=one, max_steps=3, lr=1e-2, gold_eval_prompts=0,
                        **COMMON))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlhf", "sft",
           "--model", model, "--dataset", data, "--output-dir", two, "--per-device-batch-size", "2",
           "--gradient-accumulation-steps", "2", "--max-steps", "3", "--lr", "1e-2", "--max-length", "16",
           "--eval-fraction", "0", "--no-progress-bar", "--lr-scheduler", "constant", "--warmup-steps", "0",
           "--logging-steps", "1", "--gold-eval-prompts", "0", "--use-peft", "--lora-r", "4", "--lora-alpha", "8",
           "--lora-dropout", "0", "--lora-target-modules", "q_proj,v_proj,down_proj"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert losses(two) == pytest.approx(losses(one), rel=1e-4, abs=1e-5)
    a = load_file(os.path.join(one, "adapter_model.safetensors"))
    b = load_file(os.path.join(two, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_lora_option_errors_are_one_line(tmp_path, tiny_models, capsys, monkeypatch):
    from rlhf.cli import main

    data = write_jsonl(tmp_path / "sft.jsonl", sft_records("prompt_completion"))
    out = str(tmp_path / "out")
    cases = [
        (["--use-peft"], r"--use-peft needs a pretrained model"),  # the built-in task's random model
        (["--model", tiny_models["llama"], "--merge-adapters"], r"--merge-adapters must be used with --use-peft"),
        (["--model", tiny_models["llama"], "--use-peft", "--lora-r", "0"], r"--lora-r must be >= 1"),
        (["--model", tiny_models["llama"], "--use-peft", "--lora-target-modules", "nope_proj"],
         r"--lora-target-modules: .*nope_proj"),
    ]
    for extra, pattern in cases:
        code = main(["sft", "--dataset", data, "--output-dir", out, "--max-steps", "1", "--no-progress-bar", *extra])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress lines
        assert code == 2 and err.startswith("rlhf sft: error: "), (extra, err)
        assert __import__("re").search(pattern, err), (extra, err)
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    code = main(["sft", "--model", tiny_models["llama"], "--dataset", data, "--output-dir", out, "--max-steps", "1",
                 "--no-progress-bar", "--use-peft"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("rlhf sft: error: ") and "pip install" in err and "peft" in err, err


def test_pipeline_stages_start_from_adapter_folders(tmp_path):
    """SFT trains the built-in model fully; reward, PPO, DPO and GRPO train LoRA adapters on it (stage
    YAML); PPO starts from the reward model's adapter folder, the report loads every adapter folder."""
    import json

    from rlhf.pipeline import main as pipeline_main

    lora = "use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\nlora_target_modules: [q_proj, v_proj]\n"
    for stage in ("reward", "ppo", "dpo", "grpo"):
        (tmp_path / f"{stage}.yaml").write_text(lora + ("value_model: reward\nrollout_batch_size: 16\n"
                                                         "mini_batch_size: 8\n" if stage == "ppo" else ""))
    out = tmp_path / "pipeline"
    code = pipeline_main(["--output-dir", str(out), "--sft-steps", "4", "--reward-steps", "4", "--ppo-steps", "1",
                          "--ppo-eval-steps", "0", "--dpo-steps", "4", "--grpo-steps", "1", "--eval-prompts", "8",
                          "--no-kl-off-run",
                          *[a for s in ("reward", "ppo", "dpo", "grpo") for a in (f"--{s}-config", str(tmp_path / f"{s}.yaml"))]])
    assert code == 0
    for stage in ("reward", "ppo", "dpo", "grpo"):
        assert (out / stage / "adapter_config.json").exists() and not (out / stage / "config.json").exists(), stage
    report = json.loads((out / "report.json").read_text())
    assert list(report["results"]) == ["sft", "ppo", "dpo", "grpo"]
    for stage, res in report["results"].items():
        assert all(math.isfinite(res[k]) for k in ("gold", "proxy", "kl_to_sft")), (stage, res)
    assert report["results"]["dpo"]["kl_to_sft"] != 0.0  # the adapters were loaded: DPO moved away from SFT
