"""TRL adapter: TRL's trainers compute their per-token log-probs with our kernels.

::

    from rlhf_kernels.integrations import trl as rk_trl
    rk_trl.apply()       # before building the trainer; rk_trl.undo() puts TRL's functions back
    trainer = trl.GRPOTrainer(...)   # or DPOTrainer, RLOOTrainer, KTOTrainer, SFTTrainer, ...

What ``apply()`` changes (each undone by ``undo()``), in ``trl.trainer.utils`` and in every loaded
``trl.*`` module that imported the name (modules imported later read ours, and get TRL's back on undo):

- TRL's chunked LM-head function (``ChunkedLogProbFunction`` in ``trl.kernels`` and
  ``trl.kernels.chunked_logprob``, TRL 1.15+; ``_ChunkedLogProbFunction`` in ``trl.trainer.utils``,
  TRL 1.1+, and in the trainers that import it, TRL 1.14) -> an object whose ``apply`` runs
  :func:`rlhf_kernels.linear_token_logprobs` with TRL's arguments and returns what TRL's returned:
  ``(log_probs, entropy)`` before 1.15 (the entropy without gradient before 1.13, as TRL's); ``(log_probs, entropy, log_sum_sq_probs, mean_logits,
  is_top1)``, each computed only when asked for in ``outputs``, from 1.15 (what
  ``add_fused_lm_head`` calls, and so ``GRPOTrainer``, ``DPOTrainer``, ``RLOOTrainer``, ``KTOTrainer``
  and ``SFTTrainer``).  TRL's model patching, label shifting, masking, loss and MoE auxiliary loss are
  left as they are: only the projection + softmax statistics change hands.
- ``selective_log_softmax``, ``entropy_from_logits`` and (1.14+) ``selective_log_softmax_and_entropy``
  -> :func:`rlhf_kernels.token_logprobs` (what TRL 1.0-1.14's trainers call on materialised logits).

The adapter reproduces TRL's conventions (docs/integrations.md lists the few differences); calls it
cannot serve exactly (a top-K index, float64 logits) go to TRL's own function.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

import torch

import rlhf_kernels as rk

from ._patch import Patches, applied_context, import_peer, rebind_late_imports

MIN_VERSION = "1.0"
# Per-token outputs of TRL's fused LM head (TRL 1.15+ ``outputs``); "log_probs" is always computed.
FUSED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_LOGITS_FUNCTIONS = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
_CHUNKED_NAMES = ("_ChunkedLogProbFunction", "ChunkedLogProbFunction")
_CHUNKED_HOMES = ("trl.trainer.utils", "trl.kernels", "trl.kernels.chunked_logprob")
# Parameter names of the chunked function's forward across TRL 1.1-1.16 -> ours
_CHUNKED_PARAMS = {
    "last_hidden": "hidden",  # 1.1-1.14
    "hidden": "hidden",  # 1.15+
    "weight": "weight",
    "bias": "bias",  # 1.13+
    "targets": "targets",
    "temperature": "temperature",
    "chunk_size": "chunk_size",
    "final_logit_softcapping": "softcap",  # 1.7+
    "logit_scale": "logit_scale",
    "outputs": "outputs",  # 1.15+
}
_IGNORE = -100  # TRL's label padding; TRL never passes it to the functions patched here
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_patches = Patches()
_late = []  # (prefix, name, ours, original) to rebind on undo
_originals = {}  # TRL's functions, for the calls the adapter hands back to TRL
_state = {}  # backend, the options apply() ran with


def _backend() -> str:
    return _state.get("backend", "auto")


def _trl_version() -> str:
    try:
        return importlib.import_module("trl").__version__
    except Exception:  # noqa: BLE001 - only used in messages
        return "unknown"


def _original(name):
    fn = _originals.get(name)
    if fn is None:  # called directly while not applied: TRL's own is the one in trl.trainer.utils
        fn = getattr(importlib.import_module("trl.trainer.utils"), name)
    return fn


# ----------------------------------------------------------------------------- TRL's fused LM head


def _autocast_off(device_type):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def fused_lm_head_logprobs(hidden, weight, bias, targets, temperature=1.0, softcap=None, logit_scale=1.0,
                           outputs=FUSED_OUTPUTS):
    """TRL's chunked LM head (``ChunkedLogProbFunction.apply``, TRL 1.15+) on our kernel.

    ``hidden`` ``[N, H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None, ``targets`` ``[N]`` in
    ``[0, V)``.  With ``z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) /
    temperature`` (no tanh when ``softcap`` is None) returns the 5-tuple ``(log_probs, entropy,
    log_sum_sq_probs, mean_logits, is_top1)`` of ``[N]`` tensors: ``log softmax(z)[target]``, the
    entropy of ``softmax(z)``, ``log sum_v softmax(z)_v^2``, ``mean_v z_v`` and whether ``target`` is
    the first argmax of ``z``; the ones not named in ``outputs`` are None (``log_probs`` always
    comes).  ``log_probs`` and ``entropy`` are differentiable (to ``hidden``, ``weight``, ``bias``),
    the other three are not.  As TRL's, the projection runs in the autocast dtype when autocast is on
    (else ``hidden``'s dtype); gradients come back in the inputs' dtypes.
    """
    if isinstance(outputs, str) or not all(name in FUSED_OUTPUTS for name in outputs):
        raise ValueError(f"outputs must be a tuple of names among {FUSED_OUTPUTS}, got {outputs!r}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor of token ids, got {type(targets).__name__}")
    device_type = hidden.device.type
    compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    h = hidden.to(compute)
    w = weight.to(compute)
    b = None if bias is None else bias.to(compute)
    want = {name: name in outputs for name in FUSED_OUTPUTS}
    kwargs = {"bias": b, "ignore_index": _IGNORE, "logit_scale": float(logit_scale),
              "softcap": None if softcap is None else float(softcap), "backend": _backend()}
    with _autocast_off(device_type):
        res = rk.linear_token_logprobs(h, w, targets, temperature=temperature, return_entropy=want["entropy"],
                                       return_mean_logit=want["mean_logits"], return_is_top1=want["is_top1"],
                                       **kwargs)
        res = list(res) if isinstance(res, tuple) else [res]
        log_probs = res.pop(0)
        entropy = res.pop(0) if want["entropy"] else None
        mean_logits = res.pop(0) if want["mean_logits"] else None
        is_top1 = res.pop(0) if want["is_top1"] else None
        log_sum_sq_probs = None
        if want["log_sum_sq_probs"]:
            # log sum_v p_v^2 = lse(2z) - 2 lse(z) = 2 log p_T(t) - log p_{T/2}(t): 2z is z at half the
            # temperature, so a second forward (no backward) of the same kernel gives it exactly.
            with torch.no_grad():
                half = rk.linear_token_logprobs(h.detach(), w.detach(), targets, temperature=temperature / 2,
                                                **{**kwargs, "bias": None if b is None else b.detach()})
                log_sum_sq_probs = 2 * log_probs.detach() - half
    return log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1


def _chunked_replacement(original, version):
    """An object with ``apply`` taking the arguments of TRL's chunked function ``original`` (whose
    signature changed across 1.1-1.16) and returning what it returned, computed by our kernel."""
    forward = getattr(original, "forward", None)
    where = f"TRL {version}: {getattr(original, '__module__', '?')}.{getattr(original, '__qualname__', original)}"
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]  # drop ctx
    except (TypeError, ValueError) as exc:
        raise RuntimeError(f"{where} has no inspectable forward(ctx, ...); rlhf_kernels.integrations.trl "
                           f"supports the chunked LM head of TRL 1.1-1.16") from exc
    names = [p.name for p in params]
    unknown = [n for n in names if n not in _CHUNKED_PARAMS]
    missing = [n for n in ("weight", "targets", "temperature") if n not in names]
    if not any(n in names for n in ("hidden", "last_hidden")):
        missing.insert(0, "hidden")
    if unknown or missing:
        raise RuntimeError(
            f"{where}.forward takes {names}: "
            + (f"unknown argument(s) {unknown}" if unknown else f"missing argument(s) {missing}")
            + "; rlhf_kernels.integrations.trl knows the signatures of TRL 1.1-1.16 (pass fused_lm_head=False "
            "to keep TRL's chunked LM head and patch only the log-softmax functions)"
        )
    signature = inspect.Signature(params)
    five = "outputs" in names
    # TRL 1.1-1.12 (the forms without a bias) drop the entropy's gradient in their backward: the
    # entropy they return carries none, so ours comes back detached.  1.13 added both.
    entropy_grad = "bias" in names

    class ChunkedLogProbFunction:
        """TRL's chunked LM-head function, computed by :func:`rlhf_kernels.linear_token_logprobs`
        (installed by :func:`rlhf_kernels.integrations.trl.apply`)."""

        trl_original = original

        @staticmethod
        def apply(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = {_CHUNKED_PARAMS[k]: v for k, v in bound.arguments.items()}
            hidden = a["hidden"]
            if not (isinstance(hidden, torch.Tensor) and hidden.dtype in _SUPPORTED_DTYPES):
                return original.apply(*args, **kwargs)
            outputs = tuple(a["outputs"]) if five else ("log_probs", "entropy")
            res = fused_lm_head_logprobs(hidden, a["weight"], a.get("bias"), a["targets"], a["temperature"],
                                         softcap=a.get("softcap"), logit_scale=a["logit_scale"],
                                         outputs=("log_probs",) + tuple(o for o in outputs if o != "log_probs"))
            if five:
                return res
            return res[0], res[1] if entropy_grad else res[1].detach()

    ChunkedLogProbFunction.__module__ = __name__
    ChunkedLogProbFunction.__qualname__ = f"ChunkedLogProbFunction[{original.__qualname__}]"
    return ChunkedLogProbFunction


# ----------------------------------------------------------------------------- TRL's log-softmax helpers


def _served(logits, index, row_mask=None) -> bool:
    """Whether our kernel computes this call exactly as TRL's function does."""
    return (
        isinstance(logits, torch.Tensor)
        and isinstance(index, torch.Tensor)
        and logits.dtype in _SUPPORTED_DTYPES
        and logits.dim() >= 1
        and tuple(index.shape) == tuple(logits.shape[:-1])  # not a top-K index [..., K]
        and index.dtype in (torch.int64, torch.int32)
        and index.device == logits.device
        and (row_mask is None or (isinstance(row_mask, torch.Tensor) and row_mask.shape == index.shape))
    )


