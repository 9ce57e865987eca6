"""`rlhf pipeline`: a short smoke run of every stage on the built-in task, the report and the plots."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_rlhf_pipeline_smoke(tmp_path):
    out = tmp_path / "pipeline"
    ppo_yaml = tmp_path / "ppo.yaml"  # stage options from YAML; the pipeline keeps its paths
    ppo_yaml.write_text(
        "rollout_batch_size: 32\nmini_batch_size: 16\nvalue_model: policy_head\noutput_dir: ignored\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "rlhf",
        "pipeline",
        "--output-dir",
        str(out),
        "--sft-steps",
        "8",
        "--reward-steps",
        "8",
        "--ppo-steps",
        "2",
        "--ppo-eval-steps",
        "1",
        "--dpo-steps",
        "8",
        "--grpo-steps",
        "2",
        "--eval-prompts",
        "32",
        "--ppo-config",
        str(ppo_yaml),
        "--kernel-backend",
        "reference",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    for title in ("== sft", "== reward", "== ppo", "== ppo_no_kl", "== dpo", "== grpo", "== report"):
        assert title in res.stdout, title

    report = json.loads((out / "report.json").read_text())
    assert list(report["results"]) == ["sft", "ppo", "ppo_no_kl", "dpo", "grpo"]
    for stage, res_ in report["results"].items():
        for key in ("gold", "proxy", "kl_to_sft", "response_length"):
            assert math.isfinite(res_[key]), (stage, key, res_[key])
        assert 0.0 <= res_["gold"] <= 1.0
        assert 1.0 <= res_["response_length"] <= 8.0
    assert report["results"]["sft"]["kl_to_sft"] == 0.0  # the SFT model against itself
    for stage in ("ppo", "dpo", "grpo"):  # trained models moved away from SFT (positive KL estimate up to noise)
        assert report["results"][stage]["kl_to_sft"] != 0.0
    # the over-optimisation curve: gold and proxy logged against KL during PPO, with and without the penalty
    for curve in (report["ppo_curve"], report["ppo_no_kl_curve"]):
        assert [c["step"] for c in curve] == [0, 1, 2]
        assert all(math.isfinite(c[k]) for c in curve for k in ("gold", "proxy", "kl_to_sft"))
        assert curve[0]["kl_to_sft"] == 0.0  # step 0 is the SFT model itself
    # GRPO on the built-in task: the gold scorer is its reward (beta 0: no reference, so no KL in its curve)
    assert report["grpo_reward"] == "gold"
    grpo_last = report["stages"]["grpo"]["last"]
    assert grpo_last["step"] == 2 and abs(grpo_last["reward"] - grpo_last["objective/gold"]) < 1e-6
    assert [c["step"] for c in report["grpo_curve"]] == [0, 1, 2]
    assert all(0.0 <= c["gold"] <= 1.0 for c in report["grpo_curve"])
    assert "gold scorer" in report["table"]
    assert report["stages"]["ppo_no_kl"]["last"]["objective/kl_coef"] == 0.0
    assert report["stages"]["ppo"]["last"]["objective/kl_coef"] > 0.0
    for run in ("ppo", "ppo_no_kl"):
        run_config = (out / run / "run_config.yaml").read_text()
        assert "value_model: policy_head" in run_config and "rollout_batch_size: 32" in run_config
        assert (out / run / "model.safetensors").exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("sft", "reward", "ppo", "dpo", "grpo", "overoptimisation"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000, name
