"""Options: defaults that follow the model (the built-in task's tuned settings vs TRL's for any other
model), TRL's option names as aliases (command line and YAML), ``--report-to`` (TensorBoard for real,
wandb through a stand-in module), notices for missing optional packages, and data from
``save_to_disk`` folders / Hub configurations kept as Arrow tables through tokenization."""

import dataclasses
import json
import os
import sys
import types

import pytest

from rlhf import tasks
from rlhf.config import ConfigError, UserError, build_parser, parse_config
from rlhf.dpo import DPOConfig
from rlhf.metrics_log import MetricsLogger, read_metrics
from rlhf.ppo import PPOConfig
from rlhf.reward import RewardConfig
from rlhf.sft import SFTConfig

from .helpers import write_jsonl


def trl_default(cls, name):
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


# ------------------------------------------------------------------------------------ per-model defaults


def test_builtin_task_keeps_its_tuned_settings():
    # The settings the built-in task was tuned with (README: SFT 3e-3, reward 1e-3, DPO 2e-4, batch 32,
    # max length 32).
    sft, rm, dpo = SFTConfig(), RewardConfig(model="builtin"), DPOConfig(model="builtin")
    assert (sft.lr, rm.lr, dpo.lr) == (3e-3, 1e-3, 2e-4)
    for cfg in (sft, rm, dpo):
        assert (cfg.per_device_batch_size, cfg.max_length) == (32, 32)


def test_any_other_model_gets_trls_defaults(tiny_models):
    trl = pytest.importorskip("trl")

    model = tiny_models["llama"]
    for ours, theirs in ((SFTConfig, trl.SFTConfig), (RewardConfig, trl.RewardConfig), (DPOConfig, trl.DPOConfig)):
        cfg = ours(model=model)
        assert cfg.lr == trl_default(theirs, "learning_rate"), ours
        assert cfg.per_device_batch_size == trl_default(theirs, "per_device_train_batch_size")
        assert cfg.num_epochs == trl_default(theirs, "num_train_epochs")
        assert cfg.max_length == trl_default(theirs, "max_length")
        assert cfg.lr_scheduler == trl_default(theirs, "lr_scheduler_type")
        assert cfg.warmup_steps == trl_default(theirs, "warmup_steps")
    assert DPOConfig(model=model).beta == trl_default(trl.DPOConfig, "beta")
    # from the command line too, and a Hub name that is not a folder counts as "your model"
    assert parse_config(SFTConfig, ["--model", model]).lr == trl_default(trl.SFTConfig, "learning_rate")
    assert SFTConfig(model="Qwen/Qwen2.5-0.5B").lr == trl_default(trl.SFTConfig, "learning_rate")


def test_a_folder_trained_from_the_task_keeps_the_tasks_settings(tmp_path, tiny_models):
    """reward / DPO / PPO start from an SFT folder: its run_config.yaml says which model it came from."""
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    (sft_dir / "run_config.yaml").write_text("model: builtin\nlr: 0.003\n")
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    (rm_dir / "run_config.yaml").write_text(f"model: {sft_dir}\n")
    assert RewardConfig(model=str(sft_dir)).lr == 1e-3
    assert DPOConfig(model=str(sft_dir / "checkpoint-5")).lr == 2e-4  # a checkpoint inside the run folder
    assert PPOConfig(model=str(rm_dir)).rollout_batch_size == tasks.get_task("builtin").defaults["ppo"][
        "rollout_batch_size"]
    real = tmp_path / "real"
    real.mkdir()
    (real / "run_config.yaml").write_text(f"model: {tiny_models['llama']}\n")
    assert RewardConfig(model=str(real)).lr == RewardConfig(model=tiny_models["llama"]).lr != 1e-3
    assert PPOConfig(model=str(real)).rollout_batch_size == PPOConfig(model="x/y").rollout_batch_size


def test_what_the_user_sets_always_wins(tmp_path, tiny_models):
    assert SFTConfig(lr=0.5).lr == 0.5 and SFTConfig(lr=0.5).per_device_batch_size == 32
    y = tmp_path / "c.yaml"
    y.write_text("per_device_batch_size: 3\n")
    cfg = parse_config(SFTConfig, ["--config", str(y), "--max-length", "48"])
    assert (cfg.per_device_batch_size, cfg.max_length, cfg.lr) == (3, 48, 3e-3)
    cfg = parse_config(SFTConfig, ["--config", str(y), "--model", tiny_models["llama"]])
    assert cfg.per_device_batch_size == 3 and cfg.max_length == 1024