def _labels(index, row_mask):
    return index if row_mask is None else index.long().masked_fill(row_mask.to(index.device) == 0, _IGNORE)


def _check_temperature(temperature):
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _call_trl(name, logits, index, temperature, row_mask, **extra):
    """TRL's own function; TRL < 1.14 has no temperature / row_mask arguments, applied here as 1.14 does."""
    fn = _original(name)
    params = inspect.signature(fn).parameters
    if "temperature" not in params and temperature != 1.0:
        logits = logits / temperature
        temperature = 1.0
    kwargs = dict(extra)
    if "temperature" in params:
        kwargs["temperature"] = temperature
    if "row_mask" in params:
        kwargs["row_mask"] = row_mask
    out = fn(logits, index, **kwargs)
    if row_mask is not None and "row_mask" not in params:
        out = out.masked_fill(row_mask == 0, 0.0)
    return out


def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """TRL's ``selective_log_softmax(logits [..., V], index [...])`` on :func:`rlhf_kernels.token_logprobs`:
    ``log_softmax(logits / temperature)[index]`` float32, 0 where ``row_mask == 0``; differentiable.
    A top-K ``index [..., K]`` and float64 logits go to TRL's own function."""
    _check_temperature(temperature)
    if not _served(logits, index, row_mask):
        return _call_trl("selective_log_softmax", logits, index, temperature, row_mask)
    return rk.token_logprobs(logits, _labels(index, row_mask), temperature=temperature, ignore_index=_IGNORE,
                             backend=_backend())


