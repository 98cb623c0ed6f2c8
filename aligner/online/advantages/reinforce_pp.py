"""``reinforce_pp`` and ``reinforce_pp_baseline``: REINFORCE++ (Hu, 2025).

Without a critic: each token's advantage is its discounted return-to-go
``G_t = sum_{s >= t} gamma^(s-t) r_s`` over the per-token rewards (the score on the last token,
plus ``token_rewards`` such as a KL penalty), whitened over the global batch, the batch statistics
standing in for a critic's baseline. ``reinforce_pp_baseline`` first subtracts from each score the
mean score of its prompt's group, which suits several samples per prompt.
"""

from __future__ import annotations

import dataclasses

import torch
from pydantic import Field
from torch import Tensor

from aligner.hookspecs import hookimpl
from aligner.online.advantages import (
    AdvantageInputs,
    Advantages,
    group_mean,
    masked_whiten,
    token_level_rewards,
)
from aligner.protocols import Options


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``[N, T]``: the discounted sum of each row's masked rewards from each token to its end, 0 outside ``mask``."""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    # From the right: rewards after a row's last token are 0, so the sum starts at its end.
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    # Prompt positions before the completion carry the whole return; they are not actions.
    return returns * mask


class ReinforcePP:
    """Whitened discounted returns as advantages."""

    name = "reinforce_pp"
    needs_critic = False

    class Options(Options):
        """REINFORCE++ settings."""

        gamma: float = Field(1.0, ge=0, le=1, description="discount per token")

    def __init__(self, options: Options) -> None:
        self.options = options

    def estimate(self, inputs: AdvantageInputs) -> Advantages:
        """REINFORCE++ advantages of one rollout batch."""
        returns = discounted_returns(token_level_rewards(inputs), inputs.mask, self.options.gamma)
        return Advantages(advantages=masked_whiten(returns, inputs.mask, inputs.all_reduce_sum))


class ReinforcePPBaseline(ReinforcePP):
    """REINFORCE++ on scores minus their group's mean score."""

    name = "reinforce_pp_baseline"

    def estimate(self, inputs: AdvantageInputs) -> Advantages:
        """REINFORCE++ advantages after subtracting each group's mean score."""
        baselined = inputs.scores - group_mean(inputs.scores, inputs.group_ids)
        return super().estimate(dataclasses.replace(inputs, scores=baselined))


@hookimpl
def register_advantage_estimators(register):
    """Register ``reinforce_pp`` and ``reinforce_pp_baseline``."""
    register(ReinforcePP)
    register(ReinforcePPBaseline)
