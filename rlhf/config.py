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
from typing import Any, ClassVar, NamedTuple

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


class Alias(NamedTuple):
    """Another name for option ``target`` (TRL's or Hugging Face ``TrainingArguments``' spelling).

    ``convert`` maps the alias's value onto the target's (``--bf16 true`` -> ``dtype: bfloat16``); it
    returns :data:`IGNORED` when the value asks for nothing (``--bf16 false``)."""

    target: str
    convert: Any = None
    kind: type = str
    """The type of the alias's own value (``bool`` for a flag such as ``--bf16``)."""


IGNORED = object()


def _dtype_flag(dtype: str):
    return lambda v: dtype if v else IGNORED


def _resume_from_checkpoint(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return v.lower() in ("true", "1", "yes", "on")
    raise ConfigError(f"--resume_from_checkpoint {v!r}: resuming from a given checkpoint path is not supported; "
                      f"rlhf resumes the newest complete checkpoint of --output-dir with --resume "
                      f"(or --resume_from_checkpoint true)")


def _lr_scheduler_type(v):
    return "constant" if v == "constant_with_warmup" else v  # our constant schedule warms up too


# TRL / TrainingArguments names accepted for the options every trainer has.  Ours stay the documented
# names; an alias is listed in --help and may not contradict our name in the same file or command line.
RUN_ALIASES = {
    "learning_rate": Alias("lr"),
    "num_train_epochs": Alias("num_epochs"),
    "lr_scheduler_type": Alias("lr_scheduler", _lr_scheduler_type),
    "model_name_or_path": Alias("model"),
    "dataset_name": Alias("dataset"),
    "dataset_train_split": Alias("dataset_split"),
    "dataset_config_name": Alias("dataset_config"),
    "bf16": Alias("dtype", _dtype_flag("bfloat16"), bool),
    "fp16": Alias("dtype", _dtype_flag("float16"), bool),
    "resume_from_checkpoint": Alias("resume", _resume_from_checkpoint),
}


def aliases_of(cls: type) -> dict[str, Alias]:
    """The aliases of config class ``cls``: its own ``ALIASES`` over those of its bases."""
    out: dict[str, Alias] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("ALIASES", {}))
    names = {f.name for f in dataclasses.fields(cls)}
    return {a: al for a, al in out.items() if al.target in names and a not in names}


class ModelDefaults(type):
    """Metaclass of the run configs: the defaults of an option belong to the model.

    A config class names its command in ``DEFAULTS_KEY`` (``sft``, ``reward``, ...).  Its dataclass
    defaults are the ones for any model (TRL's trainers' defaults); when ``model`` is a built-in task,
    or a folder a run on one wrote (see :func:`model_task`), the task's tuned settings for that command
    (``Task.defaults[key]``) replace them.  Whatever the caller passes (Python keyword, YAML, command
    line) always wins."""

    def __call__(cls, *args, **kwargs):
        key = getattr(cls, "DEFAULTS_KEY", None)
        if key and not args:
            model = kwargs.get("model", _field_default(cls, "model"))
            tuned = model_defaults(cls, model)
            kwargs = {**tuned, **kwargs}
        return super().__call__(*args, **kwargs)


def _field_default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    return None


def model_task(model: Any, _depth: int = 0):
    """The built-in task ``model`` stands for: a task name, or a folder a run on one wrote (its
    ``run_config.yaml`` names the model it started from; followed back to a task or a real model),
    else None."""
    import os

    from .tasks.registry import get_task  # importing it registers the built-in tasks (rlhf/tasks/__init__)

    if not isinstance(model, str) or _depth > 8:
        return None
    task = get_task(model)
    if task is not None:
        return task
    folders = [model]
    stripped = model.rstrip("/" + os.sep)
    if os.path.basename(stripped).startswith("checkpoint-"):  # a checkpoint inside a run folder
        folders.append(os.path.dirname(stripped))
    for folder in folders:
        path = os.path.join(folder, "run_config.yaml") if folder else ""
        if path and os.path.isfile(path):
            import yaml

            try:
                with open(path, encoding="utf-8") as fh:
                    parent = (yaml.safe_load(fh) or {}).get("model")
            except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
                return None
            if isinstance(parent, str) and os.path.abspath(parent) != os.path.abspath(model):
                return model_task(parent, _depth + 1)
            return None
    return None


