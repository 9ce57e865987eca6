"""Configs as dataclasses: a docstring per field, a YAML file (``--config``) and command-line overrides.

Every trainer declares one dataclass (subclassing :class:`TrainConfig`, or :class:`RunConfig` for PPO);
:func:`parse_config` turns it into a command line.  Precedence: the dataclass default < the YAML file < the command line.

The docstring written under each field (``lr: float = 1e-4`` then ``\"\"\"Peak learning rate.\"\"\"``)
is the field's ``--help`` text; :func:`field_docs` reads it from the source.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import typing
from dataclasses import dataclass
from typing import Any


@dataclass
class RunConfig:
    """Settings shared by every trainer (PPO batches its rollouts its own way: see :class:`TrainConfig`)."""

    model: str = "builtin"
    """Policy/base model: a local folder or a Hub name loadable with ``from_pretrained``, or
    ``builtin`` for the built-in task's tiny Llama-style model (random init, no download)."""
    tokenizer: str | None = None
    """Tokenizer folder or Hub name; defaults to ``model``."""
    dataset: str = "builtin"
    """Training data: a local .jsonl/.json/.parquet file, a ``datasets`` name, or ``builtin``."""
    dataset_split: str = "train"
    """Split to read when ``dataset`` is a ``datasets`` name."""
    eval_dataset: str | None = None
    """Held-out data (same formats); when unset, ``eval_fraction`` of ``dataset`` is held out."""
    eval_fraction: float = 0.0
    """Fraction of ``dataset`` held out for evaluation when ``eval_dataset`` is unset."""
    output_dir: str = "outputs/run"
    """Where checkpoints, the final model and metrics.jsonl are written."""
    max_length: int = 512
    """Maximum tokens per sequence (prompt + completion); completions are cut to fit, prompts never."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to ``lr``."""
    lr_scheduler: str = "cosine"
    """Decay after warmup: ``cosine``, ``linear`` or ``constant``."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    num_epochs: float = 1.0
    """Passes over the training data (ignored when ``max_steps`` > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means derive from ``num_epochs``."""
    seed: int = 0
    """Seed for model init, data order and sampling."""
    logging_steps: int = 10
    """Log metrics every this many optimizer steps."""
    eval_steps: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    save_steps: int = 0
    """Write a checkpoint every this many steps (0: only the final model)."""
    save_total_limit: int = 2
    """Keep at most this many step checkpoints (older ones are deleted)."""
    resume: bool = False
    """Continue from the last complete checkpoint in ``output_dir``."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    dtype: str = "auto"
    """Model dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32`` or ``bfloat16``."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    kernel_backend: str = "auto"
    """rlhf_kernels backend for log-probs and losses."""
    progress_bar: bool = True
    """Show a progress bar (on the main process, when stderr is a terminal)."""


@dataclass
class TrainConfig(RunConfig):
    """Settings of the trainers that step over batches of a dataset (SFT, reward model, DPO)."""

    padding_side: str = "right"
    """``right`` or ``left`` padding of training batches (position ids follow the attention mask)."""
    per_device_batch_size: int = 8
    """Sequences (or pairs) per micro-batch on each process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; global batch = per_device_batch_size * world * this."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` and its bases, by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (frozen app): no help text
            continue
        body = tree.body[0].body
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``str`` -> str."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _convert(name: str, value: Any, tp: Any) -> Any:
    base = _base_type(tp)
    if value is None:
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config field {name!r} expects true/false, got {value!r}")
    if isinstance(value, str) and value.lower() in ("none", "null") and base is not str:
        return None
    try:
        return base(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config field {name!r} expects {base.__name__}, got {value!r}") from e


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` and one ``--field-name`` option per field of ``cls``."""
    docs = field_docs(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with field: value lines (command line wins)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        # argparse formats help with %: a literal percent sign must be doubled.
        help_text = (docs.get(f.name, "") + f" (default: {default})").replace("%", "%%")
        flags = ["--" + f.name.replace("_", "-")]
        if "_" in f.name:
            flags.append("--" + f.name)
        if _base_type(tp) is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, type=str, metavar=f.name.upper(), help=help_text)
    return parser


def parse_config(cls: type, argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None):
    """Build a ``cls`` from defaults, then ``--config FILE`` (YAML), then command-line options."""
    parser = build_parser(cls, prog=prog, description=description)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    path = ns.pop("config", None)
    if path is not None:
        values.update(load_yaml(path, cls))
    values.update(ns)
    return make_config(cls, values)


def load_yaml(path: str, cls: type) -> dict[str, Any]:
    """Read a YAML mapping of field names (dashes or underscores) for ``cls``."""
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--config file {path!r} does not exist") from e
    if not isinstance(data, dict):
        raise TypeError(f"--config file {path!r} must hold a mapping of field: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(cls: type, values: dict[str, Any]):
    """``cls(**values)`` with type conversion and an error that lists the valid names for unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
    return cls(**{k: _convert(k, v, hints[k]) for k, v in values.items()})


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)
