"""``rlhf pipeline``: the whole RLHF job in one command, SFT -> reward model -> PPO, and DPO beside it.

With no arguments it runs the built-in task (no download) on CPU in minutes:

1. SFT on demonstrations (``rlhf sft``);
2. a reward model on preference pairs, initialised from the SFT model (``rlhf reward``);
3. PPO from the SFT model against that reward model (``rlhf ppo``), tracking the gold score beside
   the proxy reward as the KL to SFT grows;
4. the same PPO with the KL penalty off, to show over-optimisation of the proxy (Gao et al., 2022);
5. DPO from the same SFT model on the same pairs (``rlhf dpo``).

Each final model is then sampled on the same held-out prompts and scored: mean gold score (built-in
task), reward-model score (the proxy), KL to the SFT model (nats per response) and response length.
It prints a table per stage and the comparison table, and writes ``OUTPUT_DIR/report.json`` and PNG
plots of the training curves (``OUTPUT_DIR/plots/``, when matplotlib is installed).

    rlhf pipeline                                               # built-in task, ~10 minutes on 2 cores
    rlhf pipeline --model Qwen/Qwen2.5-0.5B --sft-data sft.jsonl --pref-data pairs.jsonl \\
        --prompt-data prompts.jsonl --output-dir out/pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import time

BUILTIN = "builtin"

# PPO settings for the built-in task's tiny model (found on the task; the PPO defaults suit real models).
BUILTIN_PPO = {
    "rollout_batch_size": 64,
    "mini_batch_size": 16,
    "ppo_epochs": 4,
    "lr": 3e-4,
    "value_lr": 3e-4,
    "max_new_tokens": 8,
    "kl_coef": 0.05,
    "max_length": 32,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="outputs/pipeline", help="where every stage and report.json go")
    p.add_argument(
        "--model", default=BUILTIN, help="base model: a folder or Hub name, or builtin (tiny Llama)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    p.add_argument("--sft-data", default=BUILTIN, help="SFT data (messages or prompt/completion)")
    p.add_argument("--pref-data", default=BUILTIN, help="preference pairs for the reward model and DPO")
    p.add_argument("--prompt-data", default=BUILTIN, help="prompts for PPO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-steps", type=int, default=0, help="0: the stage's default epochs")
    p.add_argument("--reward-steps", type=int, default=0, help="0: the stage's default epochs")
    p.add_argument("--ppo-steps", type=int, default=60, help="PPO steps (each samples a rollout batch)")
    p.add_argument("--dpo-steps", type=int, default=0, help="0: the stage's default epochs")
    p.add_argument(
        "--ppo-eval-steps", type=int, default=10, help="evaluate gold/proxy/KL during PPO every N steps"
    )
    p.add_argument(
        "--kl-off-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run PPO with the KL penalty off, to show over-optimisation (--no-kl-off-run skips it)",
    )
    p.add_argument(
        "--eval-prompts", type=int, default=256, help="held-out prompts sampled per model for the report"
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="response budget (built-in task: 8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--kernel-backend", default="auto")
    p.add_argument("--max-length", type=int, default=None, help="max prompt + response tokens (built-in: 32)")
    for name in ("sft", "reward", "ppo", "dpo"):
        p.add_argument(
            f"--{name}-config",
            default=None,
            metavar="YAML",
            help=f"YAML of `rlhf {name}` options for that stage (e.g. lr, batch sizes); "
            "the pipeline sets the model, data and output folders",
        )
    return p


def _short(metrics: dict, keys=None) -> dict:
    keys = keys or [
        k for k in metrics if not k.startswith("timing/") and k not in ("lr", "epoch", "grad_norm")
    ]
    return {k: metrics[k] for k in keys if k in metrics and isinstance(metrics[k], (int, float))}


def print_table(title: str, rows: list[dict], columns: list[str]) -> str:
    """A plain-text table (also returned, for the log)."""
    cells = [
        [str(r.get(c, "")) if not isinstance(r.get(c), float) else f"{r[c]:.4g}" for c in columns]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join("-" * w for w in widths)
    text = "\n".join(
        [f"== {title}", "  ".join(c.ljust(w) for c, w in zip(columns, widths)), line]
        + ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    )
    print(text, flush=True)
    return text


def _stage_table(name: str, out_dir: str, seconds: float) -> dict:
    """Print a stage's first and last logged training metrics and its last evaluation; returns them."""
    from .logging import read_metrics

    records = read_metrics(out_dir)
    train = [r for r in records if "lr" in r]
    evals = [r for r in records if "lr" not in r]
    first, last = (train[0], train[-1]) if train else ({}, {})
    final_eval = evals[-1] if evals else {}
    rows = [
        {"metric": k, f"step {first.get('step')}": first.get(k), f"step {last.get('step')}": last[k]}
        for k in sorted(_short(last))
        if k != "step"
    ]
    rows += [
        {"metric": k, f"step {last.get('step')}": v}
        for k, v in sorted(_short(final_eval).items())
        if k != "step"
    ]
    columns = ["metric", f"step {first.get('step')}", f"step {last.get('step')}"] if train else ["metric"]
    print_table(f"{name} ({seconds:.0f} s)", rows, columns)
    return {"seconds": seconds, "first": first, "last": last, "eval": final_eval}


