"""verl adapter: our PPO policy loss and GAE in verl's registries, our log-prob/entropy kernels in its helpers.

::

    from rlhf_kernels.integrations import verl as rk_verl
    rk_verl.apply()      # before verl builds its workers; rk_verl.undo() puts everything back
    # actor_rollout_ref.actor.policy_loss.loss_mode=vanilla (or =rlhf_kernels), algorithm.adv_estimator=gae

What ``apply()`` changes (each undone by ``undo()``):

- ``core_algos.POLICY_LOSS_REGISTRY``: ``"rlhf_kernels"`` (and, with ``replace_defaults``, ``"vanilla"``)
  -> :func:`compute_policy_loss`, registered with verl's ``register_policy_loss``.
- ``core_algos.ADV_ESTIMATOR_REGISTRY``: ``"rlhf_kernels_gae"`` (and ``"gae"``) -> :func:`compute_gae_advantage_return`,
  registered with ``register_adv_est``; ``core_algos.compute_gae_advantage_return`` too, because verl's
  trainer calls that name directly for ``adv_estimator=gae`` (the only estimator it passes values to).
- ``core_algos.kl_penalty_forward`` (what ``kl_penalty`` calls, ``k3+`` included) -> :func:`kl_penalty_forward`.
- ``logprobs_from_logits`` in ``verl.utils.torch_functional`` and in every loaded ``verl.*`` module that
  imported it by name; ``entropy_from_logits`` and ``entropy_from_logits_with_chunking`` in
  ``verl.utils.torch_functional`` (verl's engines read them from there).

The adapter reproduces verl's conventions, not ours (docs/integrations.md lists each difference).
"""

from __future__ import annotations

import importlib

import torch

import rlhf_kernels as rk

from ._patch import Patches, applied_context, import_peer, rebind_late_imports

POLICY_LOSS_NAME = "rlhf_kernels"
ADV_ESTIMATOR_NAME = "rlhf_kernels_gae"
_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)

_patches = Patches()
_late = []  # (prefix, name, ours, original) to rebind on undo
_originals = {}  # verl functions the adapter falls back to while patched


# ----------------------------------------------------------------------------- helpers verl's actor calls


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True
) -> torch.Tensor:
    """verl's ``logprobs_from_logits(logits [..., V], labels [...])`` -> float32 ``[...]`` with our kernel.

    ``inplace_backward`` is accepted for verl's signature: our backward never keeps an fp32 ``[N, V]``
    copy, so there is nothing to do in place.
    """
    return rk.token_logprobs(logits, labels.long())


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits(logits [..., V])`` -> float32 entropy ``[...]``, differentiable."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return rk.token_logprobs(logits, labels, return_entropy=True)[1]


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """verl's chunked entropy: our kernel never materialises ``[N, V]``, so ``chunk_size`` is not needed."""
    return entropy_from_logits(logits)


# ----------------------------------------------------------------------------- policy loss


def _cfg(config, name, default=None):
    if config is None:
        return default
    if hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def _agg_scale(loss_agg_mode, mask, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor):
    """Map verl's aggregation onto ours: (our agg mode, factor turning our loss into verl's)."""
    if loss_agg_mode not in _AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {_AGG_MODES}, got {loss_agg_mode!r}")
    if loss_agg_mode in ("token-mean", "token-sum"):
        if loss_agg_mode == "token-mean" and batch_num_tokens is None and dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        if loss_agg_mode == "token-sum":
            return "token-mean", mask.sum() * dp_size
        if batch_num_tokens is None:
            return "token-mean", 1.0
        return "token-mean", mask.sum() / batch_num_tokens * dp_size
    if global_batch_size is None and dp_size > 1:
        raise ValueError("global_batch_size is required when dp_size > 1")
    rows_valid = (mask.sum(-1) > 0).sum()
    # verl divides by global_batch_size, which defaults to the rows holding a valid token (our
    # seq-mean-token-sum divides by all B rows; verl did too until late 2025).
    denom = rows_valid.clamp(min=1) if global_batch_size is None else global_batch_size
    if loss_agg_mode == "seq-mean-token-mean":  # ours: mean over rows with a valid token
        return "seq-mean-token-mean", rows_valid / denom * dp_size
    factor = mask.shape[0] / denom * dp_size  # ours: sum over rows / B
    if loss_agg_mode == "seq-mean-token-sum-norm":
        factor = factor / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return "seq-mean-token-sum", factor


