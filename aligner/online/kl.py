"""Per-token KL estimators and the controllers of the KL coefficient.

For tokens sampled from the policy, with ``log_ratio = log pi(y) - log ref(y)`` per token, three
estimators of ``KL(pi || ref)`` (Schulman, "Approximating KL divergence", 2020):

- ``k1 = log_ratio``: unbiased but high variance, and negative for some tokens;
- ``k2 = log_ratio**2 / 2``: biased, low variance (its gradient is that of the true KL to first order);
- ``k3 = (exp(-log_ratio) - 1) + log_ratio``: unbiased, low variance and never negative.

Controllers (Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019):
``FixedKLController`` keeps the coefficient; ``AdaptiveKLController`` moves it so that the observed
KL tracks ``target``: ``error = clip(KL / target - 1, -0.2, 0.2)``; ``coef *= 1 + error * n_steps / horizon``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda log_ratio: log_ratio,
    # ``0.5 * x**2`` rather than ``x**2 / 2``: the same value (halving is exact) written as the PPO
    # implementation writes it, so its results stay bit-identical.
    "k2": lambda log_ratio: 0.5 * log_ratio**2,
    # expm1 keeps precision for small log-ratios, where exp(-x) - 1 would cancel.
    "k3": lambda log_ratio: torch.expm1(-log_ratio) + log_ratio,
}


def kl_estimator(name: str) -> Callable[[Tensor], Tensor]:
    """The estimator called ``name``; a ``ValueError`` lists the valid names."""
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; valid: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


def kl_per_token(policy_logps: Tensor, reference_logps: Tensor, mask: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate ``[N, T]`` of the policy from the reference, 0 outside ``mask``.

    The log-ratio is masked before the estimator so that padding (whatever its log-probs) cannot
    overflow ``exp`` in k3; the operations are those of the PPO implementation, in its order.
    """
    log_ratio = (policy_logps - reference_logps) * mask
    return kl_estimator(estimator)(log_ratio) * mask


class FixedKLController:
    """A constant KL coefficient ``value``."""

    def __init__(self, coef: float) -> None:
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing moves: the coefficient is fixed."""


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller of the KL coefficient ``value``.

    Above ``target`` the coefficient grows (the penalty pulls harder), below it shrinks. The error
    is clipped to +-20% so that one noisy batch cannot swing it; ``horizon`` is the number of
    samples over which a constant error would be corrected.
    """

    def __init__(self, coef: float, target: float, horizon: int) -> None:
        self.value = coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after ``n_steps`` samples (rollout rows) whose mean KL was ``current_kl``."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
