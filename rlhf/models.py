"""Loading models and tokenizers, and the log-prob / score computations every trainer shares.

- policy: ``AutoModelForCausalLM``; reference: the same, frozen in eval mode.
- reward / value model: ``AutoModelForSequenceClassification`` with ``num_labels=1`` (a scalar head on
  the last hidden state), initialised from the SFT model (the head is new).
- dtype: the loaders take the dtype the weights are *stored* in, fp32 unless asked otherwise; the
  compute dtype (bf16 autocast on GPU) is :mod:`rlhf.precision`'s business.
- a task name (``builtin``, see :mod:`rlhf.tasks`): the task's own model (random init) and tokenizer.
- a peft adapter folder written by an earlier LoRA stage: its base with the adapters merged
  (:func:`rlhf.lora.materialize`); :func:`trainable_policy` / :func:`trainable_reward_model` add
  fresh LoRA adapters with ``--use-peft``.
"""

from __future__ import annotations

import os

import torch

import rlhf_kernels as rk
from rlhf_kernels.integrations.hf import causal_lm_logprobs

from .config import UserError
from .data import IGNORE_INDEX, position_ids_from_mask
from .tasks import get_task


class ModelPathError(UserError, FileNotFoundError):
    """A model or tokenizer path that does not exist or cannot be loaded."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {device!r} is not a device (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine (this torch "
                            f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}); "
                            f"use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"--device {device}: MPS is not available on this machine")
    return dev


def resolve_dtype(dtype, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype the loaders store weights in for ``dtype`` (a torch dtype, or a name;
    ``auto``: fp32, the master weights of mixed precision, see :mod:`rlhf.precision`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    from .precision import DTYPE_NAMES

    if dtype == "auto":
        return torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got {dtype!r}")
    return DTYPE_NAMES[dtype]


def check_model_path(path: str, what: str = "model") -> None:
    """A clear error for a local path that does not exist (instead of a Hub lookup failure)."""
    if get_task(path) is not None:
        return
    # "org/name" may be a Hub id; "outputs/sft" where ./outputs exists is meant as a local folder.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.isdir(path.split("/")[0])
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise ModelPathError(f"{what} path {path!r} does not exist")


def _from_pretrained(loader, path: str, what: str, **kw):
    check_model_path(path, what)
    from .lora import materialize

    try:
        return loader.from_pretrained(os.path.expanduser(materialize(path)), **kw)
    except Exception as e:
        first = " ".join(str(e).split())[:300]
        if os.path.exists(os.path.expanduser(path)):
            if isinstance(e, (OSError, ValueError, KeyError)):  # not a model folder, unknown architecture, ...
                raise ModelPathError(f"{what} {path!r} could not be loaded: {first}") from e
            raise
        # "org/name" that is neither a local folder nor reachable on the Hub
        raise ModelPathError(f"{what} path {path!r} does not exist locally and could not be loaded "
                             f"from the Hugging Face Hub ({type(e).__name__}: {first})") from e


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt", "tokenizer.py")


def load_tokenizer(path: str, what: str = "tokenizer"):
    """Tokenizer for ``path`` (or the built-in one), with a pad token guaranteed.

    ``what`` names ``path`` in errors (``model`` when the tokenizer is read from the model folder).
    A tokenizer without a pad token gets its EOS (or UNK) as pad: padding is always masked by the
    attention mask and labels, so the id only has to be valid.
    """
    task = get_task(path)
    if task is not None:
        tok = task.build_tokenizer()
    else:
        from transformers import AutoTokenizer

        local = os.path.expanduser(path)
        if os.path.isdir(local) and not any(os.path.exists(os.path.join(local, f)) for f in TOKENIZER_FILES):
            hint = "; pass --tokenizer" if what != "tokenizer" else ""
            raise ModelPathError(f"{what} folder {path!r} has no tokenizer files (tokenizer.json, "
                                 f"tokenizer_config.json, ...){hint}")
        tok = _from_pretrained(AutoTokenizer, path, what)
    if tok.pad_token_id is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise ValueError(f"tokenizer {path!r} has no pad, eos or unk token to pad with")
    return tok


def _finish(model, device: torch.device, gradient_checkpointing: bool, trainable: bool):
    model.to(device)
    if gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if trainable:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def load_policy(path: str, tokenizer=None, device: torch.device | str = "cpu", dtype: str = "auto",
                gradient_checkpointing: bool = False, trainable: bool = True, seed: int = 0):
    """``AutoModelForCausalLM`` from ``path`` (a task name: the task's fresh model seeded by ``seed``)."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = resolve_dtype(dtype, device)
    task = get_task(path)
    if task is not None:
        tokenizer = tokenizer if tokenizer is not None else task.build_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = task.build_model(len(tokenizer)).to(torch_dtype)
    else:
        model = _from_pretrained(AutoModelForCausalLM, path, "model", dtype=torch_dtype)
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return _finish(model, device, gradient_checkpointing, trainable)


def load_reference(path: str, tokenizer=None, device="cpu", dtype: str = "auto", seed: int = 0):
    """A frozen copy of the policy at ``path`` (eval mode, no gradients)."""
    return load_policy(path, tokenizer, device, dtype, trainable=False, seed=seed)


def load_reward_model(path: str, tokenizer=None, device="cpu", dtype: str = "auto",
                      gradient_checkpointing: bool = False, trainable: bool = True):
    """``AutoModelForSequenceClassification`` with one label from ``path`` (an SFT model: the body is
    loaded, the scalar ``score`` head is newly initialised; a reward model: everything is loaded)."""
    from transformers import AutoModelForSequenceClassification

    if get_task(path) is not None:
        raise ValueError("the reward model is initialised from an SFT model: pass --model <sft output dir>")
    device = resolve_device(device) if isinstance(device, str) else device
    model = _from_pretrained(AutoModelForSequenceClassification, path, "model", num_labels=1,
                             dtype=resolve_dtype(dtype, device))
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return _finish(model, device, gradient_checkpointing, trainable)


def _with_lora(model, cfg, task: str, base_path: str, adapter_path: str | None, gradient_checkpointing: bool):
    from .lora import apply_lora, load_adapter

    if get_task(base_path) is not None:
        raise UserError(f"--use-peft needs a pretrained model (a folder or Hub name): the built-in task's "
                        f"{base_path!r} model is randomly initialised, so there is no base to adapt; run "
                        f"`rlhf sft` without --use-peft first, or pass --model <pretrained folder>")
    if adapter_path is not None:
        model = load_adapter(model, adapter_path, trainable=True, base_path=base_path)
    else:
        model = apply_lora(model, cfg, task, base_path=base_path)
    if gradient_checkpointing:  # the frozen embeddings' output must require grad for checkpointed blocks
        model.enable_input_require_grads()
    model.train()
    return model


def trainable_policy(cfg, run, tokenizer, device, weights_dtype="auto", seed: int = 0):
    """The policy a trainer trains: from ``cfg.model``, or the checkpoint being resumed
    (``run.checkpoint``); with ``cfg.use_peft`` the base ``cfg.model`` with LoRA adapters (fresh, or
    the checkpoint's), only the adapters trainable."""
    checkpoint = getattr(run, "checkpoint", None)
    if not getattr(cfg, "use_peft", False):
        return load_policy(checkpoint or cfg.model, tokenizer, device, weights_dtype, cfg.gradient_checkpointing,
                           seed=seed)
    base = load_policy(cfg.model, tokenizer, device, weights_dtype, cfg.gradient_checkpointing, seed=seed)
    return _with_lora(base, cfg, "causal", cfg.model, checkpoint, cfg.gradient_checkpointing)


def trainable_reward_model(cfg, path: str, tokenizer, device, weights_dtype="auto", adapter_path: str | None = None,
                           resume_path: str | None = None):
    """A scalar-head model to train (the reward model, PPO's value model) from ``path``; with
    ``cfg.use_peft`` LoRA adapters on it and the ``score`` head trained fully (``adapter_path``:
    a saved adapter folder to continue).  Without LoRA, ``resume_path`` (a full saved model) is loaded
    instead of ``path`` when given."""
    if not getattr(cfg, "use_peft", False):
        return load_reward_model(resume_path or path, tokenizer, device, weights_dtype, cfg.gradient_checkpointing)
    base = load_reward_model(path, tokenizer, device, weights_dtype, cfg.gradient_checkpointing)
    return _with_lora(base, cfg, "reward", path, adapter_path, cfg.gradient_checkpointing)


def reference_of(policy):
    """The frozen reference of a LoRA policy: the policy with its adapters disabled
    (:class:`rlhf.lora.ReferenceView`), no second copy of the weights."""
    from .lora import ReferenceView

    return ReferenceView(policy)


def unwrap(model):
    """The Hugging Face model inside DDP and/or :class:`ScalarHead` wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, ScalarHead):
            model = model.model
        else:
            return model


# --------------------------------------------------------------------------------------------
# Computations on batches from rlhf.data.collate


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels[:, 1:]`` with ``ignore_index`` appended: position t of the logits predicts token t+1.

    Passing the model's whole logits with these labels to ``rlhf_kernels.token_logprobs`` gives the
    log-probs of ``logits[:, :-1]`` against ``labels[:, 1:]`` (and 0 at the last position) without
    slicing the logits: a slice's backward allocates a zero-filled ``[B, T, V]`` gradient and copies
    into it, whereas the kernel writes the full-size gradient once (zero at ignored positions).
    """
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


def logits_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                    backend: str = "auto", return_entropy: bool = False):
    """Log-probs (and entropies) ``[B, T]`` of the next-token ``labels`` under the whole ``logits``
    ``[B, T, V]`` of a causal LM, labels not yet shifted (``labels[:, t]`` is token t; -100 where
    not scored).  Column t is the log-prob of token t+1; the last column is 0.  For callers that hold
    logits already; the trainers use the fused :func:`token_logprobs` / :func:`fused_response_logprobs`."""
    return rk.token_logprobs(logits, shift_labels(labels), temperature=temperature, ignore_index=IGNORE_INDEX,
                             return_entropy=return_entropy, backend=backend)