def entropy_from_logits(logits, chunk_size=128):
    """TRL's ``entropy_from_logits(logits [..., V])`` on our kernel: float32 ``[...]``, differentiable
    (``chunk_size`` is not needed: the kernel never materialises the softmax)."""
    if not (isinstance(logits, torch.Tensor) and logits.dtype in _SUPPORTED_DTYPES and logits.dim() >= 1):
        return _original("entropy_from_logits")(logits, chunk_size)
    zeros = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return rk.token_logprobs(logits, zeros, return_entropy=True, backend=_backend())[1]


def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None):
    """TRL's ``selective_log_softmax_and_entropy`` (1.14+) in one pass of our kernel: ``(logprobs,
    entropy)`` float32, both 0 where ``row_mask == 0``; the entropy detached unless
    ``entropy_requires_grad``."""
    _check_temperature(temperature)
    if not _served(logits, index, row_mask):
        return _original("selective_log_softmax_and_entropy")(
            logits, index, entropy_requires_grad=entropy_requires_grad, temperature=temperature, row_mask=row_mask)
    logprobs, entropy = rk.token_logprobs(logits, _labels(index, row_mask), temperature=temperature,
                                          ignore_index=_IGNORE, return_entropy=True, backend=_backend())
    return logprobs, entropy if entropy_requires_grad else entropy.detach()


