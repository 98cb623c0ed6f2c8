"""``rloo``: REINFORCE leave-one-out (Ahmadian et al., 2024, "Back to Basics").

Each completion's baseline is the mean reward of the OTHER samples of its prompt,
``A_i = r_i - (sum_group(r) - r_i) / (G_i - 1)``: unbiased, since the baseline does not depend on
the completion itself, and without a critic. The advantage is the same for every token.
"""

from __future__ import annotations

import torch

from aligner.hookspecs import hookimpl
from aligner.online.advantages import (
    AdvantageInputs,
    Advantages,
    broadcast,
    group_index,
    group_sum,
    sequence_rewards,
)
from aligner.protocols import Options


class RLOO:
    """Leave-one-out baseline over each prompt's samples; needs at least 2 samples per prompt."""

    name = "rloo"
    needs_critic = False

    class Options(Options):
        """RLOO has no settings."""

    def __init__(self, options: Options) -> None:
        self.options = options

    def estimate(self, inputs: AdvantageInputs) -> Advantages:
        """RLOO advantages of one rollout batch."""
        rewards = sequence_rewards(inputs)
        inverse, num_groups = group_index(inputs.group_ids)
        sizes = group_sum(torch.ones_like(rewards), inverse, num_groups)
        if bool((sizes < 2).any()):
            lonely = int(torch.unique(inputs.group_ids)[sizes < 2][0])
            raise ValueError(f"rloo needs at least 2 samples per prompt; group {lonely} has 1")
        others = (group_sum(rewards, inverse, num_groups)[inverse] - rewards) / (sizes[inverse] - 1)
        return Advantages(advantages=broadcast(rewards - others, inputs.mask))


@hookimpl
def register_advantage_estimators(register):
    """Register ``rloo``."""
    register(RLOO)