def token_logprobs(model, batch: dict, temperature: float = 1.0, backend: str = "auto",
                   return_entropy: bool = False):
    """Per-token log-probs of ``batch["labels"]`` under ``model``: ``[B, T-1]`` fp32, 0 where the
    label is -100 (the shift is done here: position t predicts token t+1).

    Fused: the model's LM head is never called; its last hidden state goes with the head's weight to
    ``rlhf_kernels.linear_token_logprobs`` (:func:`rlhf_kernels.integrations.hf.causal_lm_logprobs`),
    so the ``[B, T, V]`` logits never exist.  ``model`` may be wrapped by DDP (the call goes through
    the wrapper, so gradients are synchronised)."""
    out = causal_lm_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                             position_ids=batch["position_ids"], temperature=temperature,
                             ignore_index=IGNORE_INDEX, return_entropy=return_entropy, backend=backend)
    return tuple(o[:, :-1] for o in out) if return_entropy else out[:, :-1]


def sequence_logprobs(model, batch: dict, backend: str = "auto") -> torch.Tensor:
    """``[B]`` fp32: log-probs summed over each row's completion (label != -100) tokens (fused, as
    :func:`token_logprobs`)."""
    return token_logprobs(model, batch, backend=backend).sum(-1)


def pad_response_labels(labels: torch.Tensor, length: int) -> torch.Tensor:
    """Response labels ``[B, R]`` padded on the left with -100 to the sequence ``length`` (unshifted)."""
    return torch.nn.functional.pad(labels, (length - labels.shape[1], 0), value=IGNORE_INDEX)


