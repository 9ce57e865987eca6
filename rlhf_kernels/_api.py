"""Public functional API of rlhf_kernels.

Every function validates its arguments (errors name the argument), picks a backend (see
:mod:`rlhf_kernels._dispatch`) and calls it.  ``@public_op`` declares each op in the registry
(:mod:`rlhf_kernels._registry`): the op set is the functions declared here.  The reference backend in
:mod:`rlhf_kernels.reference` defines the semantics; every other backend is tested equal to it.
"""

from __future__ import annotations

import math

import torch

from . import _validation as checks
from ._dispatch import check_composite, resolve
from ._registry import AGG_MODES, KL_ESTIMATORS, LOSS_TYPES, ops, public_op
from .reference import masked as _masked

_INT_LABEL_DTYPES = (torch.int64, torch.int32)

# On CPU tensors "auto" prefers the reference for kl_penalty and dpo_loss: measured
# (benchmarks/results/REPORT.md, CPU run 20261125T172106Z), the per-call cost of the compiled op makes
# these small elementwise ops slower than eager (0.2-0.5x eager, against 0.55-1.0x for the
# reference), while the C++ kernels win on token_logprobs (2-4x eager, forward+backward), gae (26-46x
# the Python loop) and the PPO losses (1.0-1.8x).
_REFERENCE_FIRST = ("reference", "cpu")


