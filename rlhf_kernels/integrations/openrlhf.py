"""OpenRLHF adapter: our kernels behind OpenRLHF's log-prob/entropy helpers, loss classes and GAE.

::

    from rlhf_kernels.integrations import openrlhf as rk_openrlhf
    rk_openrlhf.apply()      # before OpenRLHF builds its actor; rk_openrlhf.undo() puts everything back

What ``apply()`` changes (each undone by ``undo()``):

- ``log_probs_from_logits`` and ``compute_entropy`` in ``openrlhf.models.utils`` and in every loaded
  ``openrlhf.*`` module that imported them by name (``openrlhf.models.actor`` does);
- ``forward`` of ``openrlhf.models.loss.PolicyLoss``, ``ValueLoss`` and ``DPOLoss`` (so every instance,
  however built, computes with our kernels; configurations we do not cover, such as GSPO or the
  rollout-correction modes, keep OpenRLHF's own forward);
- with ``gae=True``, ``RemoteExperienceMaker.get_advantages_and_returns`` in
  ``openrlhf.trainer.ppo_utils.experience_maker``.

The adapter reproduces OpenRLHF's conventions, not ours (docs/integrations.md lists each difference).
"""

from __future__ import annotations

import torch

import rlhf_kernels as rk

from ._patch import Patches, applied_context, import_peer, rebind_late_imports

_patches = Patches()
_late = []


# ----------------------------------------------------------------------------- helpers


def log_probs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """OpenRLHF's ``log_probs_from_logits(logits [..., V], labels [...], temperature)`` -> float32 ``[...]``.

    Unlike OpenRLHF's helper, ``logits`` is never divided in place by ``temperature``.
    """
    return rk.token_logprobs(logits, labels.long(), temperature=float(temperature))


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """OpenRLHF's ``compute_entropy(logits [..., V])`` -> float32 entropy ``[...]``, differentiable."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return rk.token_logprobs(logits, labels, return_entropy=True)[1]


def get_advantages_and_returns(values, rewards, action_mask, gamma: float, lambd: float):
    """OpenRLHF's GAE: masked steps are zero-reward, zero-value steps that still discount.

    OpenRLHF multiplies values and rewards by the mask and runs the textbook recursion over every
    step; our :func:`rlhf_kernels.gae` skips masked steps instead, so the adapter passes the zeroed
    tensors with an all-true mask to reproduce OpenRLHF's numbers.  Returns ``(advantages, returns)``.
    """
    if action_mask is not None:
        values = action_mask * values
        rewards = action_mask * rewards
    everywhere = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    advantages, _ = rk.gae(rewards, values, everywhere, gamma=float(gamma), lam=float(lambd))
    returns = advantages + values
    return advantages.detach(), returns


def _experience_maker_gae(self, values, rewards, action_mask, gamma, lambd):
    return get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)


# ----------------------------------------------------------------------------- losses


def _mask_for(action_mask, like):
    if action_mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return action_mask.bool()


def _agg(mask, token_level_loss, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF's aggregate_loss as (our agg mode, factor turning our loss into OpenRLHF's)."""
    if token_level_loss:
        if batch_num_tokens is None:
            return "token-mean", 1.0
        return "token-mean", mask.sum() / batch_num_tokens * dp_size
    if global_batch_size is None:
        return "seq-mean-token-mean", 1.0
    rows_valid = (mask.sum(-1) > 0).sum()
    return "seq-mean-token-mean", rows_valid / global_batch_size * dp_size


def _policy_forward(original):
    def forward(
        self,
        log_probs,
        old_log_probs,
        advantages,
        action_mask=None,
        rollout_log_probs=None,
        dp_size=1,
        batch_num_tokens=None,
        global_batch_size=None,
    ):
        if self.policy_loss_type != "ppo" or self.is_correction_level != "off":
            return original(
                self,
                log_probs,
                old_log_probs,
                advantages,
                action_mask,
                rollout_log_probs,
                dp_size,
                batch_num_tokens,
                global_batch_size,
            )
        mask = _mask_for(action_mask, log_probs)
        agg, factor = _agg(mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        loss, stats = rk.ppo_policy_loss(
            log_probs,
            old_log_probs,
            advantages,
            mask,
            clip_low=self.clip_eps_low,
            clip_high=self.clip_eps_high,
            dual_clip=self.dual_clip,
            agg=agg,
        )
        return loss * factor, stats["clipfrac"], stats["approx_kl"], None, None

    forward.__wrapped__ = original
    return forward


def _value_forward(original):
    def forward(
        self,
        values,
        old_values,
        returns,
        action_mask=None,
        dp_size=1,
        batch_num_tokens=None,
        global_batch_size=None,
    ):
        mask = _mask_for(action_mask, values)
        agg, factor = _agg(mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        loss, _ = rk.ppo_value_loss(values, old_values, returns, mask, clip=self.clip_eps, agg=agg)
        return loss * factor

    forward.__wrapped__ = original
    return forward


def _dpo_forward(original):
    def forward(
        self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    ):
        if not (self.beta > 0 and (self.ipo or 0.0 <= self.label_smoothing < 0.5)):
            return original(
                self,
                policy_chosen_logps,
                policy_rejected_logps,
                reference_chosen_logps,
                reference_rejected_logps,
            )
        losses, chosen, rejected = rk.dpo_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
            beta=float(self.beta),
            loss_type="ipo" if self.ipo else "sigmoid",
            label_smoothing=0.0 if self.ipo else float(self.label_smoothing),
        )
        return losses.mean(), chosen, rejected

    forward.__wrapped__ = original
    return forward


# ----------------------------------------------------------------------------- apply / undo


def apply(*, logprobs=True, entropy=True, losses=True, gae=True) -> None:
    """Route OpenRLHF to our kernels (idempotent); ``undo()`` restores it."""
    if _patches:
        return
    try:
        utils = import_peer("openrlhf.models.utils", "openrlhf")
        if logprobs:
            original = utils.log_probs_from_logits
            _patches.rebind_imported("openrlhf", "log_probs_from_logits", original, log_probs_from_logits)
            _late.append(("openrlhf", "log_probs_from_logits", log_probs_from_logits, original))
        if entropy:
            original = utils.compute_entropy
            _patches.rebind_imported("openrlhf", "compute_entropy", original, compute_entropy)
            _late.append(("openrlhf", "compute_entropy", compute_entropy, original))
        if losses:
            loss = import_peer("openrlhf.models.loss", "openrlhf")
            for cls, make in (
                (loss.PolicyLoss, _policy_forward),
                (loss.ValueLoss, _value_forward),
                (loss.DPOLoss, _dpo_forward),
            ):
                _patches.set(cls, "forward", make(cls.forward))
        if gae:
            maker = import_peer("openrlhf.trainer.ppo_utils.experience_maker", "openrlhf")
            _patches.set(maker.RemoteExperienceMaker, "get_advantages_and_returns", _experience_maker_gae)
    except BaseException:
        undo()
        raise


def undo() -> None:
    """Put back everything :func:`apply` changed (no-op when nothing is applied)."""
    _patches.undo()
    while _late:
        rebind_late_imports(*_late.pop())


def is_applied() -> bool:
    return bool(_patches)


applied = applied_context(apply, undo, is_applied)
