"""SFT, reward and DPO trainers on tiny random Llama-style and GPT-2-style models loaded from a local
folder, on local JSONL data in each format: loss goes down, checkpoints load back, ``--resume`` after
an interruption continues from the saved step with the same results, bad input is named."""

import re

import pytest
import torch

from rlhf import tasks
from rlhf.dpo import DPOConfig, train_dpo
from rlhf.metrics_log import MetricsLogger, read_metrics
from rlhf.reward import RewardConfig, train_reward
from rlhf.sft import SFTConfig, train_sft

from .helpers import write_jsonl

COMMON = dict(per_device_batch_size=8, logging_steps=1, warmup_steps=0, lr_scheduler="constant",
              progress_bar=False, max_length=16)


def sft_records(fmt, n=32):
    demos = tasks.make_demonstrations(n, seed=1, p_correct=1.0)
    if fmt == "prompt_completion":
        return demos
    return [{"messages": [{"role": "user", "content": d["prompt"][:-1]},
                          {"role": "assistant", "content": d["completion"]}]} for d in demos]


def pref_records(fmt, n=32):
    pairs = tasks.make_preference_pairs(n, seed=1, flip=0.0)
    if fmt == "explicit":
        return [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
    return [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in pairs]


def easy_pairs(n):
    """Pairs a tiny random model can separate within a few steps: chosen uses letters a-f, rejected g-l."""
    import random

    rng = random.Random(0)
    word = lambda pool: "".join(rng.choice(pool) for _ in range(4))
    return [{"prompt": word("abcdefghijkl") + "=", "chosen": word("abcdef"), "rejected": word("ghijkl")}
            for _ in range(n)]


def losses(out):
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


@pytest.mark.parametrize("fmt", ["prompt_completion", "messages"])
def test_sft_loss_decreases_and_model_loads(tmp_path, tiny_model, fmt):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(fmt))
    out = str(tmp_path / "out")
    train_sft(SFTConfig(model=tiny_model, dataset=data, output_dir=out, lr=1e-2, max_steps=12, **COMMON))
    curve = losses(out)
    assert len(curve) == 12 and curve[-1] < 0.7 * curve[0], curve
    AutoModelForCausalLM.from_pretrained(out)  # the final model is a Hugging Face folder


