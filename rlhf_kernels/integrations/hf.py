"""Per-token log-probs of a Hugging Face causal LM without calling its LM head.

    enable_fused_logprobs(model)          # idempotent; disable_fused_logprobs(model) undoes it
    logprobs = causal_lm_logprobs(model, input_ids, attention_mask, labels)       # [B, T] fp32

The backbone runs as usual; its last hidden state goes with the head's weight (and bias) to
:func:`rlhf_kernels.linear_token_logprobs`, so the ``[B, T, V]`` logits never exist and positions
without a label are never projected.

Wrappers.  Under ``DistributedDataParallel`` the gradients are all-reduced only if the computation
runs inside the wrapper's ``forward``.  So :func:`enable_fused_logprobs` replaces the ``forward`` of
the Hugging Face model inside the wrappers (DDP, PEFT) by one that takes an extra keyword,
``rlhf_fused_logprobs``: without it the original ``forward`` runs (generation and every other caller
are unchanged; the replacement keeps the original signature, which ``generate`` checks its keyword
arguments against); with it, the fused path runs and its result is returned.
:func:`causal_lm_logprobs` calls the outermost wrapper with that keyword, so DDP's hooks and PEFT's
adapters see an ordinary forward.  The backbone and the head are looked up at each call (PEFT or
FSDP may replace them after the patch).

Conventions (Hugging Face's): ``labels`` are aligned with ``input_ids`` (``labels[:, t]`` is token t,
``ignore_index`` where not scored); column t of the result is the log-prob of ``labels[:, t + 1]``
predicted at position t; the last column and ignored positions are 0.  The logits the fused path
stands for are the model's own: ``logit_scale`` and ``final_logit_softcapping`` are read from the
model config (see :func:`head_transform`), then divided by ``temperature``.

Precision: under ``torch.autocast`` the head's matmul runs in the autocast dtype, as the unfused head
would (the hidden state and an fp32 master weight are cast to it; gradients flow back to the weight in
its own dtype); the kernel accumulates in fp32 and runs with autocast off.  A PEFT LoRA adapter on the
head itself is supported: the effective weight ``W + scaling * B @ A`` of the active adapters goes to
the kernel (refused with a non-zero ``lora_dropout`` while training, which cannot be folded in).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types

import torch

__all__ = ["FusedLogprobs", "causal_lm_logprobs", "disable_fused_logprobs", "enable_fused_logprobs",
           "head_transform", "is_fused_logprobs_enabled", "unwrap_causal_lm"]

KEYWORD = "rlhf_fused_logprobs"
_ORIGINAL = "_rlhf_kernels_original_forward"


@dataclasses.dataclass
class FusedLogprobs:
    """What the patched ``forward`` returns on the fused path (all ``[B, T]``; entropy and the hidden
    state only when asked for)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class _Request:
    labels: torch.Tensor  # already shifted: labels[:, t] is predicted at position t
    temperature: float
    ignore_index: int
    return_entropy: bool
    return_hidden: bool
    backend: str


def unwrap_causal_lm(model):
    """The Hugging Face causal LM inside DDP / FSDP-style ``.module`` wrappers and PEFT models."""
    seen = 0
    while seen < 16:
        seen += 1
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PeftModel
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        else:
            break
    if not (hasattr(model, "get_output_embeddings") and hasattr(model, "config")):
        raise TypeError(f"model must be a Hugging Face causal LM (with get_output_embeddings() and a config), "
                        f"possibly wrapped by DDP or PEFT; got {type(model).__name__}")
    return model


def head_transform(config) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a model config: what the model's forward does to ``hidden @ W.T``.

    Scale: ``logit_scale`` (Cohere), else ``output_multiplier``, else ``lm_head_multiplier``
    (Falcon-H1), else ``1 / logits_scaling`` (Granite, MiniCPM3); 1.0 when none is set.
    Soft-cap: ``final_logit_softcapping`` (Gemma 2/3), None when unset or 0.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(cfg, name, None) is not None:
            scale = float(getattr(cfg, name))
            break
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = 1.0 / float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return (1.0 if scale is None else scale), (float(softcap) if softcap else None)


def _backbone(model):
    if hasattr(model, "get_decoder"):
        try:
            body = model.get_decoder()
        except (AttributeError, NotImplementedError):
            body = None
        if body is not None and body is not model:
            return body
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if body is None or body is model:
        raise TypeError(f"cannot find the backbone of {type(model).__name__} (no get_decoder() and no "
                        f"attribute named by base_model_prefix={prefix!r})")
    return body


def _lora_head_weight(head, weight: torch.Tensor) -> torch.Tensor:
    """The effective weight of a PEFT LoRA-wrapped linear head: ``W + scaling * B @ A`` summed over its
    active, unmerged adapters (``W`` alone when the adapters are disabled or merged), differentiable
    in the adapters.  Dropout on the adapter input cannot be folded into a weight: a head with
    ``lora_dropout > 0`` in training mode is refused."""
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return weight
    active = getattr(head, "active_adapters", None) or []
    if isinstance(active, str):
        active = [active]
    for name in active:
        if name not in getattr(head, "lora_A", {}):
            continue
        dropout = head.lora_dropout[name]
        if head.training and not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 0) > 0:
            raise TypeError("the fused log-prob path cannot apply LoRA dropout on the LM head; train the head's "
                            "adapter with lora_dropout 0 or leave lm_head out of the target modules")
        if getattr(head, "use_dora", {}).get(name, False):
            raise TypeError("the fused log-prob path does not support DoRA on the LM head")
        a, b = head.lora_A[name].weight, head.lora_B[name].weight  # [r, H], [V, r]
        delta = (b @ a.to(b.dtype)) * head.scaling[name]
        if getattr(head, "fan_in_fan_out", False):
            delta = delta.T
        weight = weight + delta.to(weight.dtype)
    return weight