_OURS = {
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
}


# ----------------------------------------------------------------------------- apply / undo


def _check_version(version):
    from packaging.version import InvalidVersion, Version

    try:
        too_old = Version(version) < Version(MIN_VERSION)
    except InvalidVersion:
        return
    if too_old:
        raise RuntimeError(f"rlhf_kernels.integrations.trl supports TRL >= {MIN_VERSION}; TRL {version} is installed "
                           f"(pip install 'rlhf-kernels[trl]')")


def _rebind(name, original, ours):
    _patches.rebind_imported("trl", name, original, ours)
    _late.append(("trl", name, ours, original))


def apply(backend: str = "auto", *, fused_lm_head: bool = True, logits_functions: bool = True) -> None:
    """Route TRL to our kernels (idempotent; call it before building the trainer).

    ``backend``: the backend every patched call uses (``"auto"`` picks the fastest for the device).
    ``fused_lm_head``: replace TRL's chunked LM-head function (TRL 1.1+).  ``logits_functions``:
    replace ``selective_log_softmax``, ``entropy_from_logits`` and ``selective_log_softmax_and_entropy``.
    Raises ``RuntimeError`` naming the TRL version when it is older than 1.0 or when a name to patch
    has a form this adapter does not know.
    """
    if not isinstance(backend, str) or backend not in ("auto", *rk.BACKEND_NAMES):
        raise ValueError(f"backend must be 'auto' or one of {rk.BACKEND_NAMES}, got {backend!r}")
    options = {"backend": backend, "fused_lm_head": bool(fused_lm_head), "logits_functions": bool(logits_functions)}
    if _state:
        if _state != options:
            raise ValueError(f"rlhf_kernels.integrations.trl is already applied with {_state}; undo() it before "
                             f"applying with {options}")
        return
    import_peer("trl", "trl")
    version = _trl_version()
    _check_version(version)
    utils = import_peer("trl.trainer.utils", "trl")
    try:
        _state.update(options)
        if logits_functions:
            found = [n for n in _LOGITS_FUNCTIONS if callable(vars(utils).get(n))]
            if not found:
                raise RuntimeError(f"TRL {version}: trl.trainer.utils has none of {_LOGITS_FUNCTIONS} "
                                   f"(pass logits_functions=False)")
            for name in found:
                _originals[name] = vars(utils)[name]
                _rebind(name, _originals[name], _OURS[name])
        if fused_lm_head:
            homes = {}
            for home in _CHUNKED_HOMES:
                with contextlib.suppress(ImportError):
                    homes[home] = importlib.import_module(home)
            candidates = [vars(m).get(n) for m in homes.values() for n in _CHUNKED_NAMES]
            original = next((c for c in candidates if c is not None), None)
            if original is not None:
                ours = _chunked_replacement(original, version)
                for name in _CHUNKED_NAMES:
                    _rebind(name, original, ours)
            elif not logits_functions:
                raise RuntimeError(f"TRL {version} has no chunked LM head (trl.trainer.utils._ChunkedLogProbFunction "
                                   f"appeared in TRL 1.1): nothing to patch with fused_lm_head alone")
    except BaseException:
        undo()
        raise


def undo() -> None:
    """Put back everything :func:`apply` changed (no-op when nothing is applied)."""
    _patches.undo()
    _originals.clear()
    _state.clear()
    while _late:
        rebind_late_imports(*_late.pop())


def is_applied() -> bool:
    return bool(_state)


applied = applied_context(apply, undo, is_applied)
