"""Configs as dataclasses: a docstring per field, a YAML file (``--config``) and command-line overrides.

Every trainer declares one dataclass (subclassing :class:`TrainConfig`, or :class:`RunConfig` for PPO);
:func:`parse_config` turns it into a command line.  Precedence: the dataclass default < the YAML file < the command line.

The docstring written under each field (``lr: float = 1e-4`` then ``\"\"\"Peak learning rate.\"\"\"``)
is the field's ``--help`` text; :func:`field_docs` reads it from the source.

Every field's type and range is checked in ``__post_init__`` (:meth:`TrainConfig.__post_init__`), so a
config built from YAML, from the command line or in Python is validated once, the same way; a bad
value raises :class:`ConfigError` naming the option.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import math
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

from .tasks.registry import DEFAULT_TASK


class UserError(Exception):
    """A mistake in what the user asked for (an option, a path, a file, the data): ``rlhf`` prints
    the message as one line ``rlhf <command>: error: ...`` and exits with status 2."""


class ConfigError(UserError, ValueError):
    """An invalid option value: the message names the option."""


def option(name: str) -> str:
    """The command-line spelling of field ``name``."""
    return "--" + name.replace("_", "-")


COMMA_LISTS = frozenset({"lora_target_modules", "lora_modules_to_save"})
"""``str`` fields holding comma-separated names, which also take a list of strings (from YAML)."""


def check_types(config) -> None:
    """Check (and normalise) every field of dataclass instance ``config`` against its annotation:
    ``int`` fields take integers only (a YAML ``2.7`` or ``true`` is an error, as on the command
    line), ``float`` fields take ints or floats (stored as float), ``str`` fields take strings,
    ``bool`` fields take booleans; ``X | None`` also takes None."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        tp = hints[f.name]
        value = getattr(config, f.name)
        optional = type(None) in typing.get_args(tp)
        base = _base_type(tp)
        if f.name in COMMA_LISTS and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = ",".join(value)  # YAML may give a list of names, as TRL's configs take
            object.__setattr__(config, f.name, value)
        if value is None:
            if not optional:
                raise ConfigError(f"{option(f.name)} must be a {base.__name__}, got None")
            continue
        if base is bool:
            ok = isinstance(value, bool)
        elif base is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif base is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                value = float(value)
                if math.isnan(value):
                    raise ConfigError(f"{option(f.name)} must be a number, got nan")
                object.__setattr__(config, f.name, value)
        elif base is str:
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"{option(f.name)} expects {base.__name__}, got {value!r} ({type(value).__name__})")