def _config(cls, yaml_path: str | None, defaults: dict, fixed: dict):
    """``cls`` from the pipeline's defaults, overridden by the stage's YAML, with ``fixed`` (paths) last."""
    from .config import load_yaml, make_config

    values = {**defaults, **(load_yaml(yaml_path, cls) if yaml_path else {}), **fixed}
    return make_config(cls, values)


def run_pipeline(args) -> dict:
    import torch
    import transformers

    from .dpo import DPOConfig, train_dpo
    from .evaluate import evaluate_policy
    from .models import load_policy, load_reward_model, load_tokenizer, resolve_device
    from .ppo import PPOConfig, train_ppo
    from .reward import RewardConfig, train_reward
    from .sft import SFTConfig, train_sft
    from .tasks import gold_score, make_prompts

    transformers.utils.logging.set_verbosity_error()  # load reports and progress bars drown the tables
    transformers.utils.logging.disable_progress_bar()
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    builtin_task = args.prompt_data == BUILTIN
    common = {
        "seed": args.seed,
        "device": args.device,
        "kernel_backend": args.kernel_backend,
        "progress_bar": False,
    }
    if args.tokenizer:
        common["tokenizer"] = args.tokenizer
    length = {"max_length": args.max_length} if args.max_length else {}
    paths = {s: os.path.join(out, s) for s in ("sft", "reward", "ppo", "ppo_no_kl", "dpo")}
    summary: dict = {"stages": {}, "args": vars(args)}
    t_all = time.time()

    def stage(name, fn, cfg):
        print(f"\n[pipeline] {name}: output in {cfg.output_dir}", flush=True)
        t0 = time.time()
        fn(cfg)
        summary["stages"][name] = _stage_table(name, cfg.output_dir, time.time() - t0)

    steps = lambda n: {"max_steps": n} if n > 0 else {}
    stage(
        "sft",
        train_sft,
        _config(
            SFTConfig,
            args.sft_config,
            {"gold_eval_prompts": 0, **steps(args.sft_steps), **length, **common},
            {"model": args.model, "dataset": args.sft_data, "output_dir": paths["sft"]},
        ),
    )
    tok_common = {k: v for k, v in common.items() if k != "tokenizer"}  # later stages read the SFT folder's
    stage(
        "reward",
        train_reward,
        _config(
            RewardConfig,
            args.reward_config,
            {**steps(args.reward_steps), **length, **tok_common},
            {"model": paths["sft"], "dataset": args.pref_data, "output_dir": paths["reward"]},
        ),
    )
    ppo_kw = dict(BUILTIN_PPO) if builtin_task else {}
    if args.max_new_tokens:
        ppo_kw["max_new_tokens"] = args.max_new_tokens
    if args.max_length:
        ppo_kw["max_length"] = args.max_length
    ppo_kw.update(
        max_steps=args.ppo_steps,
        eval_steps=args.ppo_eval_steps,
        eval_prompts=min(args.eval_prompts, 128),
        **tok_common,
    )
    ppo_paths = {"model": paths["sft"], "reward_model": paths["reward"], "dataset": args.prompt_data}
    ppo_cfg = _config(PPOConfig, args.ppo_config, ppo_kw, {**ppo_paths, "output_dir": paths["ppo"]})
    stage("ppo", train_ppo, ppo_cfg)
    runs = ["sft", "ppo"]
    if args.kl_off_run:
        fixed = {**ppo_paths, "output_dir": paths["ppo_no_kl"], "kl_coef": 0.0, "adaptive_kl": False}
        stage("ppo_no_kl", train_ppo, _config(PPOConfig, args.ppo_config, ppo_kw, fixed))
        runs.append("ppo_no_kl")
    stage(
        "dpo",
        train_dpo,
        _config(
            DPOConfig,
            args.dpo_config,
            {"gold_eval_prompts": 0, **steps(args.dpo_steps), **length, **tok_common},
            {"model": paths["sft"], "dataset": args.pref_data, "output_dir": paths["dpo"]},
        ),
    )
    runs.append("dpo")

    # ---- the report: every final model sampled on the same held-out prompts ----
    print("\n[pipeline] evaluating every stage on the same held-out prompts", flush=True)
    device = resolve_device(args.device)
    tok = load_tokenizer(paths["sft"])
    if builtin_task:
        eval_prompts = [r["prompt"] for r in make_prompts(args.eval_prompts, seed=10_000 + args.seed)]
    else:
        from .data import load_records

        eval_prompts = [r["prompt"] for r in load_records(args.prompt_data)[: args.eval_prompts]]
    sft_model = load_policy(paths["sft"], tok, device, trainable=False)
    reward_model = load_reward_model(paths["reward"], tok, device, trainable=False)
    max_new = ppo_cfg.max_new_tokens
    rows, results = [], {}
    for name in runs:
        model = sft_model if name == "sft" else load_policy(paths[name], tok, device, trainable=False)
        res = evaluate_policy(
            model,
            sft_model,
            reward_model,
            tok,
            eval_prompts,
            gold_fn=gold_score if builtin_task else None,
            max_new_tokens=max_new,
            seed=args.seed,
            backend=args.kernel_backend,
        )
        results[name] = res
        rows.append({"stage": name, **res})
    columns = (
        ["stage", "gold", "proxy", "kl_to_sft", "response_length"]
        if builtin_task
        else ["stage", "proxy", "kl_to_sft", "response_length"]
    )
    summary["table"] = print_table(
        f"report: {len(eval_prompts)} held-out prompts, responses sampled at temperature 1 (seed {args.seed})",
        rows,
        columns,
    )
    summary["results"] = results
    summary["ppo_curve"] = _ppo_curve(paths["ppo"])
    if args.kl_off_run:
        summary["ppo_no_kl_curve"] = _ppo_curve(paths["ppo_no_kl"])
    summary["seconds"] = time.time() - t_all
    summary["device"] = str(device)
    summary["torch_threads"] = torch.get_num_threads()
    summary["plots"] = make_plots(out, paths, runs)
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    print(
        f"\n[pipeline] done in {summary['seconds']:.0f} s; report: {os.path.join(out, 'report.json')}"
        + (f"; plots: {os.path.join(out, 'plots')}" if summary["plots"] else ""),
        flush=True,
    )
    return summary