def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's ``vanilla`` clipped PPO loss (asymmetric clip, dual clip) on our fused kernel.

    Same arguments, order and result as ``verl.trainer.ppo.core_algos.compute_policy_loss_vanilla``:
    ``(pg_loss scalar, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} as floats)``.
    ``config`` supplies ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``
    (dual clip, default 3.0, as verl always applies it) and ``global_batch_info`` (``dp_size``,
    ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``).
    """
    if config is None:
        raise ValueError("config must be verl's actor config (clip_ratio, clip_ratio_low/high, clip_ratio_c)")
    clip_ratio = _cfg(config, "clip_ratio", 0.2)
    clip_low = _cfg(config, "clip_ratio_low", clip_ratio)
    clip_high = _cfg(config, "clip_ratio_high", clip_ratio)
    clip_c = _cfg(config, "clip_ratio_c", 3.0)
    if not clip_c > 1.0:
        raise ValueError(f"clip_ratio_c (dual clip) must be > 1.0, got {clip_c}")
    info = dict(_cfg(config, "global_batch_info", {}) or {})
    mask = response_mask.bool()
    agg, factor = _agg_scale(
        loss_agg_mode,
        mask,
        info.get("dp_size", 1),
        info.get("batch_num_tokens"),
        info.get("global_batch_size"),
        info.get("loss_scale_factor"),
    )
    kwargs = {
        "clip_low": float(clip_low),
        "clip_high": float(clip_high),
        "dual_clip": float(clip_c),
        "agg": agg,
    }
    # Rollout importance weights w >= 0 scale each token's loss: w * pg(A) == pg(w * A) for the
    # clipped and dual-clipped terms alike, so they fold into the advantages.
    adv = advantages if rollout_is_weights is None else advantages * rollout_is_weights
    loss, stats = rk.ppo_policy_loss(log_prob, old_log_prob, adv, mask, **kwargs)
    if rollout_is_weights is not None:
        with torch.no_grad():  # verl's clip fractions ignore the weights
            _, stats = rk.ppo_policy_loss(log_prob.detach(), old_log_prob, advantages, mask, **kwargs)
    with torch.no_grad():
        # verl's ppo_kl uses the log-ratio clamped to +-20; ours (approx_kl) does not clamp.
        ppo_kl = rk.masked_mean((old_log_prob.float() - log_prob.detach().float()).clamp(-20.0, 20.0), mask)
    metrics = {
        "actor/pg_clipfrac": stats["clipfrac"].item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": stats["clipfrac_lower"].item(),
    }
    return loss * factor, metrics


# ----------------------------------------------------------------------------- KL penalty

_KL_MODES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def kl_penalty_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's ``kl_penalty_forward`` on our kernel: per-token KL ``[...]`` float32.

    As verl, ``low_var_kl``/``k3`` clamps the log-ratio to +-20 and the result to +-10 (our
    :func:`rlhf_kernels.kl_penalty` clamps neither).  Other modes (``full``) go to verl's own function.
    """
    estimator = _KL_MODES.get(kl_penalty)
    if estimator is None:
        original = _originals.get("kl_penalty_forward")
        if original is None:
            original = importlib.import_module("verl.trainer.ppo.core_algos").kl_penalty_forward
        return original(logprob, ref_logprob, kl_penalty)
    if estimator != "k3":
        return rk.kl_penalty(logprob, ref_logprob, estimator=estimator)
    log_ratio = torch.clamp(logprob.float() - ref_logprob.float(), -20.0, 20.0)
    return rk.kl_penalty(log_ratio, torch.zeros_like(log_ratio), estimator="k3").clamp(-10.0, 10.0)


# ----------------------------------------------------------------------------- GAE