def require(ok: bool, name: str, what: str, value: Any) -> None:
    """Raise :class:`ConfigError` ``--name must be <what>, got <value>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{option(name)} must be {what}, got {value!r}")


def require_choice(name: str, value: Any, choices) -> None:
    require(value in choices, name, "one of " + ", ".join(map(str, choices)), value)


LR_SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
KERNEL_BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


@dataclass
class RunConfig:
    """Settings shared by every trainer (PPO batches its rollouts its own way: see :class:`TrainConfig`)."""

    model: str = DEFAULT_TASK
    """Policy/base model: a local folder or a Hub name loadable with ``from_pretrained``, or
    ``builtin`` for the built-in task's tiny Llama-style model (random init, no download)."""
    tokenizer: str | None = None
    """Tokenizer folder or Hub name; defaults to ``model``."""
    dataset: str = DEFAULT_TASK
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
    """Clip the global gradient norm to this (0 turns clipping off)."""
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
    """Keep at most this many step checkpoints of this run (older ones are deleted; 0 keeps all)."""
    resume: bool = False
    """Continue from the last complete checkpoint in ``output_dir``."""
    overwrite_output_dir: bool = False
    """Start a new run in an ``output_dir`` that holds a previous run (its files are overwritten;
    its checkpoints are left alone and never resumed or pruned by this run)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    dtype: str = "auto"
    """Compute dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
    bf16/fp16 run the forward passes under autocast over fp32 weights (``weights_dtype``); fp16 also
    scales the loss."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    kernel_backend: str = "auto"
    """rlhf_kernels backend for log-probs and losses."""
    progress_bar: bool = True
    """Show a progress bar (on the main process, when stderr is a terminal)."""
    ddp_timeout: float = 1800.0
    """Seconds a process waits for the others (joining, or in a collective) before the run fails
    with an error naming the rank, instead of hanging (multi-process runs only)."""
    # ---- precision storage and LoRA / PEFT (rlhf.precision, rlhf.lora); TRL's option names
    weights_dtype: str = "float32"
    """Dtype the trained weights (and so their gradients, AdamW state and the saved model) are stored
    in: ``float32`` (master weights; ``dtype`` is the compute dtype under autocast) or ``bfloat16``
    (bf16 storage and compute, half the memory; updates below a bf16 rounding step are lost)."""
    use_peft: bool = False
    """Train LoRA adapters (needs ``peft``) instead of every weight; the reference model of DPO/PPO is
    the same model with its adapters disabled."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: str | None = None
    """Comma-separated module names to adapt (e.g. ``q_proj,v_proj``), or ``all-linear``; default:
    peft's choice for the architecture (q_proj,v_proj for Llama)."""
    lora_modules_to_save: str | None = None
    """Comma-separated modules trained fully and saved beside the adapters (the reward model's
    ``score`` head always is)."""
    merge_adapters: bool = False
    """With ``use_peft``: save the final model with the adapters merged into the weights (a plain
    ``from_pretrained`` folder) instead of the adapter folder."""

    def __post_init__(self):
        check_types(self)
        require(self.output_dir.strip() != "", "output_dir", "a folder path", self.output_dir)
        for name in ("model", "dataset"):
            require(getattr(self, name).strip() != "", name, "a path, a Hub name or builtin", getattr(self, name))
        require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "in [0, 1)", self.eval_fraction)
        require(self.max_length >= 2, "max_length", ">= 2", self.max_length)
        require(self.logging_steps >= 1, "logging_steps", ">= 1", self.logging_steps)
        require(self.lr >= 0.0 and self.lr != float("inf"), "lr", ">= 0 and finite", self.lr)
        require(self.weight_decay >= 0.0, "weight_decay", ">= 0", self.weight_decay)
        require(0.0 <= self.adam_beta1 < 1.0, "adam_beta1", "in [0, 1)", self.adam_beta1)
        require(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", "in [0, 1)", self.adam_beta2)
        require_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        require(self.max_grad_norm >= 0.0, "max_grad_norm", ">= 0 (0 turns clipping off)", self.max_grad_norm)
        require(self.num_epochs > 0.0, "num_epochs", "> 0", self.num_epochs)
        for name in ("warmup_steps", "max_steps", "eval_steps", "save_steps", "save_total_limit"):
            require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        require_choice("dtype", self.dtype, DTYPES)
        require(self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"), "device",
                "auto, cpu, cuda, cuda:N or mps", self.device)
        require_choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        require(self.ddp_timeout > 0.0, "ddp_timeout", "> 0 seconds", self.ddp_timeout)
        require(not (self.resume and self.overwrite_output_dir), "resume", "off with --overwrite-output-dir "
                "(continue the run, or start a new one over it, not both)", self.resume)
        require_choice("weights_dtype", self.weights_dtype, ("float32", "fp32", "bfloat16", "bf16"))
        if self.weights_dtype in ("bfloat16", "bf16"):
            require(self.dtype in ("auto", "bfloat16", "bf16"), "dtype", "auto or bfloat16 with --weights-dtype "
                    "bfloat16 (bf16 weights compute in bf16)", self.dtype)
        require(self.lora_r >= 1, "lora_r", ">= 1", self.lora_r)
        require(self.lora_alpha > 0, "lora_alpha", "> 0", self.lora_alpha)
        require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "in [0, 1)", self.lora_dropout)
        for name in ("lora_target_modules", "lora_modules_to_save"):
            value = getattr(self, name)
            if value is not None:
                parts = [p.strip() for p in value.split(",")]
                require(all(parts), name, "comma-separated module names", value)
        require(not self.merge_adapters or self.use_peft, "merge_adapters", "used with --use-peft", True)


@dataclass
class TrainConfig(RunConfig):
    """Settings of the trainers that step over batches of a dataset (SFT, reward model, DPO)."""

    padding_side: str = "right"
    """``right`` or ``left`` padding of training batches (position ids follow the attention mask)."""
    per_device_batch_size: int = 8
    """Sequences (or pairs) per micro-batch on each process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; global batch = per_device_batch_size * world * this."""

    def __post_init__(self):
        super().__post_init__()
        require_choice("padding_side", self.padding_side, ("right", "left"))
        for name in ("per_device_batch_size", "gradient_accumulation_steps"):
            require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))


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
    """A command-line string converted to the field's type; YAML values (already typed) are left as
    they are for ``__post_init__`` to check, so ``max_steps: 2.7`` is rejected, not truncated."""
    base = _base_type(tp)
    if value is None:
        return None
    if not isinstance(value, str):
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{option(name)} expects true/false, got {value!r}")
    if isinstance(value, str) and value.lower() in ("none", "null") and base is not str:
        return None
    try:
        return base(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{option(name)} expects {base.__name__}, got {value!r}") from e


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` (one line, no usage dump) instead of exiting."""

    def error(self, message: str):
        raise ConfigError(message)


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config``, ``--debug`` and one ``--field-name`` option per field of ``cls``."""
    docs = field_docs(cls)
    parser = ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with field: value lines (command line wins)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: environment variable RLHF_DEBUG=1)")
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
    ns.pop("debug", None)
    path = ns.pop("config", None)
    if path is not None:
        values.update(load_yaml(path, cls))
    values.update(ns)
    return make_config(cls, values)


def load_yaml(path: str, cls: type) -> dict[str, Any]:
    """Read a YAML mapping of field names (dashes or underscores) for ``cls``."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"--config file {path!r} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config file {path!r} could not be read: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config file {path!r} must hold a mapping of field: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(cls: type, values: dict[str, Any]):
    """``cls(**values)`` with type conversion and an error that lists the valid names for unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
    return cls(**{k: _convert(k, v, hints[k]) for k, v in values.items()})


def debug_requested(argv: list[str] | None) -> bool:
    """``--debug`` on the command line or ``RLHF_DEBUG`` set to a true value: show tracebacks."""
    import os

    return "--debug" in (argv or []) or os.environ.get("RLHF_DEBUG", "").lower() in ("1", "true", "yes", "on")


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)
