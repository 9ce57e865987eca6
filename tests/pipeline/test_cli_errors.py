"""Every mistake named in one line: a bad option, path, file or data set makes ``rlhf <command>``
print exactly one line ``rlhf <command>: error: ...`` naming the problem, and exit with status 2;
``--debug`` (or ``RLHF_DEBUG=1``) adds the traceback; a real bug keeps its traceback.  Options are
validated once, in the config dataclasses, the same from YAML and the command line."""

import os
import re
import subprocess
import sys

import pytest
import torch

from rlhf.checkpoint import holds_run
from rlhf.config import ConfigError, TrainConfig, make_config, parse_config
from rlhf.dpo import DPOConfig
from rlhf.pipeline import PipelineConfig
from rlhf.ppo import PPOConfig, PPOHyperParams
from rlhf.sft import SFTConfig

from .helpers import write_jsonl
from .test_trainers import pref_records, sft_records


def open_bytes(path):
    with open(path, "rb") as fh:
        return fh.read()


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def files(tmp_path, tiny_models):
    """Paths of good and bad inputs."""
    f = {"model": tiny_models["llama"], "out": str(tmp_path / "out")}
    f["sft"] = write_jsonl(tmp_path / "sft.jsonl", sft_records("prompt_completion", 16))
    f["pref"] = write_jsonl(tmp_path / "pref.jsonl", pref_records("explicit", 16))
    f["numeric"] = write_jsonl(tmp_path / "numeric.jsonl", [{"prompt": "ab=", "completion": 5}] * 16)
    f["one"] = write_jsonl(tmp_path / "one.jsonl", sft_records("prompt_completion", 1))
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"prompt": "a=", "completion": "b"}\n{"prompt": "caf\xe9=", "completion": "b"}\n')
    f["latin1"] = str(latin)
    unreadable = tmp_path / "locked.jsonl"
    unreadable.write_text('{"prompt": "a=", "completion": "b"}\n')
    unreadable.chmod(0)
    f["locked"] = str(unreadable)
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in os.listdir(tiny_models["llama"]):
        if name in ("config.json", "model.safetensors", "generation_config.json"):
            (no_tok / name).write_bytes(open_bytes(os.path.join(tiny_models["llama"], name)))
    f["no_tok"] = str(no_tok)
    yaml_float = tmp_path / "float.yaml"
    yaml_float.write_text("max_steps: 2.7\n")
    f["yaml_float"] = str(yaml_float)
    yaml_bad = tmp_path / "bad.yaml"
    yaml_bad.write_text("lr: [1, 2\n")
    f["yaml_bad"] = str(yaml_bad)
    return f


S = ["sft", "--model", "{model}", "--dataset", "{sft}", "--output-dir", "{out}"]
P = ["dpo", "--model", "{model}", "--dataset", "{pref}", "--output-dir", "{out}"]
PPO = ["ppo", "--model", "{model}", "--reward-model", "{model}", "--output-dir", "{out}"]