def fused_response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            position_ids: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                            backend: str = "auto", return_entropy: bool = False, return_hidden: bool = False):
    """Log-probs (and entropies) ``[B, R]`` of a response ``labels`` ``[B, R]`` that ends ``input_ids``,
    from the causal LM ``model``'s hidden states (the LM head is never called).  With ``return_hidden``
    the :class:`rlhf_kernels.integrations.hf.FusedLogprobs` is returned, its fields cut to the
    response (``last_hidden_state`` stays whole)."""
    R = labels.shape[1]
    out = causal_lm_logprobs(model, input_ids, attention_mask, pad_response_labels(labels, input_ids.shape[1]),
                             position_ids=position_ids, temperature=temperature, ignore_index=IGNORE_INDEX,
                             return_entropy=return_entropy, backend=backend, return_hidden=True)
    window = slice(-R - 1, -1)
    out.logprobs = out.logprobs[:, window]
    if out.entropy is not None:
        out.entropy = out.entropy[:, window]
    if return_hidden:
        return out
    return (out.logprobs, out.entropy) if return_entropy else out.logprobs


@torch.no_grad()
def policy_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    temperature: float = 1.0, backend: str = "auto", return_entropy: bool = False):
    """Log-probs ``[B, R]`` of a response ``labels`` (``[B, R]``, -100 where masked) that ends
    ``input_ids`` (prompt + response, left-padded prompts), under a causal LM, without gradients
    (fused: the LM head is never called, see :func:`token_logprobs`)."""
    return fused_response_logprobs(model, input_ids, attention_mask, position_ids_from_mask(attention_mask), labels,
                                   temperature, backend, return_entropy)


