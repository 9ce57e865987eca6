"""Shared pipeline plumbing: config, data formats, tokenization masks, padding, checkpoints, schedule,
the built-in task."""

import json
import math
import os
import random

import pytest
import torch

from rlhf import checkpoint, data, models, tasks
from rlhf.config import TrainConfig, build_parser, parse_config
from rlhf.distributed import DistInfo
from rlhf.trainer_utils import build_optimizer, build_scheduler, global_batch_indices, lr_lambda

from .helpers import write_jsonl

# ---------------------------------------------------------------------------------------------- config


def test_config_precedence_yaml_then_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.003\nmax-steps: 7\nresume: true\nmodel: some/where\n")
    cfg = parse_config(TrainConfig, ["--config", str(y), "--max-steps", "9", "--no-resume"])
    assert cfg.lr == 0.003 and cfg.max_steps == 9 and cfg.resume is False and cfg.model == "some/where"
    assert parse_config(TrainConfig, []).lr == TrainConfig().lr


def test_config_errors_and_help(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("learnin_rate: 1\n")
    with pytest.raises(ValueError, match="unknown config field.*learnin_rate"):
        parse_config(TrainConfig, ["--config", str(y)])
    with pytest.raises(ValueError, match="expects int"):
        parse_config(TrainConfig, ["--max-steps", "many"])
    text = build_parser(TrainConfig).format_help()  # a '%' in a docstring must not break this
    assert "Peak learning rate" in text and "--output-dir" in text


# ---------------------------------------------------------------------------------------------- data

TOK = models.load_tokenizer("builtin")
E = TOK.eos_token_id


def ids(s):
    return TOK(s, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])
def test_load_local_files(tmp_path, ext):
    recs = [{"prompt": "abc=", "completion": "bcd"}, {"prompt": "dd=", "completion": "ee"}]
    path = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        write_jsonl(path, recs)
    elif ext == "json":
        path.write_text(json.dumps(recs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(recs), path)
    assert data.load_records(str(path)) == recs


def test_sft_labels_only_on_completion():
    (ex,) = data.tokenize_sft([{"prompt": "abc=", "completion": "bcd"}], TOK, 32)
    assert ex["input_ids"] == ids("abc=bcd") + [E]
    assert ex["labels"] == [-100] * 4 + ids("bcd") + [E]


def test_messages_labels_only_on_assistant_turns():
    chat = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "bc"},
            {"role": "user", "content": "k"}, {"role": "assistant", "content": "l"}]
    (ex,) = data.tokenize_sft([{"messages": chat}], TOK, 32)
    assert ex["input_ids"] == ids("ab=bc") + [E] + ids("k=l") + [E]
    assert ex["labels"] == [-100] * 3 + ids("bc") + [E] + [-100] * 2 + ids("l") + [E]


def test_conversational_prompt_completion():
    rec = {"prompt": [{"role": "user", "content": "ab"}], "completion": [{"role": "assistant", "content": "bc"}]}
    (ex,) = data.tokenize_sft([rec], TOK, 32)
    assert ex["labels"] == [-100] * 3 + ids("bc") + [E]


def test_truncation_cuts_completion_never_prompt():
    (ex,) = data.tokenize_sft([{"prompt": "abc=", "completion": "bcdefg"}], TOK, 6)
    assert ex["input_ids"] == ids("abc=bc") and ex["labels"][:4] == [-100] * 4
    with pytest.raises(data.DataError, match="record 0.*prompt is 4 tokens.*max_length=4"):
        data.tokenize_sft([{"prompt": "abc=", "completion": "b"}], TOK, 4)


