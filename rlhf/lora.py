"""LoRA / PEFT for every trainer: one call wraps a loaded model, one context gives the reference.

    model = apply_lora(model, cfg, task="causal")          # or task="reward" (the score head trained)
    with adapters_disabled(model):                        # the base model: DPO/PPO's reference
        ...

Options (TRL's names, on every trainer's config): ``use_peft``, ``lora_r``, ``lora_alpha``,
``lora_dropout``, ``lora_target_modules`` (comma-separated, or ``all-linear``; default: peft's choice
for the architecture), ``lora_modules_to_save``, and ``merge_adapters``.

What is saved.  The final model (and every checkpoint) of a LoRA run is a peft adapter folder
(``adapter_config.json``, ``adapter_model.safetensors``, the tokenizer), loadable with
``peft.AutoPeftModelForCausalLM.from_pretrained`` (``...ForSequenceClassification`` for a reward
model); its ``base_model_name_or_path`` is the absolute path of the base.  With ``merge_adapters`` the
final model is the base with the adapters merged in, a plain ``from_pretrained`` folder.

Starting from an adapter folder.  Any ``--model`` / ``--reward-model`` / ``--ref-model`` may be an
adapter folder written by an earlier stage: :func:`materialize` loads its base (recursively: an SFT
adapter on a base, a reward adapter on that), merges the adapters and writes the merged model to a
temporary folder that the loader then reads like any other model; the folder is removed at exit.
The base must still exist where the adapter says.

Why the reference is the base with adapters disabled: the trained weights are exactly the frozen base
plus the adapters, so disabling them gives the starting model without a second copy in memory.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

import torch

from .config import UserError

PEFT_INSTALL = "pip install peft  (or: pip install 'rlhf-kernels[peft]')"


def require_peft(what: str = "--use-peft"):
    """The ``peft`` module, or a :class:`UserError` naming the pip command."""
    try:
        import peft
    except ImportError as e:
        raise UserError(f"{what} needs the peft package, which is not installed: {PEFT_INSTALL}") from e
    return peft


def _names(value: str | None) -> list[str] | str | None:
    if value is None:
        return None
    if value.strip() == "all-linear":
        return "all-linear"
    return [p.strip() for p in value.split(",") if p.strip()]


def lora_config(cfg, task: str = "causal"):
    """The ``peft.LoraConfig`` of ``cfg``'s options for a ``causal`` LM or a ``reward`` model (whose
    ``score`` head is trained fully and saved with the adapters, as TRL's reward trainer does)."""
    peft = require_peft()
    to_save = _names(cfg.lora_modules_to_save) or []
    if to_save == "all-linear":
        raise UserError("--lora-modules-to-save takes module names, not all-linear")
    if task == "reward" and "score" not in to_save:
        to_save = [*to_save, "score"]
    return peft.LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=_names(cfg.lora_target_modules), modules_to_save=to_save or None, bias="none",
        task_type=peft.TaskType.SEQ_CLS if task == "reward" else peft.TaskType.CAUSAL_LM)


def is_peft_model(model) -> bool:
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def apply_lora(model, cfg, task: str = "causal", base_path: str | None = None):
    """``model`` wrapped with fresh LoRA adapters per ``cfg`` (only the adapters, and the modules to
    save, require grad).  ``base_path`` (the folder or Hub name the base was loaded from) is recorded
    in the adapter config, absolute, so that the saved adapter finds its base."""
    peft = require_peft()
    try:
        wrapped = peft.get_peft_model(model, lora_config(cfg, task))
    except ValueError as e:  # e.g. target modules not found in the model
        raise UserError(f"--lora-target-modules: {' '.join(str(e).split())[:300]}") from e
    _record_base(wrapped, base_path)
    return wrapped


def load_adapter(model, adapter_path: str, trainable: bool = True, base_path: str | None = None):
    """``model`` with the adapters saved in ``adapter_path`` (a checkpoint being resumed)."""
    peft = require_peft()
    wrapped = peft.PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
    _record_base(wrapped, base_path)
    return wrapped


def _record_base(wrapped, base_path: str | None) -> None:
    if base_path is None:
        return
    local = os.path.expanduser(base_path)
    value = os.path.abspath(local) if os.path.exists(local) else base_path
    for config in wrapped.peft_config.values():
        config.base_model_name_or_path = value


def adapters_disabled(model):
    """Context manager: ``model`` (a PeftModel, possibly inside DDP) runs as its base model."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return inner.disable_adapter()


class ReferenceView:
    """The base of a PeftModel, for code that takes a frozen reference *model*: calling it runs the
    PeftModel with its adapters disabled and without gradients.  It holds no weights of its own, so
    nothing is copied; ``get_base_model`` lets :func:`rlhf_kernels.integrations.hf.unwrap_causal_lm`
    find the Hugging Face model inside."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.peft_model), torch.no_grad():
            return self.peft_model(*args, **kwargs)

    def get_base_model(self):
        return self.peft_model.get_base_model()

    def parameters(self):
        return self.peft_model.parameters()

    @property
    def training(self) -> bool:
        return self.peft_model.training

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def requires_grad_(self, requires_grad: bool = True):
        return self


# --------------------------------------------------------------------------------------------
# Adapter folders as inputs of later stages


def is_adapter_folder(path: str) -> bool:
    local = os.path.expanduser(path)
    return os.path.isfile(os.path.join(local, "adapter_config.json")) and \
        not os.path.isfile(os.path.join(local, "config.json"))


_MATERIALIZED: dict[str, str] = {}


def _cleanup() -> None:
    for folder in _MATERIALIZED.values():
        shutil.rmtree(folder, ignore_errors=True)
    _MATERIALIZED.clear()


atexit.register(_cleanup)


def materialize(path: str) -> str:
    """``path`` itself, or for a peft adapter folder a temporary folder holding its base with the
    adapters merged (a plain ``from_pretrained`` folder; cached per process, removed at exit)."""
    if not is_adapter_folder(path):
        return path
    key = os.path.abspath(os.path.expanduser(path))
    if key in _MATERIALIZED and os.path.isdir(_MATERIALIZED[key]):
        return _MATERIALIZED[key]
    peft = require_peft(f"model {path!r} (a peft adapter folder)")
    with open(os.path.join(key, "adapter_config.json")) as fh:
        adapter = json.load(fh)
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise UserError(f"adapter folder {path!r} does not name its base model (base_model_name_or_path)")
    if base.startswith("/") and not os.path.exists(base):
        raise UserError(f"adapter folder {path!r}: its base model {base!r} does not exist")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base_folder = materialize(base)
    if adapter.get("task_type") == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base_folder, num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, key).merge_and_unload()
    folder = tempfile.mkdtemp(prefix="rlhf-merged-")
    merged.save_pretrained(folder)
    _copy_tokenizer(key, folder)
    _MATERIALIZED[key] = folder
    return folder


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model", "merges.txt", "special_tokens_map.json",
                    "chat_template.jinja", "added_tokens.json")


def _copy_tokenizer(src: str, dst: str) -> None:
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def merged_copy(model):
    """A plain Hugging Face model equal to the PeftModel ``model`` with its adapters merged; ``model``
    itself is left unmerged (the merge runs on a deep copy)."""
    import copy

    return copy.deepcopy(model).merge_and_unload()
