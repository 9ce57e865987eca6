"""The PPO KL coefficient ``kl_coef``: fixed, or adapted towards a target KL (Ziegler et al., 2019).

The controller's ``value`` is the coefficient of the current step; ``update(kl, n)`` is called after
each step with the measured KL per sequence and the number of sequences the step used.
"""

from __future__ import annotations


class AdaptiveKLController:
    """Ziegler et al. (2019): kl_coef <- kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient (0 turns the penalty off)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


def make_kl_controller(hp) -> AdaptiveKLController | FixedKLController:
    """The controller ``hp`` asks for (``kl_coef``, ``adaptive_kl``, ``target_kl``, ``kl_horizon``)."""
    if hp.adaptive_kl:
        return AdaptiveKLController(hp.kl_coef, hp.target_kl, hp.kl_horizon)
    return FixedKLController(hp.kl_coef)
