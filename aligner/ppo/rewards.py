"""Per-token rewards: the judge's score at the last token minus a KL penalty against the reference.

KL estimators, per token, for samples from the policy with ``log_ratio = log pi(y) - log ref(y)``
(Schulman, "Approximating KL divergence", 2020):

- ``k1 = log_ratio``: unbiased, high variance, can be negative per token;
- ``k2 = log_ratio**2 / 2``: biased, low variance;
- ``k3 = (exp(-log_ratio) - 1) + log_ratio``: unbiased and never negative.

KL controllers (Ziegler et al., 2019): ``fixed`` keeps the coefficient; ``adaptive`` moves it
towards the value that keeps the observed KL at ``target``:
``error = clip(KL / target - 1, -0.2, 0.2)``; ``coef *= 1 + error * n_steps / horizon``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": lambda log_ratio: log_ratio,
    "k2": lambda log_ratio: 0.5 * log_ratio**2,
    "k3": lambda log_ratio: torch.expm1(-log_ratio) + log_ratio,
}


def kl_per_token(policy_logps: torch.Tensor, reference_logps: torch.Tensor, mask: torch.Tensor,
                 estimator: str) -> torch.Tensor:
    """Per-token KL estimate (0 outside ``mask``)."""
    log_ratio = (policy_logps - reference_logps) * mask
    return KL_ESTIMATORS[estimator](log_ratio) * mask


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing moves."""


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller of the KL coefficient.

    When the measured KL is above ``target`` the coefficient grows (the penalty pulls harder);
    below it, it shrinks. The error is clipped to +-20% so one noisy batch cannot swing it.
    """

    def __init__(self, coef: float, target: float, horizon: int):
        self.value = coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after ``n_steps`` samples (rollout rows) with mean KL ``current_kl``."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards ``-kl_coef * kl``, plus each row's score on its last completion token."""
    rewards = -kl_coef * kl * mask
    last = last_token_index(mask)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true position of each row of ``mask``."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values.clamp(min=0)


def adjust_scores(scores: torch.Tensor, lengths: torch.Tensor, ended: torch.Tensor, *, length_penalty: float,
                  missing_eos_penalty: float | None, clip: float | None, whiten: bool) -> torch.Tensor:
    """Judge scores after the optional penalties, clipping and whitening (in that order).

    ``length_penalty`` is subtracted per completion token; ``missing_eos_penalty`` from completions
    that hit ``max_new_tokens`` without an end-of-sequence token.
    """
    scores = scores - length_penalty * lengths.to(scores.dtype)
    if missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - missing_eos_penalty)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    if whiten and scores.numel() > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    return scores