@public_op(family="logprobs")
def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """Log-probability of each label token (and the entropy) from logits, in one fused pass.

    With z = logits / temperature, computed in fp32 whatever the input dtype::

        logprob = z[label] - logsumexp(z)
        entropy = -sum_v softmax(z)_v * log softmax(z)_v

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16 (float64 on the reference backend).
            Never written to.
        labels: ``[...]`` int64 (or int32), already aligned with ``logits`` (the caller shifts),
            each in ``[0, V)`` or equal to ``ignore_index``.  Checked (``ValueError``) for CPU
            tensors, and for GPU tensors with ``RLHF_KERNELS_DEBUG=1`` (the check needs a host
            sync).  Without it, an out-of-range label on a GPU gives NaN for that position's
            log-prob (never an out-of-bounds read; the entropy is unaffected) and backward
            gives that row ``-softmax(z) * g / temperature``, with no one-hot term.
        temperature: the sampling temperature the tokens were drawn with, in
            ``[1.18e-38, 3.4e38]`` (a normal float32 whose reciprocal is finite in float32; smaller
            values such as 1e-40 would turn every ``logits / temperature`` into inf and the result
            into NaN, so they raise ``ValueError``).
        ignore_index: label value that marks positions to ignore (prompt, padding).
        return_entropy: also return the entropy of softmax(z) per position.

    Returns:
        ``logprobs`` ``[...]`` float32, 0 where ``labels == ignore_index``; with
        ``return_entropy``, the tuple ``(logprobs, entropy)``, entropy ``[...]`` float32, 0 at
        ignored positions.  Gradients flow to ``logits``: ``(onehot - softmax(z)) / temperature``
        for the log-prob, ``-p * (log p + H) / temperature`` for the entropy.

    Replaces ``torch.log_softmax(logits.float() / T, -1).gather(-1, labels[..., None])`` (the way
    TRL, OpenRLHF and verl compute it) without materialising the fp32 ``[N, V]`` log-softmax.
    """
    checks.check_float("logits", logits)
    checks.check_tensor("labels", labels)
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary), got a 0-d tensor")
    if labels.dtype not in _INT_LABEL_DTYPES:
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {labels.dtype}")
    checks.check_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    checks.check_same_device({"logits": logits, "labels": labels})
    temperature = checks.check_temperature(temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    vocab = logits.shape[-1]
    if vocab == 0 and labels.numel() > 0:
        raise ValueError("logits must have a non-empty last dimension (the vocabulary size V)")
    labels = labels.long()
    checks.check_labels(labels, vocab, ignore_index)
    _, fn = resolve("token_logprobs", backend, logits.device, (logits.dtype,))
    logprobs, entropy = fn(logits, labels, temperature, ignore_index, return_entropy)
    return (logprobs, entropy) if return_entropy else logprobs


@public_op(family="linear_logprobs")
def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_mean_logit: bool = False,
    return_is_top1: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
):
    """Log-probability of each label token straight from hidden states: the LM head fused with
    :func:`token_logprobs`, so the ``[N, V]`` logits never exist (one tile of them at a time).

    The exact formula, applied in this order in fp32 whatever the input dtype (the products
    ``hidden @ weight.T`` accumulate in fp32, within and across vocabulary tiles)::

        y = hidden @ weight.T + bias                          # bias optional
        z = logit_scale * y
        z = softcap * tanh(z / softcap)                       # only when softcap is not None
        z = z / temperature
        logprob    = z[label] - logsumexp(z)
        entropy    = -sum_v softmax(z)_v * log softmax(z)_v
        mean_logit = mean_v z_v
        is_top1    = argmax_v z_v == label                    # first index wins a tie, as torch.argmax

    i.e. exactly ``token_logprobs(z * temperature, labels, temperature=temperature)`` on the
    unfused logits, and what TRL's fused LM head computes (its ``final_logit_softcapping`` is
    ``softcap``, the model config's ``logit_scale`` is ``logit_scale``).

    Args:
        hidden: ``[..., H]`` float32, bfloat16 or float16 (float64 on the reference backend): the
            final hidden states.  Never written to.
        weight: ``[V, H]``, same dtype and device as ``hidden``: the LM head (it may be the input
            embedding matrix of a model with tied embeddings; its gradient then adds to the
            embedding's through autograd).
        labels: ``[...]`` int64 (or int32), ``labels.shape == hidden.shape[:-1]``, already aligned
            with ``hidden`` (the caller shifts), each in ``[0, V)`` or equal to ``ignore_index``.
            The range is checked (``ValueError``) for CPU tensors, and for GPU tensors with
            ``RLHF_KERNELS_DEBUG=1``; without it an out-of-range label on a GPU gives NaN for that
            position.
        bias: None or ``[V]``, same dtype and device as ``hidden``.
        temperature: the sampling temperature, in ``[1.18e-38, 3.4e38]`` (as :func:`token_logprobs`).
        ignore_index: label value of positions to skip (prompt, padding).  Those rows are never
            projected (no matmul work), give 0 for logprob, entropy and mean_logit, False for
            is_top1, and get a zero gradient.
        return_entropy: also return the entropy of softmax(z).
        return_mean_logit: also return the mean over the vocabulary of z (not differentiable).
        return_is_top1: also return whether the label is the argmax of z (not differentiable).
        logit_scale: finite, non-zero multiplier of the logits (some model configs' ``logit_scale``).
        softcap: None, or the finite final-logit soft-cap c > 0 (Gemma-style ``final_logit_softcapping``).

    Returns:
        ``logprobs`` ``[...]`` float32 when no ``return_*`` flag is set; otherwise the tuple
        ``(logprobs, entropy, mean_logit, is_top1)`` keeping only the requested ones, in that order:
        entropy and mean_logit ``[...]`` float32, is_top1 ``[...]`` bool.  Gradients flow from
        logprobs and entropy to ``hidden``, ``weight`` and ``bias``, equal to the unfused
        computation's, returned in the input dtypes after fp32 accumulation over vocabulary and
        token tiles; with ``dz/dy = logit_scale * (1 - tanh^2(logit_scale * y / softcap)) /
        temperature`` (``logit_scale / temperature`` without soft-cap).

    Memory: extra memory is O(N + one tile) (per-row statistics, the rows with a label gathered
    in fp32, one fp32 logits tile), never O(N * V); backward recomputes the tiles.  Determinism:
    results and gradients are the same bits from run to run on the same device and inputs (fixed
    tile order, no floating-point atomics).
    """
    checks.check_float("hidden", hidden)
    checks.check_float("weight", weight)
    checks.check_tensor("labels", labels)
    if bias is not None:
        checks.check_float("bias", bias)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (the hidden size H), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, H] tensor, got shape {tuple(weight.shape)}")
    vocab, width = weight.shape
    if width != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must be None or a 1-D [V] tensor with V = weight.shape[0] = {vocab}, "
                             f"got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    if labels.dtype not in _INT_LABEL_DTYPES:
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {labels.dtype}")
    checks.check_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    named = {"hidden": hidden, "weight": weight, "labels": labels}
    if bias is not None:
        named["bias"] = bias
    checks.check_same_device(named)
    temperature = checks.check_temperature(temperature)
    logit_scale = checks.check_number("logit_scale", logit_scale)
    if logit_scale == 0.0 or math.isinf(logit_scale):
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale}")
    softcap = checks.check_range("softcap", softcap, 0.0, None, low_open=True, allow_none=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    flags = {"return_entropy": return_entropy, "return_mean_logit": return_mean_logit,
             "return_is_top1": return_is_top1}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if vocab == 0 and labels.numel() > 0:
        raise ValueError("weight must have at least one row (the vocabulary size V = weight.shape[0] is 0)")
    labels = labels.long()
    checks.check_labels(labels, vocab, ignore_index, vocab_name="weight.shape[0]")
    if weight.stride(-1) != 1:
        weight = weight.contiguous()  # the kernels read rows of the head; autograd routes the gradient back
    dtypes = (hidden.dtype, weight.dtype) + ((bias.dtype,) if bias is not None else ())
    _, fn = resolve("linear_token_logprobs", backend, hidden.device, dtypes)
    logprobs, entropy, mean_logit, is_top1 = fn(
        hidden, weight, labels, bias, logit_scale, 0.0 if softcap is None else softcap, temperature,
        ignore_index, return_entropy, return_mean_logit, return_is_top1,
    )
    wanted = [t for t, want in ((entropy, return_entropy), (mean_logit, return_mean_logit),
                                (is_top1, return_is_top1)) if want]
    return (logprobs, *wanted) if wanted else logprobs


@public_op(family="kl", cpu_auto_order=_REFERENCE_FIRST)
def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: str = "k3",
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference (Schulman, 2020).

    With d = logprobs - ref_logprobs (fp32): ``k1 = d``, ``k2 = d^2 / 2``,
    ``k3 = exp(-d) - 1 + d`` (unbiased, always >= 0), ``abs = |d|``.

    Args:
        logprobs: ``[...]`` float, log pi(token) of the policy.
        ref_logprobs: ``[...]`` float, same shape, log pi_ref(token).
        estimator: ``"k1" | "k2" | "k3" | "abs"``.

    Returns: ``[...]`` float32; differentiable w.r.t. both inputs.
    """
    checks.check_float("logprobs", logprobs)
    checks.check_float("ref_logprobs", ref_logprobs)
    checks.check_shape("ref_logprobs", ref_logprobs, logprobs.shape, "logprobs")
    checks.check_same_device({"logprobs": logprobs, "ref_logprobs": ref_logprobs})
    checks.check_choice("estimator", estimator, KL_ESTIMATORS)
    _, fn = resolve("kl_penalty", backend, logprobs.device, (logprobs.dtype, ref_logprobs.dtype))
    return fn(logprobs, ref_logprobs, estimator)


@public_op(family="gae")
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    backend: str = "auto",
):
    """Generalized Advantage Estimation (Schulman et al., 2016) in one reverse scan.

    Scanning t = T-1 .. 0 with A_next = V_next = 0 past the end, at valid steps::

        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next,    returns_t = A_t + V_t

    At a step where ``mask`` is 0 the running advantage and the next value carry over unchanged
    (interior masks such as tool output inside a multi-turn response are skipped over), and
    advantages and returns are 0 there.  On right-padded batches this is the textbook GAE; at valid
    steps it equals verl's masked GAE.

    Args:
        rewards: ``[B, T]`` float, per-token rewards (score at the last token, KL penalty per token).
        values: ``[B, T]`` float, value estimates V(s_t).
        mask: ``[B, T]`` bool, or integer/float holding exactly 0 and 1 (see below), the response
            tokens.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns: ``(advantages, returns)``, each ``[B, T]`` float32.

    Masks (here and in every op that takes one): a non-bool mask must hold only 0 and 1; any other
    value (0.5, 2, NaN) raises ``ValueError`` rather than counting as true.  The check reads the
    data, so it runs on CPU tensors always and on GPU tensors only with ``RLHF_KERNELS_DEBUG=1``.
    """
    checks.check_float("rewards", rewards)
    checks.check_float("values", values)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be a 2-D [B, T] tensor, got {rewards.dim()}-D shape {tuple(rewards.shape)}")
    checks.check_shape("values", values, rewards.shape, "rewards")
    mask = checks.check_mask("mask", mask, rewards.shape, "rewards")
    checks.check_same_device({"rewards": rewards, "values": values, "mask": mask})
    gamma = checks.check_range("gamma", gamma, 0.0, 1.0)
    lam = checks.check_range("lam", lam, 0.0, 1.0)
    _, fn = resolve("gae", backend, rewards.device, (rewards.dtype, values.dtype))
    return fn(rewards, values, mask, gamma, lam)


def _check_agg(agg: str, ndim: int) -> str:
    checks.check_choice("agg", agg, AGG_MODES)
    if agg != "token-mean" and ndim != 2:
        raise ValueError(f"agg={agg!r} needs 2-D [B, T] inputs, got {ndim}-D")
    return agg


@public_op(family="ppo")
def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    backend: str = "auto",
):
    """Clipped PPO policy loss (Schulman et al., 2017), with asymmetric and dual clipping.

    ::

        ratio = exp(clamp(logprobs - old_logprobs, -20, 20))
        pg    = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
        dual clip c > 1 (Ye et al., 2020), where A < 0:  pg = min(pg, -A * c)

    Aggregation ``agg`` (as verl): ``"token-mean"`` = sum(pg * m) / sum(m);
    ``"seq-mean-token-mean"`` = mean over sequences with a valid token of their token mean;
    ``"seq-mean-token-sum"`` = sum over all B sequences of their token sum, divided by B.

    Args:
        logprobs: ``[B, T]`` float, current policy log-probs (carries the gradient).
        old_logprobs: ``[B, T]`` float, log-probs at rollout time.
        advantages: ``[B, T]`` float.
        mask: ``[B, T]`` bool or exactly 0/1 (as in :func:`gae`); masked entries may hold NaN and
            are never read.
        clip_low, clip_high: clip range ``[1 - clip_low, 1 + clip_high]``; clip_high defaults to
            clip_low (DAPO's clip-higher uses clip_high > clip_low).
        dual_clip: None, or the dual-clip constant c > 1.

    Returns:
        ``(loss, stats)``: a float32 scalar, and a dict of detached float32 scalars ``clipfrac``
        (fraction of valid tokens where the clipped term is the larger), ``clipfrac_lower``
        (fraction where the dual clip bound is active) and ``approx_kl`` (token mean of
        old_logprobs - logprobs, verl's ``ppo_kl``).  An empty mask gives a loss of 0.
    """
    named = {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages}
    for name, t in named.items():
        checks.check_float(name, t)
    if logprobs.dim() < 1:
        raise ValueError("logprobs must have at least one dimension ([B, T] expected), got a 0-d tensor")
    checks.check_shape("old_logprobs", old_logprobs, logprobs.shape, "logprobs")
    checks.check_shape("advantages", advantages, logprobs.shape, "logprobs")
    mask = checks.check_mask("mask", mask, logprobs.shape, "logprobs")
    checks.check_same_device({**named, "mask": mask})
    clip_low = checks.check_range("clip_low", clip_low, 0.0, None)
    clip_high = checks.check_range("clip_high", clip_high, 0.0, None, allow_none=True)
    if clip_high is None:
        clip_high = clip_low
    dual_clip = checks.check_range("dual_clip", dual_clip, 1.0, None, low_open=True, allow_none=True)
    _check_agg(agg, logprobs.dim())
    dtypes = tuple(t.dtype for t in named.values())
    _, fn = resolve("ppo_policy_loss", backend, logprobs.device, dtypes)
    return fn(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg)


@public_op(family="ppo")
def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    backend: str = "auto",
):
    """Clipped value loss (PPO, as in TRL and verl).

    ::

        v_clip = old_values + clamp(values - old_values, -clip, clip)
        loss   = 0.5 * agg(max((values - R)^2, (v_clip - R)^2))

    ``clip=None`` turns clipping off (loss = 0.5 * agg((values - R)^2)).  ``agg`` as in
    :func:`ppo_policy_loss`.

    Args:
        values: ``[B, T]`` float, current value predictions (carries the gradient).
        old_values: ``[B, T]`` float, values at rollout time.
        returns: ``[B, T]`` float, GAE returns.
        mask: ``[B, T]`` bool or exactly 0/1 (as in :func:`gae`).

    Returns: ``(loss, stats)``; stats has ``clipfrac`` (fraction of valid tokens where the clipped
    term is the larger), a detached float32 scalar.
    """
    named = {"values": values, "old_values": old_values, "returns": returns}
    for name, t in named.items():
        checks.check_float(name, t)
    if values.dim() < 1:
        raise ValueError("values must have at least one dimension ([B, T] expected), got a 0-d tensor")
    checks.check_shape("old_values", old_values, values.shape, "values")
    checks.check_shape("returns", returns, values.shape, "values")
    mask = checks.check_mask("mask", mask, values.shape, "values")
    checks.check_same_device({**named, "mask": mask})
    clip = checks.check_range("clip", clip, 0.0, None, allow_none=True)
    _check_agg(agg, values.dim())
    dtypes = tuple(t.dtype for t in named.values())
    _, fn = resolve("ppo_value_loss", backend, values.device, dtypes)
    return fn(values, old_values, returns, mask, clip, agg)


@public_op(family="dpo", cpu_auto_order=_REFERENCE_FIRST)
def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    backend: str = "auto",
):
    """Per-pair DPO loss (Rafailov et al., 2023) and its IPO, hinge and robust variants.

    With h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)::

        sigmoid: -(1 - ls) * logsigmoid(beta h) - ls * logsigmoid(-beta h)
        ipo:     (h - 1 / (2 beta))^2
        hinge:   relu(1 - beta h)
        robust:  (-(1 - ls) * logsigmoid(beta h) + ls * logsigmoid(-beta h)) / (1 - 2 ls)

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``[B]`` float, summed sequence
            log-probs of the completions (e.g. ``token_logprobs(...).sum(-1)``).
        beta: > 0, the strength of the implicit KL constraint.
        loss_type: ``"sigmoid" | "ipo" | "hinge" | "robust"``.
        label_smoothing: in [0, 0.5), the assumed rate of flipped preference labels (cDPO).

    Returns: ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` float32; the rewards
    ``beta * (policy - ref)`` are detached, as TRL logs them.  Take ``losses.mean()`` to train.
    """
    named = {
        "policy_chosen": policy_chosen,
        "policy_rejected": policy_rejected,
        "ref_chosen": ref_chosen,
        "ref_rejected": ref_rejected,
    }
    for name, t in named.items():
        checks.check_float(name, t)
    if policy_chosen.dim() != 1:
        raise ValueError(
            f"policy_chosen must be a 1-D [B] tensor of summed log-probs, got shape {tuple(policy_chosen.shape)}"
        )
    for name in ("policy_rejected", "ref_chosen", "ref_rejected"):
        checks.check_shape(name, named[name], policy_chosen.shape, "policy_chosen")
    checks.check_same_device(named)
    beta = checks.check_range("beta", beta, 0.0, None, low_open=True)
    checks.check_choice("loss_type", loss_type, LOSS_TYPES)
    label_smoothing = checks.check_range("label_smoothing", label_smoothing, 0.0, 0.5, high_open=True)
    dtypes = tuple(t.dtype for t in named.values())
    _, fn = resolve("dpo_loss", backend, policy_chosen.device, dtypes)
    return fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, *, backend: str = "auto") -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is true (optionally along ``dim``).

    ``mask``: bool or exactly 0/1, shaped like ``x`` (as in :func:`gae`).  Masked entries are never
    read (NaN there does not leak); where no entry is valid the result is 0, not NaN.

    ``backend``: a few PyTorch reductions, computed the same way whichever backend is named (there
    is no kernel to choose), but checked like the other functions' argument: an unknown name raises
    ``ValueError``, and an explicit backend (or ``RLHF_KERNELS_BACKEND``) that cannot run on this
    machine or on ``x``'s device raises :class:`BackendUnavailableError`, so a script that pins a
    backend fails in the same place for every call.
    """
    checks.check_tensor("x", x)
    mask = checks.check_mask("mask", mask, x.shape, "x")
    checks.check_same_device({"x": x, "mask": mask})
    if dim is not None and not isinstance(dim, (int, tuple, list)):
        raise TypeError(f"dim must be None, an int or a tuple of ints, got {type(dim).__name__}")
    check_composite("masked_mean", backend, x.device)
    if not (x.is_floating_point() or x.is_complex()):
        x = x.float()
    return _masked.masked_mean(x, mask, dim)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *, backend: str = "auto"):
    """Whiten ``x`` with the mean and unbiased variance of its valid entries (as TRL/verl).

    ``(x - mean) / sqrt(var + 1e-8)``; with ``shift_mean=False`` the mean is added back.  Masked
    entries of the result are 0 and their input values are never read.  ``mask``: bool or exactly 0/1
    (as in :func:`gae`).  ``backend`` as in
    :func:`masked_mean`.
    """
    checks.check_float("x", x)
    mask = checks.check_mask("mask", mask, x.shape, "x")
    checks.check_same_device({"x": x, "mask": mask})
    if not isinstance(shift_mean, bool):
        raise TypeError(f"shift_mean must be a bool, got {type(shift_mean).__name__}")
    check_composite("masked_whiten", backend, x.device)
    return _masked.masked_whiten(x, mask, shift_mean)


# The public functions: every op declared above, and the two masked reductions.
__all__ = [*ops(), "masked_mean", "masked_whiten"]