def model_defaults(cls: type, model: Any) -> dict[str, Any]:
    """The settings ``model``'s built-in task tunes for ``cls``'s command ({} for any other model)."""
    task = model_task(model)
    key = getattr(cls, "DEFAULTS_KEY", None)
    if task is None or not key:
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in task.defaults.get(key, {}).items() if k in names}


REPORT_TARGETS = ("tensorboard", "wandb")


def report_targets(report_to: str) -> list[str]:
    """``--report-to`` as a list: ``none`` -> [], ``tensorboard,wandb`` -> both (``all``: both)."""
    names = [x.strip() for x in str(report_to).split(",") if x.strip()]
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return list(REPORT_TARGETS)
    bad = [x for x in names if x not in REPORT_TARGETS]
    require(not bad, "report_to", "none, tensorboard, wandb, all, or a comma-separated list of tensorboard "
            "and wandb", report_to)
    return list(dict.fromkeys(names))


LR_SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
KERNEL_BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


@dataclass
class RunConfig(metaclass=ModelDefaults):
    """Settings shared by every trainer (PPO batches its rollouts its own way: see :class:`TrainConfig`).

    The defaults written here are for any model, following TRL's trainers; a built-in task replaces
    some of them with its own tuned settings (:class:`ModelDefaults`)."""

    DEFAULTS_KEY: ClassVar[str | None] = None
    """The command whose settings a built-in task tunes (``Task.defaults[DEFAULTS_KEY]``)."""
    ALIASES: ClassVar[dict[str, Alias]] = RUN_ALIASES
    """Other accepted names of options (TRL's), merged over the class hierarchy: :func:`aliases_of`."""

    model: str = DEFAULT_TASK
    """Policy/base model: a local folder or a Hub name loadable with ``from_pretrained``, or
    ``builtin`` for the built-in task's tiny Llama-style model (random init, no download)."""
    tokenizer: str | None = None
    """Tokenizer folder or Hub name; defaults to ``model``."""
    dataset: str = DEFAULT_TASK
    """Training data: a local .jsonl/.json/.parquet file, a folder written by ``datasets``'
    ``save_to_disk``, a Hub dataset name, or ``builtin``."""
    dataset_split: str = "train"
    """Split to read when ``dataset`` is a Hub dataset or a saved ``DatasetDict`` folder."""
    dataset_config: str | None = None
    """Configuration (subset) of a Hub dataset: the ``name`` argument of ``datasets.load_dataset``."""
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
    report_to: str = "none"
    """Also send the logged metrics to ``tensorboard`` (``OUTPUT_DIR/tensorboard``), ``wandb`` (project
    from WANDB_PROJECT, default ``rlhf``; WANDB_MODE=offline needs no network), both
    (``tensorboard,wandb``) or ``none``; metrics.jsonl is always written."""
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
        require(self.dataset_config is None or self.dataset_config.strip() != "", "dataset_config",
                "a configuration name (or unset)", self.dataset_config)
        report_targets(self.report_to)
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

    ALIASES: ClassVar[dict[str, Alias]] = {
        "per_device_train_batch_size": Alias("per_device_batch_size"),
    }

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
    """An argparse parser with ``--config``, ``--debug``, one ``--field-name`` option per field of ``cls``
    (``--field_name`` too) and its aliases (:func:`aliases_of`)."""
    docs = field_docs(cls)
    parser = ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with field: value lines (command line wins)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: environment variable RLHF_DEBUG=1)")
    hints = typing.get_type_hints(cls)
    tuned = _tuned_defaults(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = f" (default: {default}" + (f"; built-in task: {tuned[f.name]}" if f.name in tuned else "") + ")"
        # argparse formats help with %: a literal percent sign must be doubled.
        help_text = (docs.get(f.name, "") + shown).replace("%", "%%")
        flags = ["--" + f.name.replace("_", "-")]
        if "_" in f.name:
            flags.append("--" + f.name)
        if _base_type(tp) is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, type=str, metavar=f.name.upper(), help=help_text)
    aliases = aliases_of(cls)
    if aliases:
        group = parser.add_argument_group("TRL names", "accepted in place of ours (also in --config YAML); "
                                          "giving both with different values is an error")
        for name, al in aliases.items():
            what = f"alias of {option(al.target)}"
            if al.kind is bool:
                what += f" (true: {option(al.target)} {al.convert(True)})" if al.convert else ""
                group.add_argument("--" + name, dest=_ALIAS_DEST + name, nargs="?", const="true", metavar="BOOL",
                                   help=what)
            else:
                group.add_argument("--" + name, dest=_ALIAS_DEST + name, metavar=al.target.upper(), help=what)
    return parser