@pytest.mark.parametrize("fmt", ["explicit", "implicit"])
def test_dpo_loss_decreases(tmp_path, tiny_model, fmt):
    data = write_jsonl(tmp_path / "pref.jsonl", pref_records(fmt))
    out = str(tmp_path / "out")
    train_dpo(DPOConfig(model=tiny_model, dataset=data, output_dir=out, lr=1e-2, max_steps=10, beta=0.5,
                        eval_fraction=0.0, **COMMON))
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert recs[0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # policy == reference at step 1: log 2
    assert recs[-1]["loss"] < 0.6 and recs[-1]["rewards/accuracies"] > 0.7
    assert recs[-1]["rewards/margins"] == pytest.approx(recs[-1]["rewards/chosen"] - recs[-1]["rewards/rejected"])


def test_reward_loss_decreases_and_model_loads(tmp_path, tiny_model):
    from transformers import AutoModelForSequenceClassification

    rec = easy_pairs(48)
    for r in rec:
        r["margin"] = 0.5
    data = write_jsonl(tmp_path / "pref.jsonl", rec)
    out = str(tmp_path / "out")
    last = train_reward(RewardConfig(model=tiny_model, dataset=data, output_dir=out, lr=1e-2, max_steps=12,
                                     eval_fraction=0.2, **COMMON))
    curve = losses(out)
    # with margin 0.5 and a fresh head (scores ~0) the first loss is -log sigmoid(-0.5) ~ 0.974
    assert curve[0] == pytest.approx(0.974, abs=0.05) and curve[-1] < 0.8 * curve[0], curve
    assert 0.0 <= last["eval/accuracy"] <= 1.0
    rm = AutoModelForSequenceClassification.from_pretrained(out)
    assert rm.config.num_labels == 1


def _interrupt_at(monkeypatch, step):
    real = MetricsLogger.log

    def log(self, s, metrics):
        if s == step and "loss" in metrics:
            raise KeyboardInterrupt(f"simulated kill at step {s}")
        return real(self, s, metrics)

    monkeypatch.setattr(MetricsLogger, "log", log)


@pytest.mark.parametrize("stage", ["sft", "dpo", "reward"])
def test_resume_after_interruption_matches_uninterrupted(tmp_path, tiny_models, monkeypatch, stage):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    arch = {"sft": "llama", "dpo": "gpt2", "reward": "llama"}[stage]
    if stage == "sft":
        data, cfg_cls, train, loader = sft_records("prompt_completion"), SFTConfig, train_sft, AutoModelForCausalLM
    elif stage == "dpo":
        data, cfg_cls, train, loader = pref_records("explicit"), DPOConfig, train_dpo, AutoModelForCausalLM
    else:
        data, cfg_cls, train, loader = pref_records("explicit"), RewardConfig, train_reward, \
            AutoModelForSequenceClassification
    path = write_jsonl(tmp_path / "d.jsonl", data)

    def cfg(out, resume=False):  # 4 steps per epoch: the run crosses an epoch boundary (reshuffle)
        return cfg_cls(model=tiny_models[arch], dataset=path, output_dir=str(tmp_path / out), lr=5e-3,
                       max_steps=6, save_steps=3, resume=resume, eval_fraction=0.0,
                       **{**COMMON, "lr_scheduler": "cosine", "warmup_steps": 2})

    train(cfg("straight"))
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            train(cfg("killed"))
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4]
    logged = []
    with monkeypatch.context() as m:
        real = MetricsLogger.log
        m.setattr(MetricsLogger, "log", lambda self, s, metrics: ("loss" in metrics and logged.append(s)) or real(self, s, metrics))
        train(cfg("killed", resume=True))
    assert logged == [4, 5, 6]  # it continued from checkpoint-3, not from scratch
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    kw = {"num_labels": 1} if stage == "reward" else {}
    ma, mb = loader.from_pretrained(tmp_path / "straight", **kw), loader.from_pretrained(tmp_path / "killed", **kw)
    for (n, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=n)
    assert (tmp_path / "killed" / "checkpoint-6" / "trainer_state.pt").exists()


def test_bad_input_errors(tmp_path, tiny_models, capsys):
    """Through the command: one line ``rlhf <command>: error: ...`` on stderr and exit status 2."""
    from rlhf.cli import main

    def fails(argv, pattern):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"rlhf {argv[0]}: error: "), err
        assert re.search(pattern, err[0]), (pattern, err[0])

    pc = write_jsonl(tmp_path / "sft.jsonl", sft_records("prompt_completion", 16))
    fails(["sft", "--model", str(tmp_path / "missing_model"), "--dataset", pc,
           "--output-dir", str(tmp_path / "o1")], "model path .* does not exist")
    fails(["sft", "--model", tiny_models["llama"], "--dataset", pc, "--max-length", "4",
           "--output-dir", str(tmp_path / "o2")], "prompt is 5 tokens.*max_length=4")
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "ab=", "chosen": "bc", "rejected": "bc"}] * 8)
    fails(["dpo", "--model", tiny_models["llama"], "--dataset", same, "--output-dir", str(tmp_path / "o3")],
          "chosen equals rejected in every record")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a=", "chosen": "b", "rejected": "c"},
                                               {"prompt": "ab=", "chosen": "bc"}])
    fails(["reward", "--model", tiny_models["llama"], "--dataset", bad, "--output-dir", str(tmp_path / "o4")],
          "missing column")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    fails(["sft", "--model", tiny_models["llama"], "--dataset", str(empty), "--output-dir", str(tmp_path / "o5")],
          "is empty")