def _ppo_curve(path: str) -> list[dict]:
    """The PPO evaluations logged during training: step, gold, proxy, KL to SFT (over-optimisation)."""
    from .logging import read_metrics

    return [
        {k.removeprefix("eval/"): v for k, v in r.items() if k == "step" or k.startswith("eval/")}
        for r in read_metrics(path)
        if any(k.startswith("eval/") for k in r)
    ]


def make_plots(out: str, paths: dict, runs: list[str]) -> list[str]:
    """PNG training curves per stage and the gold/proxy-vs-KL plot; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from .logging import read_metrics

    plot_dir = os.path.join(out, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    written = []
    panels = {
        "sft": ["loss", "eval/loss"],
        "reward": ["loss", "accuracy", "eval/accuracy", "eval/accuracy_gold"],
        "dpo": ["loss", "rewards/accuracies", "rewards/margins"],
        "ppo": [
            "objective/scores",
            "objective/gold",
            "objective/kl",
            "objective/entropy",
            "loss/value",
            "policy/clipfrac",
        ],
    }
    for stage, keys in panels.items():
        if not os.path.exists(os.path.join(paths[stage], "metrics.jsonl")):
            continue
        records = read_metrics(paths[stage])
        keys = [k for k in keys if any(k in r for r in records)]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
        for ax, k in zip(axes[0], keys):
            for run in [stage, "ppo_no_kl"] if stage == "ppo" and "ppo_no_kl" in runs else [stage]:
                pts = [
                    (r["step"], r[k]) for r in read_metrics(paths[run]) if isinstance(r.get(k), (int, float))
                ]
                if pts:
                    ax.plot(*zip(*pts), label=run)
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        if stage == "ppo" and "ppo_no_kl" in runs:
            axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(plot_dir, f"{stage}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    # over-optimisation: gold and proxy against KL to SFT, with and without the KL penalty
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for run, style in (("ppo", "-"), ("ppo_no_kl", "--")):
        if run not in runs:
            continue
        curve = _ppo_curve(paths[run])
        for key, color in (("gold", "tab:green"), ("proxy", "tab:blue")):
            pts = [(c["kl_to_sft"], c[key]) for c in curve if key in c]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, color=color, label=f"{key} ({run})")
    ax.set_xlabel("KL to SFT (nats per response)")
    ax.set_ylabel("score")
    ax.set_title("PPO: gold vs proxy reward as KL grows", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(plot_dir, "overoptimisation.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """The whole RLHF pipeline (SFT, reward model, PPO, DPO) on the built-in task, with a report."""
    args = build_parser().parse_args(argv)
    run_pipeline(args)
    return 0
