"""``rlhf pipeline``: the whole RLHF job in one command, SFT -> reward model -> PPO, and DPO and GRPO beside it.

With no arguments it runs the built-in task (no download) on CPU in minutes:

1. SFT on demonstrations (``rlhf sft``);
2. a reward model on preference pairs, initialised from the SFT model (``rlhf reward``);
3. PPO from the SFT model against that reward model (``rlhf ppo``), tracking the gold score beside
   the proxy reward as the KL to SFT grows;
4. the same PPO with the KL penalty off, to show over-optimisation of the proxy (Gao et al., 2022);
5. DPO from the same SFT model on the same pairs (``rlhf dpo``);
6. GRPO from the same SFT model (``rlhf grpo``): on a built-in task with its gold scorer as a
   verifiable reward, otherwise against the reward model (``--grpo-reward``).

Each final model is then sampled on the same held-out prompts and scored: mean gold score (built-in
task), reward-model score (the proxy), KL to the SFT model (nats per response) and response length.
It prints a table per stage and the comparison table, and writes ``OUTPUT_DIR/report.json`` and PNG
plots of the training curves (``OUTPUT_DIR/plots/``, when matplotlib is installed).

    rlhf pipeline                                               # built-in task, ~10 minutes on 2 cores
    rlhf pipeline --model Qwen/Qwen2.5-0.5B --sft-data sft.jsonl --pref-data pairs.jsonl \\
        --prompt-data prompts.jsonl --output-dir out/pipeline
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from .tasks import DEFAULT_TASK


@dataclass
class PipelineConfig:
    """``rlhf pipeline`` settings (each stage's own options come from its ``--<stage>-config`` YAML)."""

    output_dir: str = "outputs/pipeline"
    """Where every stage's folder, report.json and the plots go."""
    overwrite_output_dir: bool = False
    """Run again in an ``output_dir`` that holds a previous pipeline run (its stages are overwritten)."""
    model: str = DEFAULT_TASK
    """Base model: a folder or Hub name, or ``builtin`` (the built-in task's tiny Llama)."""
    tokenizer: str | None = None
    """Tokenizer (default: the model's)."""
    sft_data: str = DEFAULT_TASK
    """SFT data (messages or prompt/completion)."""
    pref_data: str = DEFAULT_TASK
    """Preference pairs for the reward model and DPO."""
    prompt_data: str = DEFAULT_TASK
    """Prompts for PPO."""
    seed: int = 0
    """Seed of every stage and of the report's sampling."""
    sft_steps: int = 0
    """SFT optimizer steps (0: the stage's default epochs)."""
    reward_steps: int = 0
    """Reward-model optimizer steps (0: the stage's default epochs)."""
    ppo_steps: int = 60
    """PPO steps, each sampling a rollout batch (0: the stage's default epochs)."""
    dpo_steps: int = 0
    """DPO optimizer steps (0: the stage's default epochs)."""
    grpo_steps: int = 60
    """GRPO steps, each sampling a generation batch (0: the stage's default epochs)."""
    grpo_run: bool = True
    """Run the GRPO stage (``--no-grpo-run`` skips it)."""
    grpo_reward: str = "auto"
    """GRPO's reward: ``gold`` (the built-in task's gold scorer, a verifiable reward), ``reward_model``
    (the pipeline's reward model), ``both`` (summed), or ``auto``: gold when the prompt data is a
    built-in task with a gold scorer, else the reward model."""
    ppo_eval_steps: int = 10
    """Evaluate gold/proxy/KL during PPO (and gold during GRPO) every this many steps (0: only at the end)."""
    kl_off_run: bool = True
    """Also run PPO with the KL penalty off, to show over-optimisation (``--no-kl-off-run`` skips it)."""
    eval_prompts: int = 256
    """Held-out prompts sampled per model for the report."""
    max_new_tokens: int | None = None
    """Response budget (built-in task: 8)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    kernel_backend: str = "auto"
    """rlhf_kernels backend for log-probs and losses."""
    report_to: str = "none"
    """Every stage also reports its metrics to ``tensorboard``, ``wandb`` or both (``none``: metrics.jsonl only)."""
    max_length: int | None = None
    """Maximum prompt + response tokens (built-in task: 32)."""
    sft_config: str | None = None
    """YAML of ``rlhf sft`` options for that stage (e.g. lr, batch sizes); the pipeline sets the model,
    data and output folders."""
    reward_config: str | None = None
    """YAML of ``rlhf reward`` options for that stage; the pipeline sets the model, data and output folders."""
    ppo_config: str | None = None
    """YAML of ``rlhf ppo`` options for that stage; the pipeline sets the model, data and output folders."""
    dpo_config: str | None = None
    """YAML of ``rlhf dpo`` options for that stage; the pipeline sets the model, data and output folders."""
    grpo_config: str | None = None
    """YAML of ``rlhf grpo`` options for that stage; the pipeline sets the model, data, reward and output folders."""

    def __post_init__(self):
        from .config import KERNEL_BACKENDS, check_types, require, require_choice

        check_types(self)
        require(self.output_dir.strip() != "", "output_dir", "a folder path", self.output_dir)
        for name in ("sft_steps", "reward_steps", "ppo_steps", "dpo_steps", "grpo_steps", "ppo_eval_steps"):
            require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        require(self.eval_prompts >= 1, "eval_prompts", ">= 1", self.eval_prompts)
        if self.max_new_tokens is not None:
            require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        if self.max_length is not None:
            require(self.max_length >= 2, "max_length", ">= 2", self.max_length)
        require(self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"), "device",
                "auto, cpu, cuda, cuda:N or mps", self.device)
        require_choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        require_choice("grpo_reward", self.grpo_reward, ("auto", "gold", "reward_model", "both"))
        from .config import report_targets

        report_targets(self.report_to)


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
    from .metrics_log import read_metrics

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
    from .config import ConfigError, load_yaml, make_config

    values = {**defaults, **(load_yaml(yaml_path, cls) if yaml_path else {}), **fixed}
    try:
        return make_config(cls, values)
    except ConfigError as e:
        where = f"--config {yaml_path}" if yaml_path else "the pipeline's settings"
        raise ConfigError(f"{cls.__name__} from {where}: {e}") from e


def run_pipeline(args: PipelineConfig) -> dict:
    import torch
    import transformers

    from .config import to_dict
    from .dpo import DPOConfig, train_dpo
    from .evaluate import evaluate_policy
    from .grpo import GRPOConfig, train_grpo
    from .models import load_policy, load_reward_model, load_tokenizer, resolve_device
    from .ppo import PPOConfig, train_ppo
    from .reward import RewardConfig, train_reward
    from .sft import SFTConfig, train_sft
    from .tasks import get_task

    transformers.utils.logging.set_verbosity_error()  # load reports and progress bars drown the tables
    transformers.utils.logging.disable_progress_bar()
    from .checkpoint import holds_run
    from .config import UserError

    out = args.output_dir
    paths = {s: os.path.join(out, s) for s in ("sft", "reward", "ppo", "ppo_no_kl", "dpo", "grpo")}
    if not args.overwrite_output_dir and any(holds_run(p) for p in [out, *paths.values()]):
        raise UserError(f"--output-dir {out!r} holds a previous pipeline run; pass --overwrite-output-dir to "
                        f"run again over it, or choose another folder")
    os.makedirs(out, exist_ok=True)
    task = get_task(args.prompt_data)  # a built-in task: its prompts and gold scorer
    has_gold = task is not None and task.gold_score is not None
    grpo_reward = args.grpo_reward if args.grpo_reward != "auto" else "gold" if has_gold else "reward_model"
    if args.grpo_run and grpo_reward in ("gold", "both") and not has_gold:
        raise UserError(f"--grpo-reward {grpo_reward}: the prompt data {args.prompt_data!r} is not a built-in task "
                        f"with a gold scorer; use --grpo-reward reward_model")
    common = {
        "seed": args.seed,
        "device": args.device,
        "kernel_backend": args.kernel_backend,
        "progress_bar": False,
        "overwrite_output_dir": args.overwrite_output_dir,
        "report_to": args.report_to,
    }
    if args.tokenizer:
        common["tokenizer"] = args.tokenizer
    length = {"max_length": args.max_length} if args.max_length else {}
    summary: dict = {"stages": {}, "args": to_dict(args)}
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
    # Each stage's defaults follow its model (rlhf.config.ModelDefaults): the SFT folder of a built-in
    # task's model gets the task's tuned settings, any other model TRL's.
    ppo_kw = {}
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
    if args.grpo_run:
        grpo_kw = {"max_steps": args.grpo_steps} if args.grpo_steps > 0 else {}
        if args.max_new_tokens:
            grpo_kw["max_completion_length"] = args.max_new_tokens
        grpo_kw.update(eval_steps=args.ppo_eval_steps, eval_prompts=min(args.eval_prompts, 128), **length,
                       **tok_common)
        reward = {"reward_fn": "gold" if grpo_reward in ("gold", "both") else None,
                  "reward_model": paths["reward"] if grpo_reward in ("reward_model", "both") else ""}
        fixed = {"model": paths["sft"], "dataset": args.prompt_data, "output_dir": paths["grpo"], **reward}
        stage("grpo", train_grpo, _config(GRPOConfig, args.grpo_config, grpo_kw, fixed))
        summary["grpo_reward"] = grpo_reward
        runs.append("grpo")

    # ---- the report: every final model sampled on the same held-out prompts ----
    print("\n[pipeline] evaluating every stage on the same held-out prompts", flush=True)
    device = resolve_device(args.device)
    tok = load_tokenizer(paths["sft"])
    if task is not None:
        eval_prompts = [r["prompt"] for r in task.prompts(args.eval_prompts, seed=10_000 + args.seed)]
    else:
        from .data import load_records, take

        eval_prompts = [r["prompt"] for r in take(load_records(args.prompt_data), args.eval_prompts)]
    sft_model = load_policy(paths["sft"], tok, device, trainable=False)
    reward_model = load_reward_model(paths["reward"], tok, device, trainable=False)
    max_new = ppo_cfg.max_new_tokens
    rows, results = [], {}
    trained_on = {"sft": "demonstrations", "ppo": "reward model", "ppo_no_kl": "reward model, no KL",
                  "dpo": "preference pairs",
                  "grpo": {"gold": "gold scorer", "reward_model": "reward model",
                           "both": "gold scorer + reward model"}.get(summary.get("grpo_reward"), "")}
    for name in runs:
        model = sft_model if name == "sft" else load_policy(paths[name], tok, device, trainable=False)
        res = evaluate_policy(
            model,
            sft_model,
            reward_model,
            tok,
            eval_prompts,
            gold_fn=task.gold_score if task is not None else None,
            max_new_tokens=max_new,
            seed=args.seed,
            backend=args.kernel_backend,
        )
        results[name] = res
        rows.append({"stage": name, **res, "trained_on": trained_on.get(name, "")})
    columns = (
        ["stage", "gold", "proxy", "kl_to_sft", "response_length", "trained_on"]
        if task is not None and task.gold_score is not None
        else ["stage", "proxy", "kl_to_sft", "response_length", "trained_on"]
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
    if args.grpo_run:
        summary["grpo_curve"] = _ppo_curve(paths["grpo"])
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
    """The evaluations logged during PPO (or GRPO) training: step, gold, proxy, KL to SFT
    (over-optimisation); GRPO without a reward model or reference logs no proxy or KL."""
    from .metrics_log import read_metrics

    return [
        {k.removeprefix("eval/"): v for k, v in r.items() if k == "step" or k.startswith("eval/")}
        for r in read_metrics(path)
        if any(k.startswith("eval/") for k in r)
    ]


def make_plots(out: str, paths: dict, runs: list[str]) -> list[str]:
    """PNG training curves per stage and the gold/proxy-vs-KL plot; [] (after a one-line notice) when
    matplotlib is missing."""
    from .optional import optional

    matplotlib = optional("matplotlib", "plots skipped")
    if matplotlib is None:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics_log import read_metrics

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
        "grpo": [
            "reward",
            "objective/gold",
            "eval/gold",
            "kl",
            "entropy",
            "completions/mean_length",
            "clip_ratio/region_mean",
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
    """The whole RLHF pipeline (SFT, reward model, PPO, DPO, GRPO) on the built-in task, with a report."""
    from .config import parse_config
    from .trainer_utils import command_body

    def body() -> int:
        cfg = parse_config(PipelineConfig, argv, prog="rlhf pipeline", description=__doc__.split("\n\n")[0])
        run_pipeline(cfg)
        return 0

    return command_body("pipeline", argv, body)