def test_preference_explicit_and_implicit_prompt():
    explicit = data.tokenize_preference([{"prompt": "ab=", "chosen": "bc", "rejected": "ca"}], TOK, 16)
    implicit = data.tokenize_preference([{"chosen": "ab=bc", "rejected": "ab=ca"}], TOK, 16)
    assert explicit == implicit
    assert explicit[0]["rejected_labels"] == [-100] * 3 + ids("ca") + [E]
    chats = data.tokenize_preference([{
        "chosen": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "bc"}],
        "rejected": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ca"}]}], TOK, 16)
    assert chats[0]["chosen_ids"] == ids("ab=bc") + [E] and chats[0]["chosen_labels"][:3] == [-100] * 3


def test_bad_data_errors(tmp_path):
    with pytest.raises(data.DataError, match="needs columns messages or prompt/completion"):
        data.tokenize_sft([{"text": "abc"}], TOK, 16)
    with pytest.raises(data.DataError, match="record 1 is missing column"):
        data.tokenize_sft([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], TOK, 16)
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(data.DataError, match="empty"):
        data.load_records(str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_records(str(tmp_path / "nope" / "x.jsonl"))
    with pytest.raises(data.DataError, match="chosen equals rejected in every record"):
        data.tokenize_preference([{"prompt": "a=", "chosen": "b", "rejected": "b"}] * 3, TOK, 16)
    with pytest.raises(FileNotFoundError, match="model path .* does not exist"):
        models.load_policy(str(tmp_path / "no_model"))


def test_tokenizer_without_pad_token(tiny_models):
    tok = models.load_tokenizer(tiny_models["gpt2"])
    assert tok.pad_token_id == tok.eos_token_id


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_and_right_padding_agree(tiny_models, arch):
    tok = models.load_tokenizer(tiny_models[arch])
    model = models.load_policy(tiny_models[arch], tok, trainable=False)
    exs = data.tokenize_sft([{"prompt": "abc=", "completion": "bcd"}, {"prompt": "k=", "completion": "l"}], tok, 16)
    right = models.sequence_logprobs(model, data.collate_sft(exs, tok.pad_token_id, "right"))
    left = models.sequence_logprobs(model, data.collate_sft(exs, tok.pad_token_id, "left"))
    alone = torch.cat([models.sequence_logprobs(model, data.collate_sft([e], tok.pad_token_id)) for e in exs])
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)
    # and the value is the sum of log-softmax over the completion tokens, computed here directly
    b = data.collate_sft(exs[:1], tok.pad_token_id)
    lp = torch.log_softmax(model(input_ids=b["input_ids"]).logits[0, :-1].double(), -1)
    tgt = b["input_ids"][0, 1:]
    want = sum(lp[t, tgt[t]] for t in range(3, len(tgt)))
    assert abs(float(want) - float(alone[0])) < 1e-4


def test_generation_batched_equals_one_at_a_time(tiny_models):
    from rlhf.generation import generate

    tok = models.load_tokenizer(tiny_models["llama"])
    model = models.load_policy(tiny_models["llama"], tok, trainable=False)
    prompts = [ids("abcd="), ids("k=")]
    kw = {"eos_token_id": E, "pad_token_id": tok.pad_token_id, "max_new_tokens": 5, "temperature": 0}
    assert generate(model, prompts, **kw) == [generate(model, [p], **kw)[0] for p in prompts]


# ---------------------------------------------------------------------------------------------- schedule, batches


def test_lr_schedule_shapes():
    assert lr_lambda(0, 4, 20, "cosine") == pytest.approx(1 / 5)
    assert lr_lambda(4, 4, 20, "cosine") == pytest.approx(1.0)
    assert lr_lambda(12, 4, 20, "cosine") == pytest.approx(0.5)  # half-way through the decay
    assert lr_lambda(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_lambda(20, 4, 20, "linear") == pytest.approx(0.0)
    assert lr_lambda(15, 4, 20, "constant") == 1.0
    with pytest.raises(ValueError, match="lr_scheduler"):
        lr_lambda(5, 0, 10, "exp")


def test_global_batches_cover_each_epoch_once():
    seen = [i for s in range(5) for i in global_batch_indices(s, 23, 4, seed=3)]  # 5 batches/epoch
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 20
    assert global_batch_indices(5, 23, 4, 3) != global_batch_indices(0, 23, 4, 3)  # reshuffled


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_and_atomicity(tmp_path, tiny_models):
    tok = models.load_tokenizer(tiny_models["llama"])
    model = models.load_policy(tiny_models["llama"], tok)
    cfg = TrainConfig(lr=1e-2, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    model(input_ids=torch.tensor([[4, 5, 6]])).logits.sum().backward()
    opt.step()
    sched.step()
    info = DistInfo()
    out = str(tmp_path)
    for step in (3, 6, 9):
        checkpoint.save_checkpoint(out, step, model, tok, opt, sched, info, total_limit=2)
    draw_after_save = torch.rand(3)  # what the saved RNG state produces next
    os.makedirs(tmp_path / ".tmp-checkpoint-12")  # a half-written one is ignored
    os.makedirs(tmp_path / "checkpoint-15")  # no trainer_state.pt: incomplete, ignored
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [6, 9]
    path = checkpoint.latest_checkpoint(out)
    assert path.endswith("checkpoint-9")
    again = models.load_policy(path, tok)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    opt2 = build_optimizer(again, cfg)
    sched2 = build_scheduler(opt2, cfg, 10)
    torch.manual_seed(123)
    step, _ = checkpoint.load_training_state(path, opt2, sched2, info)
    assert torch.equal(torch.rand(3), draw_after_save)
    assert step == 9 and sched2.last_epoch == sched.last_epoch
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


# ---------------------------------------------------------------------------------------------- built-in task


def test_gold_score_is_graded():
    assert tasks.gold_score("abc=", "bcd") == 1.0
    assert tasks.gold_score("abc=", "bcx") == pytest.approx(2 / 3)
    assert tasks.gold_score("abc=", "bcdd") == pytest.approx(3 / 4)  # too long costs
    assert tasks.gold_score("kl=", "la") == 1.0  # wraps l -> a
    assert tasks.gold_score("abc=", "") == 0.0


def test_preference_pairs_have_about_a_quarter_flipped():
    pairs = tasks.make_preference_pairs(2000, seed=0)
    flipped = [p["gold_chosen"] < p["gold_rejected"] for p in pairs]
    rate = sum(flipped) / len(flipped)
    assert 0.22 < rate < 0.28
    for p in random.Random(0).sample(pairs, 50):
        assert p["gold_chosen"] == tasks.gold_score(p["prompt"], p["chosen"])
        assert p["gold_chosen"] != p["gold_rejected"]


def test_demonstrations_are_imperfect_but_informative():
    demos = tasks.make_demonstrations(2000, seed=0)
    mean = sum(tasks.gold_score(d["prompt"], d["completion"]) for d in demos) / len(demos)
    assert 0.5 < mean < 0.6  # 0.5 right on purpose + 0.5 * 1/12 by chance
    assert math.isclose(mean, 0.5 + 0.5 / 12, abs_tol=0.03)


@pytest.mark.parametrize("command", ["sft", "reward", "dpo"])
def test_command_help(command, capsys):
    from rlhf.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "--output-dir" in capsys.readouterr().out
    assert main([]) == 2 and command in capsys.readouterr().out


def test_relative_model_path_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # ./outputs exists, so outputs/sft is a local path, not a Hub id
    with pytest.raises(FileNotFoundError, match="'outputs/sft' does not exist"):
        models.load_reward_model("outputs/sft")