def test_the_pipeline_stages_follow_the_model(tmp_path, tiny_models):
    from rlhf.pipeline import _config

    mine = _config(SFTConfig, None, {"seed": 1}, {"model": tiny_models["llama"], "dataset": "x.jsonl",
                                                 "output_dir": str(tmp_path / "a")})
    builtin = _config(SFTConfig, None, {"seed": 1}, {"model": "builtin", "dataset": "builtin",
                                                    "output_dir": str(tmp_path / "b")})
    assert mine.lr != 3e-3 and builtin.lr == 3e-3


def test_help_shows_both_defaults_and_the_aliases():
    text = " ".join(build_parser(SFTConfig).format_help().split())
    assert "(default: 2e-05; built-in task: 0.003)" in text
    assert "--learning_rate LR alias of --lr" in text and "--bf16 [BOOL] alias of --dtype" in text
    assert "--num_ppo_epochs" in " ".join(build_parser(PPOConfig).format_help().split())


# ------------------------------------------------------------------------------------------------ aliases


def test_trl_names_on_the_command_line():
    cfg = parse_config(SFTConfig, [
        "--learning_rate", "0.01", "--per_device_train_batch_size", "4", "--num_train_epochs", "2",
        "--lr_scheduler_type", "constant_with_warmup", "--bf16", "--model_name_or_path", "org/m",
        "--dataset_name", "org/d", "--dataset_config", "sub", "--gradient_accumulation_steps", "2",
        "--max_steps", "5", "--warmup_steps", "1", "--logging_steps", "3", "--save_steps", "4",
        "--output_dir", "o", "--seed", "7", "--max_length", "64", "--gradient_checkpointing",
        "--report_to", "none", "--max_grad_norm", "0.5", "--weight_decay", "0.1", "--adam_beta1", "0.8",
        "--adam_beta2", "0.99", "--save_total_limit", "1", "--resume_from_checkpoint", "true",
    ])
    assert (cfg.lr, cfg.per_device_batch_size, cfg.num_epochs, cfg.lr_scheduler) == (0.01, 4, 2.0, "constant")
    assert (cfg.dtype, cfg.model, cfg.dataset, cfg.dataset_config) == ("bfloat16", "org/m", "org/d", "sub")
    assert (cfg.gradient_accumulation_steps, cfg.max_steps, cfg.warmup_steps, cfg.logging_steps) == (2, 5, 1, 3)
    assert (cfg.save_steps, cfg.output_dir, cfg.seed, cfg.max_length, cfg.gradient_checkpointing) == \
        (4, "o", 7, 64, True)
    assert (cfg.max_grad_norm, cfg.weight_decay, cfg.adam_beta1, cfg.adam_beta2) == (0.5, 0.1, 0.8, 0.99)
    assert (cfg.save_total_limit, cfg.resume) == (1, True)
    assert parse_config(SFTConfig, ["--fp16", "true"]).dtype == "float16"
    assert parse_config(SFTConfig, ["--bf16", "false"]).dtype == "auto"  # false asks for nothing
    assert parse_config(DPOConfig, ["--beta", "0.3"]).beta == 0.3
    ppo = parse_config(PPOConfig, ["--num_ppo_epochs", "2", "--cliprange", "0.1", "--response_length", "7"])
    assert (ppo.ppo_epochs, ppo.clip_low, ppo.max_new_tokens) == (2, 0.1, 7)


def test_trl_names_in_yaml_and_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("learning_rate: 0.02\nnum_train_epochs: 4\nbf16: true\nper_device_train_batch_size: 2\n")
    cfg = parse_config(SFTConfig, ["--config", str(y)])
    assert (cfg.lr, cfg.num_epochs, cfg.dtype, cfg.per_device_batch_size) == (0.02, 4.0, "bfloat16", 2)
    # the command line overrides the file whichever name either uses
    assert parse_config(SFTConfig, ["--config", str(y), "--lr", "0.5"]).lr == 0.5
    assert parse_config(SFTConfig, ["--config", str(y), "--learning_rate", "0.5"]).lr == 0.5


@pytest.mark.parametrize("where", ["cli", "yaml"])
def test_an_alias_contradicting_our_name_is_an_error(tmp_path, where):
    if where == "cli":
        argv = ["--learning_rate", "0.1", "--lr", "0.2"]
    else:
        y = tmp_path / "c.yaml"
        y.write_text("learning_rate: 0.1\nlr: 0.2\n")
        argv = ["--config", str(y)]
    with pytest.raises(ConfigError, match=r"--learning_rate \(an alias of --lr\) gives 0.1 but --lr gives 0.2"):
        parse_config(SFTConfig, argv)
    # the same value twice is no contradiction
    assert parse_config(SFTConfig, ["--learning_rate", "0.1", "--lr", "0.1"]).lr == 0.1
    with pytest.raises(ConfigError, match="--fp16 .* gives 'float16' but --bf16 gives 'bfloat16'"):
        parse_config(SFTConfig, ["--bf16", "--fp16"])