def _carry_into_masked(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's loop leaves the running advantage at masked steps: the value at the next valid step (or 0)."""
    steps = adv.shape[-1]
    idx = torch.arange(steps, device=adv.device).expand_as(mask)
    idx = torch.where(mask, idx, torch.full_like(idx, steps))
    next_valid = idx.flip(-1).cummin(-1).values.flip(-1)
    padded = torch.cat([adv, adv.new_zeros(adv.shape[0], 1)], dim=-1)
    return padded.gather(-1, next_valid)


def _verl_masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl_F.masked_whiten: unbiased variance over the mask, applied to every entry (masked ones too)."""
    count = mask.sum()
    if count == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if count == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")
    mean = rk.masked_mean(x, mask)
    var = rk.masked_mean((x - mean) ** 2, mask) * (count / (count - 1))
    return (x - mean) * torch.rsqrt(var + 1e-8)


def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    gamma=1.0,
    lam=1.0,
    **kwargs,
):
    """verl's ``compute_gae_advantage_return`` on our one-pass GAE kernel: ``(advantages, returns)`` ``[bs, T]``.

    As verl: masked steps (observation tokens inside a multi-turn response) are skipped, the advantages
    are whitened over the mask, and masked entries hold the running advantage (returns = that + values).
    """
    if values is None or response_mask is None:
        raise ValueError(
            "values and response_mask are required: verl's trainer passes values only to adv_estimator=gae, "
            "which rlhf_kernels.integrations.verl.apply() routes here"
        )
    with torch.no_grad():
        mask = response_mask.bool()
        adv, _ = rk.gae(token_level_rewards, values, mask, gamma=float(gamma), lam=float(lam))
        adv = _carry_into_masked(adv, mask)
        returns = adv + values
        advantages = _verl_masked_whiten(adv, mask)
    return advantages, returns


# ----------------------------------------------------------------------------- apply / undo


def apply(*, policy_loss=True, gae=True, kl=True, logprobs=True, entropy=True, replace_defaults=True) -> None:
    """Route verl to our kernels (idempotent). ``replace_defaults`` also maps ``vanilla`` and ``gae``."""
    if _patches:
        return
    core_algos = import_peer("verl.trainer.ppo.core_algos", "verl")
    verl_f = import_peer("verl.utils.torch_functional", "verl")
    try:
        if policy_loss:
            registry = core_algos.POLICY_LOSS_REGISTRY
            _patches.set_item(registry, POLICY_LOSS_NAME, registry.get(POLICY_LOSS_NAME))
            core_algos.register_policy_loss(POLICY_LOSS_NAME)(compute_policy_loss)
            if replace_defaults:
                _patches.set_item(registry, "vanilla", compute_policy_loss)
        if gae:
            registry = core_algos.ADV_ESTIMATOR_REGISTRY
            _patches.set_item(registry, ADV_ESTIMATOR_NAME, registry.get(ADV_ESTIMATOR_NAME))
            registry.pop(ADV_ESTIMATOR_NAME)
            core_algos.register_adv_est(ADV_ESTIMATOR_NAME)(compute_gae_advantage_return)
            if replace_defaults:
                _patches.set_item(registry, "gae", compute_gae_advantage_return)
                _patches.set(core_algos, "compute_gae_advantage_return", compute_gae_advantage_return)
        if kl:
            _originals["kl_penalty_forward"] = core_algos.kl_penalty_forward
            _patches.set(core_algos, "kl_penalty_forward", kl_penalty_forward)
        if logprobs:
            original = verl_f.logprobs_from_logits
            _patches.rebind_imported("verl", "logprobs_from_logits", original, logprobs_from_logits)
            _late.append(("verl", "logprobs_from_logits", logprobs_from_logits, original))
        if entropy:
            _patches.set(verl_f, "entropy_from_logits", entropy_from_logits)
            _patches.set(verl_f, "entropy_from_logits_with_chunking", entropy_from_logits_with_chunking)
    except BaseException:
        undo()
        raise


def undo() -> None:
    """Put back everything :func:`apply` changed (no-op when nothing is applied)."""
    _patches.undo()
    _originals.clear()
    while _late:
        rebind_late_imports(*_late.pop())


def is_applied() -> bool:
    return bool(_patches)


applied = applied_context(apply, undo, is_applied)