# (argv, what the one line must say): the list of inputs accepted silently or caught late
CASES = [
    (S + ["--max-steps", "-1"], r"--max-steps must be >= 0, got -1"),
    (S + ["--num-epochs", "-1"], r"--num-epochs must be > 0"),
    (S + ["--save-steps", "-2"], r"--save-steps must be >= 0, got -2"),
    (S + ["--per-device-batch-size", "-3"], r"--per-device-batch-size must be >= 1, got -3"),
    (S + ["--per-device-batch-size", "0"], r"--per-device-batch-size must be >= 1, got 0"),
    (S + ["--gradient-accumulation-steps", "0"], r"--gradient-accumulation-steps must be >= 1"),
    (S + ["--logging-steps", "-5"], r"--logging-steps must be >= 1, got -5"),
    (S + ["--warmup-steps", "-3"], r"--warmup-steps must be >= 0, got -3"),
    (S + ["--max-grad-norm", "-1"], r"--max-grad-norm must be >= 0 \(0 turns clipping off\)"),
    (S + ["--lr-scheduler", "bogus"], r"--lr-scheduler must be one of cosine, linear, constant, got 'bogus'"),
    (S + ["--max-steps", "2.7"], r"--max-steps expects int, got '2.7'"),
    (S + ["--config", "{yaml_float}"], r"--max-steps expects int, got 2.7"),
    (S + ["--config", "{yaml_bad}"], r"--config file .*bad.yaml.* is not valid YAML"),
    (S + ["--config", "/no/such.yaml"], r"--config file '/no/such.yaml' does not exist"),
    (S + ["--eval-fraction", "1.5"], r"--eval-fraction must be in \[0, 1\)"),
    (S + ["--no-such-option", "1"], r"unrecognized arguments: --no-such-option"),
    (S + ["--output-dir", ""], r"--output-dir must be a folder path, got ''"),
    (S + ["--device", "cuda"], r"--device cuda: CUDA is not available") if not torch.cuda.is_available() else
    (S + ["--device", "cuda:999"], r"--device cuda:999: this machine has"),
    (S + ["--device", "tpu"], r"--device must be auto, cpu, cuda, cuda:N or mps"),
    (["sft", "--model", "/no/such/model", "--dataset", "{sft}", "--output-dir", "{out}"],
     r"model path '/no/such/model' does not exist"),
    (["sft", "--model", "{no_tok}", "--dataset", "{sft}", "--output-dir", "{out}"],
     r"model folder '.*no_tokenizer' has no tokenizer files .*pass --tokenizer"),
    (["sft", "--model", "{model}", "--dataset", "/no/such.jsonl", "--output-dir", "{out}"],
     r"dataset file '/no/such.jsonl' does not exist"),
    (["sft", "--model", "{model}", "--dataset", "{latin1}", "--output-dir", "{out}"],
     r"latin1.jsonl:2: not UTF-8 text"),
    (["sft", "--model", "{model}", "--dataset", "{numeric}", "--output-dir", "{out}"],
     r"record 0: column 'completion' must be a string or a list of .* messages, got int 5"),
    (["sft", "--model", "{model}", "--dataset", "{one}", "--output-dir", "{out}", "--eval-fraction", "0.05"],
     r"has 1 record\(s\) and --eval-fraction 0.05 holds out 1 for evaluation, leaving none to train on"),
    (["sft", "--model", "{model}", "--dataset", "{pref}", "--output-dir", "{out}"],
     r"needs columns messages or prompt/completion"),
    (P + ["--beta", "0"], r"--beta must be > 0"),
    (P + ["--loss-type", "nope"], r"--loss-type must be one of sigmoid, ipo, hinge, robust"),
    (PPO + ["--top-p", "0"], r"--top-p must be in \(0, 1\], got 0.0"),
    (PPO + ["--top-p", "1.5"], r"--top-p must be in \(0, 1\], got 1.5"),
    (PPO + ["--ppo-epochs", "0"], r"--ppo-epochs must be >= 1, got 0"),
    (PPO + ["--rollout-batch-size", "0"], r"--rollout-batch-size must be >= 1, got 0"),
    (PPO + ["--rollout-batch-size", "10", "--mini-batch-size", "4"], r"--rollout-batch-size must be a multiple"),
    (["pipeline", "--sft-steps", "-1", "--output-dir", "{out}"], r"--sft-steps must be >= 0, got -1"),
    (["pipeline", "--eval-prompts", "0", "--output-dir", "{out}"], r"--eval-prompts must be >= 1"),
    (["pipeline", "--output-dir", ""], r"--output-dir must be a folder path"),
]