def _head(model):
    head = model.get_output_embeddings()
    lora = head is not None and hasattr(head, "base_layer") and hasattr(head, "lora_A")
    base = head.base_layer if lora else head
    weight = getattr(base, "weight", None)
    if head is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or \
            (hasattr(head, "base_layer") and not lora):
        raise TypeError(f"the fused log-prob path needs a plain linear LM head (a [V, H] weight and an optional "
                        f"bias), or one with PEFT LoRA adapters; {type(model).__name__}.get_output_embeddings() "
                        f"is {type(head).__name__}")
    bias = getattr(base, "bias", None)
    if lora:
        weight = _lora_head_weight(head, weight)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _fused_forward(model, request: _Request, args, kwargs) -> FusedLogprobs:
    import rlhf_kernels as rk

    kwargs = dict(kwargs)
    for unused in ("labels", "use_cache", "output_hidden_states", "return_dict", "logits_to_keep"):
        kwargs.pop(unused, None)
    out = _backbone(model)(*args, use_cache=False, return_dict=True, **kwargs)
    hidden = out.last_hidden_state
    weight, bias = _head(model)
    device_type = weight.device.type
    # The dtype the head's matmul would run in: the autocast dtype under autocast (fp32 master weights
    # with bf16/fp16 compute), else the weight's.  The kernel accumulates in fp32 either way and is run
    # with autocast off, so its own fp32 math is not cast down.
    autocast = torch.is_autocast_enabled(device_type)
    compute = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    h = hidden.to(device=weight.device, dtype=compute)
    w = weight.to(compute)
    b = None if bias is None else bias.to(compute)
    labels = request.labels.to(weight.device)
    if labels.shape != h.shape[:-1]:
        raise ValueError(f"labels must have the shape of input_ids {tuple(h.shape[:-1])}; got {tuple(labels.shape)}")
    scale, softcap = head_transform(model.config)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        res = rk.linear_token_logprobs(h, w, labels, bias=b, temperature=request.temperature,
                                       ignore_index=request.ignore_index, return_entropy=request.return_entropy,
                                       logit_scale=scale, softcap=softcap, backend=request.backend)
    logprobs, entropy = res if request.return_entropy else (res, None)
    return FusedLogprobs(logprobs, entropy, hidden if request.return_hidden else None)


def is_fused_logprobs_enabled(model) -> bool:
    return _ORIGINAL in vars(unwrap_causal_lm(model))


def enable_fused_logprobs(model):
    """Patch the causal LM inside ``model`` (DDP / PEFT wrappers allowed) so its ``forward`` accepts
    ``rlhf_fused_logprobs=...`` (used by :func:`causal_lm_logprobs`).  Idempotent; returns ``model``.
    Every other call of ``forward`` (training with logits, ``generate``) is unchanged."""
    lm = unwrap_causal_lm(model)
    if _ORIGINAL in vars(lm):
        return model
    original = lm.forward  # bound method (or an instance attribute set by someone else)

    @functools.wraps(type(lm).forward)
    def forward(self, *args, **kwargs):
        request = kwargs.pop(KEYWORD, None)
        if request is None:
            return original(*args, **kwargs)
        return _fused_forward(self, request, args, kwargs)

    setattr(lm, _ORIGINAL, original)
    lm.forward = types.MethodType(forward, lm)
    return model


def disable_fused_logprobs(model):
    """Undo :func:`enable_fused_logprobs` (no-op when not enabled); returns ``model``."""
    lm = unwrap_causal_lm(model)
    original = vars(lm).pop(_ORIGINAL, None)
    if original is not None:
        if getattr(original, "__self__", None) is lm and getattr(original, "__func__", None) is type(lm).forward:
            del lm.forward  # back to the class's method
        else:
            lm.forward = original
    return model


def causal_lm_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
                       temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                       backend: str = "auto", return_hidden: bool = False, **model_kwargs):
    """Per-token log-probs ``[B, T]`` fp32 of ``labels`` under the causal LM ``model`` (possibly wrapped by
    DDP or PEFT), computed from its hidden states without calling the LM head.

    ``labels`` ``[B, T]`` are aligned with ``input_ids`` as Hugging Face's (unshifted; ``ignore_index``
    where not scored; default: ``input_ids`` with padding, ``attention_mask == 0``, ignored).  Column t
    is ``log p(labels[:, t+1] | tokens <= t)``; the last column and ignored positions are 0.  Equal,
    values and gradients, to ``token_logprobs(model(...).logits, shifted labels, temperature=...)``.
    With ``return_entropy`` a tuple ``(logprobs, entropy)``; with ``return_hidden`` the
    :class:`FusedLogprobs` itself (its ``last_hidden_state`` set).  Enables the patch if needed
    (:func:`enable_fused_logprobs`); the call goes through ``model`` itself, so DDP syncs gradients.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor; got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    if not isinstance(temperature, (int, float)) or not (temperature > 0 and math.isfinite(1.0 / temperature)):
        raise ValueError(f"temperature must be > 0 with a finite reciprocal; got {temperature!r}")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(labels.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; "
                         f"got {tuple(attention_mask.shape)}")
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
    enable_fused_logprobs(model)
    request = _Request(shifted, float(temperature), int(ignore_index), bool(return_entropy), bool(return_hidden),
                       backend)
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        model_kwargs["position_ids"] = position_ids
    out = model(input_ids=input_ids, **model_kwargs, **{KEYWORD: request})
    if return_hidden:
        return out
    return (out.logprobs, out.entropy) if return_entropy else out.logprobs