def test_resume_from_a_path_is_refused_clearly(tmp_path, capsys):
    from rlhf.cli import main

    assert main(["sft", "--resume_from_checkpoint", "out/checkpoint-5", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resuming from a given checkpoint path is not supported" in err[0]
    assert err[0].startswith("rlhf sft: error: --resume_from_checkpoint 'out/checkpoint-5'")


def test_bad_report_to_names_the_option():
    with pytest.raises(ConfigError, match="--report-to must be none, tensorboard, wandb"):
        SFTConfig(report_to="mlflow")
    assert SFTConfig(report_to="tensorboard,wandb").report_to == "tensorboard,wandb"


# ---------------------------------------------------------------------------------------------- reporting


def test_report_to_tensorboard_writes_readable_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(str(tmp_path), report_to="tensorboard")
    log.log(1, {"loss": 2.0, "lr": 0.1, "note": "text"})
    log.log(2, {"loss": 1.5, "lr": 0.05})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.0), (2, 1.5)]
    assert read_metrics(str(tmp_path))[0]["note"] == "text"


def test_report_to_none_writes_no_event_files(tmp_path):
    MetricsLogger(str(tmp_path)).close()
    assert not (tmp_path / "tensorboard").exists()


class FakeWandb(types.ModuleType):
    """Stands in for wandb with its documented calls: init(...) -> run; run.log(dict, step=); run.finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.logged.append((step, dict(data)))

            def finish(self):
                fake.finished += 1

        return Run()


def test_report_to_wandb_offline_sends_what_metrics_jsonl_holds(tmp_path, monkeypatch, tiny_models):
    from rlhf.sft import train_sft

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    data = write_jsonl(tmp_path / "d.jsonl", tasks.make_demonstrations(8, seed=1))
    out = tmp_path / "out"
    train_sft(SFTConfig(model=tiny_models["llama"], dataset=data, output_dir=str(out), max_steps=2,
                        per_device_batch_size=4, max_length=16, logging_steps=1, progress_bar=False,
                        report_to="wandb"))
    assert len(fake.inits) == 1 and fake.finished == 1
    init = fake.inits[0]
    assert (init["project"], init["mode"], init["dir"]) == ("proj", "offline", str(out))
    assert init["config"]["lr"] == 2e-5 and init["config"]["report_to"] == "wandb"
    expected = [(r["step"], {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
                for r in read_metrics(str(out))]
    assert fake.logged == expected and [s for s, _ in fake.logged] == [1, 2]


def test_only_the_main_process_reports(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLogger(str(tmp_path / "rank1"), enabled=False, report_to="wandb,tensorboard")
    log.log(1, {"loss": 1.0})
    log.close()
    assert fake.inits == [] and fake.logged == [] and not (tmp_path / "rank1").exists()


# ------------------------------------------------------------------------------- missing optional packages


def test_missing_report_package_stops_the_run_before_training(tmp_path, monkeypatch, capsys):
    from rlhf.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["sft", "--report-to", "wandb", "--output-dir", str(tmp_path / "o"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rlhf sft: error: --report-to wandb needs wandb, which is not installed (pip install wandb)"]
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match="--report-to tensorboard needs tensorboard"):
        MetricsLogger(str(tmp_path / "t"), report_to="tensorboard")


def test_missing_matplotlib_is_a_notice_not_silence(tmp_path, monkeypatch, capsys):
    from rlhf import optional
    from rlhf.pipeline import make_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(optional, "_noticed", set())
    monkeypatch.setattr(optional, "_command", "rlhf pipeline")
    assert make_plots(str(tmp_path), {}, []) == []
    assert make_plots(str(tmp_path), {}, []) == []  # said once
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rlhf pipeline: notice: matplotlib is not installed; plots skipped (pip install matplotlib)"]


def test_optional_helpers(monkeypatch, capsys):
    from rlhf import optional

    assert optional.optional("json", "nothing skipped") is json
    monkeypatch.setitem(sys.modules, "peft", None)
    monkeypatch.setattr(optional, "_noticed", set())
    assert optional.require_optional("peft", "LoRA off", hint="pip install 'rlhf-kernels[lora]'") is None
    assert "notice: peft is not installed; LoRA off (pip install 'rlhf-kernels[lora]')" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"--lora needs peft, which is not installed \(pip install peft\)"):
        optional.required("peft", "--lora")


# --------------------------------------------------------------------------------------------------- data


def test_save_to_disk_folders(tmp_path):
    datasets = pytest.importorskip("datasets")

    from rlhf.data import DataError, is_table, load_records

    recs = tasks.make_demonstrations(6, seed=3)
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs[:4]),
                          "test": datasets.Dataset.from_list(recs[4:])}).save_to_disk(str(tmp_path / "dict"))
    one = load_records(str(tmp_path / "one"))
    assert is_table(one) and one.to_list() == recs
    assert load_records(str(tmp_path / "dict"), "test").to_list() == recs[4:]
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\]; --dataset-split 'dev'"):
        load_records(str(tmp_path / "dict"), "dev")


def test_save_to_disk_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    from rlhf.data import load_records

    datasets.Dataset.from_list(tasks.make_demonstrations(3, seed=3)).save_to_disk(str(tmp_path / "d"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="written by save_to_disk.* needs datasets, which is not installed"):
        load_records(str(tmp_path / "d"))


def test_dataset_config_reaches_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")


    calls = []
    recs = tasks.make_demonstrations(3, seed=4)

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(recs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = parse_config(SFTConfig, ["--dataset_name", "org/data", "--dataset-config", "subset",
                                   "--dataset-split", "validation"])
    from rlhf.trainer_utils import load_records_for

    train, held = load_records_for(cfg, "sft")
    assert calls == [("org/data", "subset", "validation")]
    assert train.to_list() + held.to_list() != [] and len(train) + len(held) == 3


def test_arrow_tokenization_matches_the_list_path_and_trains(tmp_path, tiny_models):
    """Records in a datasets.Dataset are tokenized with Dataset.map into a table, read one example at a
    time; training on it gives the same run as the same records from a JSONL file."""
    datasets = pytest.importorskip("datasets")

    from rlhf.data import ExampleTable, tokenize_preference, tokenize_prompts, tokenize_sft
    from rlhf.models import load_tokenizer
    from rlhf.reward import train_reward

    tok = load_tokenizer("builtin")
    demos = tasks.make_demonstrations(20, seed=5)
    table = tokenize_sft(datasets.Dataset.from_list(demos), tok, 16)
    assert isinstance(table, ExampleTable) and table.table.column_names == ["input_ids", "labels"]
    assert list(table) == tokenize_sft(demos, tok, 16) and table[-1] == table[19] and len(table[2:5]) == 3
    pairs = tasks.make_preference_pairs(20, seed=5)
    assert list(tokenize_preference(datasets.Dataset.from_list(pairs), tok, 16)) == \
        tokenize_preference(pairs, tok, 16)
    assert list(tokenize_prompts(datasets.Dataset.from_list(pairs), tok, 16)) == tokenize_prompts(pairs, tok, 16)

    pairs = [{**p, "margin": 0.25} for p in tasks.make_preference_pairs(24, seed=6)]
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "pairs"))
    common = {"model": tiny_models["llama"], "max_steps": 3, "per_device_batch_size": 4, "max_length": 16,
              "logging_steps": 1, "progress_bar": False, "eval_fraction": 0.25, "seed": 2}
    a = train_reward(RewardConfig(dataset=write_jsonl(tmp_path / "p.jsonl", pairs),
                                  output_dir=str(tmp_path / "a"), **common))
    b = train_reward(RewardConfig(dataset=str(tmp_path / "pairs"), output_dir=str(tmp_path / "b"), **common))
    assert [r["loss"] for r in read_metrics(str(tmp_path / "a")) if "loss" in r] == \
        [r["loss"] for r in read_metrics(str(tmp_path / "b")) if "loss" in r]
    assert a["eval/accuracy"] == b["eval/accuracy"] and a["eval/accuracy_gold"] == b["eval/accuracy_gold"]


def test_dpo_on_a_saved_folder(tmp_path, tiny_models):
    datasets = pytest.importorskip("datasets")

    from rlhf.dpo import train_dpo

    pairs = tasks.make_preference_pairs(16, seed=7)
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "pairs"))
    common = {"model": tiny_models["llama"], "max_steps": 2, "per_device_batch_size": 4, "max_length": 16,
              "logging_steps": 1, "progress_bar": False, "eval_fraction": 0.25, "lr": 1e-2}
    a = train_dpo(DPOConfig(dataset=write_jsonl(tmp_path / "p.jsonl", pairs), output_dir=str(tmp_path / "a"),
                            **common))
    b = train_dpo(DPOConfig(dataset=str(tmp_path / "pairs"), output_dir=str(tmp_path / "b"), **common))
    assert a["eval/loss"] == b["eval/loss"] and os.path.isdir(tmp_path / "b")