def response_logprobs(logits: torch.Tensor, response_labels: torch.Tensor, temperature: float = 1.0,
                      backend: str = "auto", return_entropy: bool = False):
    """Log-probs (and entropies) ``[B, R]`` of the last ``R`` tokens of a sequence from the whole logits
    ``[B, T, V]``: the labels are padded on the left with -100 to ``[B, T]`` and shifted, so the
    logits are never sliced (see :func:`shift_labels`).  For callers that hold logits already; the
    trainers use :func:`fused_response_logprobs`, which never makes them."""
    R = response_labels.shape[1]
    labels = torch.nn.functional.pad(response_labels, (logits.shape[1] - R, 0), value=IGNORE_INDEX)
    out = logits_logprobs(logits, labels, temperature, backend, return_entropy)
    return tuple(o[:, -R - 1:-1] for o in out) if return_entropy else out[:, -R - 1:-1]


class ScalarHead(torch.nn.Module):
    """Wraps a one-label ``AutoModelForSequenceClassification`` so ``forward`` returns its scalar head
    at every position, ``[B, T]`` fp32 (the reward at the last real token; a PPO value per token).
    Being an ``nn.Module`` with that ``forward``, it can be wrapped in DDP like a policy."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        # A PeftModel's LoRA layers sit inside the Hugging Face model it wraps; its score head is the
        # trainable copy peft keeps for ``modules_to_save``.
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        body = getattr(inner, inner.base_model_prefix)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
        return inner.score(hidden).squeeze(-1).float()


def token_scores(model, batch: dict) -> torch.Tensor:
    """``[B, T]`` scores from a :class:`ScalarHead` (or a DDP-wrapped one)."""
    return model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the last position with mask 1 (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def sequence_rewards(model, batch: dict) -> torch.Tensor:
    """``[B]`` fp32 scores of a :class:`ScalarHead` at each row's last real token."""
    scores = token_scores(model, batch)
    return scores.gather(-1, last_token_index(batch["attention_mask"])[:, None]).squeeze(-1)