_ALIAS_DEST = "alias:"


def _tuned_defaults(cls: type) -> dict[str, Any]:
    """What the default built-in task sets for ``cls`` (shown in --help beside our defaults)."""
    return model_defaults(cls, DEFAULT_TASK)


def resolve_aliases(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` (from one source: a YAML file or the command line) with aliases renamed to our
    options and their values converted; an alias that contradicts our name, or another alias of the
    same option, in the same source is a :class:`ConfigError` naming both."""
    aliases = aliases_of(cls)
    hints = typing.get_type_hints(cls)
    out = {k: v for k, v in values.items() if k not in aliases}
    given_as: dict[str, str] = {k: option(k) for k in out}
    for name, value in values.items():
        al = aliases.get(name)
        if al is None:
            continue
        if al.kind is bool and isinstance(value, str):
            value = _convert(name, value, bool)
        if al.convert is not None:
            value = al.convert(value)
        if value is IGNORED:
            continue
        if al.target in out:
            mine, theirs = _convert(al.target, out[al.target], hints[al.target]), _convert(al.target, value,
                                                                                          hints[al.target])
            if mine != theirs:
                raise ConfigError(f"--{name} (an alias of {option(al.target)}) gives {theirs!r} but "
                                  f"{given_as[al.target]} gives {mine!r} {where}; give one of them")
            continue
        out[al.target] = value
        given_as[al.target] = "--" + name
    return out


def parse_config(cls: type, argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None):
    """Build a ``cls`` from defaults (the model's: :class:`ModelDefaults`), then ``--config FILE``
    (YAML), then command-line options; TRL's names are accepted for ours (:func:`aliases_of`)."""
    parser = build_parser(cls, prog=prog, description=description)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    ns.pop("debug", None)
    path = ns.pop("config", None)
    if path is not None:
        values.update(load_yaml(path, cls))
    cli = {k.removeprefix(_ALIAS_DEST): v for k, v in ns.items()}
    values.update(resolve_aliases(cls, cli, "on the command line"))
    return make_config(cls, values)


def load_yaml(path: str, cls: type) -> dict[str, Any]:
    """Read a YAML mapping of field names (dashes or underscores, or their aliases) for ``cls``."""
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
    return resolve_aliases(cls, {str(k).replace("-", "_"): v for k, v in data.items()}, f"in --config {path}")


def make_config(cls: type, values: dict[str, Any]):
    """``cls(**values)`` with type conversion and an error that lists the valid names for unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        aliases = sorted(aliases_of(cls)) if dataclasses.is_dataclass(cls) and isinstance(cls, type) else []
        raise ConfigError(f"unknown config field(s) {unknown} for {cls.__name__}; valid: {sorted(names)}"
                          + (f"; TRL names also accepted: {aliases}" if aliases else ""))
    return cls(**{k: _convert(k, v, hints[k]) for k, v in values.items()})


def debug_requested(argv: list[str] | None) -> bool:
    """``--debug`` on the command line or ``RLHF_DEBUG`` set to a true value: show tracebacks."""
    import os

    return "--debug" in (argv or []) or os.environ.get("RLHF_DEBUG", "").lower() in ("1", "true", "yes", "on")


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)