@pytest.mark.parametrize("argv,pattern", CASES, ids=[" ".join(a[0:1] + a[6:]) or a[0] for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(files, argv, pattern, capsys):
    from rlhf.cli import main

    argv = [a.format(**files) for a in argv]
    assert main(argv) == 2, argv
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"rlhf {argv[0]}: error: "), lines
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert not holds_run(files["out"])  # nothing to protect: the corrected command may use the same folder


def test_unreadable_dataset_file(files, capsys, monkeypatch):
    import builtins
    import errno

    from rlhf.cli import main

    real_open = builtins.open

    def open_(path, *a, **k):  # chmod 0 does not stop root: refuse the way the kernel would
        if str(path) == files["locked"]:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", open_)
    assert main(["sft", "--model", files["model"], "--dataset", files["locked"], "--output-dir", files["out"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"dataset file '.*locked.jsonl' cannot be read: Permission denied", err[0])


def _run(argv, **env):
    e = {k: v for k, v in os.environ.items() if k != "RLHF_DEBUG"}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-m", "rlhf", *argv], env=e, capture_output=True, text=True, timeout=300,
                          check=False)


def test_through_the_real_command(files):
    res = _run(["sft", "--model", "/no/such/model", "--output-dir", files["out"]])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["rlhf sft: error: model path '/no/such/model' does not exist"]
    res = _run(["ppo", "--top-p", "1.5", "--output-dir", files["out"]])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["rlhf ppo: error: --top-p must be in (0, 1], got 1.5"]


def test_debug_shows_the_traceback(files):
    argv = ["sft", "--model", "/no/such/model", "--output-dir", files["out"]]
    for res in (_run(argv + ["--debug"]), _run(argv, RLHF_DEBUG="1")):
        assert res.returncode == 2
        assert "Traceback (most recent call last)" in res.stderr and "check_model_path" in res.stderr
        assert res.stderr.strip().splitlines()[-1] == "rlhf sft: error: model path '/no/such/model' does not exist"


def test_a_real_bug_keeps_its_traceback(files, monkeypatch):
    from rlhf import sft
    from rlhf.cli import main

    def broken(cfg):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(sft, "train_sft", broken)
    with pytest.raises(ZeroDivisionError):
        main(["sft", "--output-dir", files["out"]])


# ---------------------------------------------------------------------------------------------- dataclasses


def test_validation_is_the_same_from_yaml_the_command_line_and_python(tmp_path):
    y = tmp_path / "c.yaml"
    for text, field in [("max_steps: 2.7\n", "--max-steps"), ("max_steps: true\n", "--max-steps"),
                        ("per_device_batch_size: -3\n", "--per-device-batch-size"), ("lr: fast\n", "--lr"),
                        ("model: 7\n", "--model"), ("resume: maybe\n", "--resume")]:
        y.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(field)):
            parse_config(TrainConfig, ["--config", str(y)])
    with pytest.raises(ConfigError, match="--max-steps"):
        TrainConfig(max_steps=2.7)
    with pytest.raises(ConfigError, match="--per-device-batch-size must be >= 1"):
        make_config(SFTConfig, {"per_device_batch_size": 0})
    with pytest.raises(ConfigError, match="--top-p"):
        PPOHyperParams(top_p=0.0)  # the algorithm's knobs on their own, as PPOTrainer takes them
    with pytest.raises(ConfigError, match="--ppo-epochs"):
        PPOConfig(ppo_epochs=0)
    with pytest.raises(ConfigError, match="--max-steps"):
        PPOConfig(max_steps=-1)  # TrainConfig's checks run for PPO too
    with pytest.raises(ConfigError, match="--label-smoothing"):
        DPOConfig(label_smoothing=0.5)
    with pytest.raises(ConfigError, match="--sft-steps"):
        PipelineConfig(sft_steps=-1)
    # good values still parse; YAML numbers written without a dot (1e-4) are read as numbers
    y.write_text("lr: 1e-4\nmax_steps: 3\nmax_grad_norm: 0\n")
    cfg = parse_config(SFTConfig, ["--config", str(y)])
    assert (cfg.lr, cfg.max_steps, cfg.max_grad_norm) == (1e-4, 3, 0.0) and isinstance(cfg.lr, float)


def test_pipeline_options_keep_their_names_and_reach_the_dataclass(tmp_path):
    argv = ["--output-dir", str(tmp_path), "--model", "m", "--tokenizer", "t", "--sft-data", "a", "--pref-data",
            "b", "--prompt-data", "c", "--seed", "3", "--sft-steps", "1", "--reward-steps", "2", "--ppo-steps", "3",
            "--dpo-steps", "4", "--ppo-eval-steps", "5", "--no-kl-off-run", "--eval-prompts", "6",
            "--max-new-tokens", "7", "--device", "cpu", "--kernel-backend", "reference", "--max-length", "9",
            "--sft-config", "s.yaml", "--reward-config", "r.yaml", "--ppo-config", "p.yaml", "--dpo-config", "d.yaml"]
    cfg = parse_config(PipelineConfig, argv)
    assert (cfg.model, cfg.tokenizer, cfg.sft_data, cfg.pref_data, cfg.prompt_data) == ("m", "t", "a", "b", "c")
    assert (cfg.seed, cfg.sft_steps, cfg.reward_steps, cfg.ppo_steps, cfg.dpo_steps, cfg.ppo_eval_steps) == \
        (3, 1, 2, 3, 4, 5)
    assert (cfg.kl_off_run, cfg.eval_prompts, cfg.max_new_tokens, cfg.max_length) == (False, 6, 7, 9)
    assert (cfg.sft_config, cfg.reward_config, cfg.ppo_config, cfg.dpo_config) == \
        ("s.yaml", "r.yaml", "p.yaml", "d.yaml")
    assert parse_config(PipelineConfig, []).kl_off_run is True


def test_pipeline_refuses_a_folder_holding_a_previous_run(tmp_path, capsys):
    from rlhf.cli import main

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["pipeline", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a previous pipeline run" in err[0] and "--overwrite-output-dir" in err[0]
    assert (tmp_path / "sft" / "metrics.jsonl").read_text() == '{"step": 1}\n'
