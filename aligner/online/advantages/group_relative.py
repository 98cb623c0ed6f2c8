"""``group_relative``: GRPO's advantage (Shao et al., 2024), the critic replaced by the prompt's group.

Each prompt is sampled ``G`` times; a completion's advantage is its reward minus its group's mean,
divided by a standard deviation: the group's (``scale: group``, GRPO), the whole batch's
(``scale: batch``), or none (``scale: none``, Dr. GRPO, Liu et al. 2025, which argues the division
over-weights prompts that are nearly always solved or failed). The advantage is the same for every
token of a completion.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from aligner.hookspecs import hookimpl
from aligner.online.advantages import (
    AdvantageInputs,
    Advantages,
    AllReduceSum,
    all_sum,
    broadcast,
    group_index,
    group_sum,
    sequence_rewards,
)
from aligner.protocols import Options


def batch_std(values: Tensor, all_reduce_sum: AllReduceSum | None = None) -> Tensor:
    """Unbiased standard deviation of ``values`` (``[N]``) over the rows of every process (0 for < 2 rows)."""
    # Two passes, like masked_whiten: the mean first, then the squared deviations from it.
    total = all_sum(torch.stack([values.sum(), values.new_tensor(float(values.numel()))]), all_reduce_sum)
    mean = total[0] / total[1].clamp(min=1)
    squares = all_sum(((values - mean) ** 2).sum()[None], all_reduce_sum)[0]
    return (squares / (total[1] - 1).clamp(min=1)).sqrt()


class GroupRelative:
    """``A_i = (r_i - mean_group(r)) / (std + eps)``, broadcast to the completion's tokens."""

    name = "group_relative"
    needs_critic = False

    class Options(Options):
        """Group-relative settings."""

        scale: Literal["group", "batch", "none"] = Field(
            "group", description="divide by the group's std (GRPO), the batch's, or nothing (Dr. GRPO)")
        eps: float = Field(1e-4, gt=0, description="added to the std so that the division stays finite")

    def __init__(self, options: Options) -> None:
        self.options = options

    def estimate(self, inputs: AdvantageInputs) -> Advantages:
        """Group-relative advantages of one rollout batch."""
        rewards = sequence_rewards(inputs)
        inverse, num_groups = group_index(inputs.group_ids)
        sizes = group_sum(torch.ones_like(rewards), inverse, num_groups)
        centered = rewards - (group_sum(rewards, inverse, num_groups) / sizes)[inverse]
        # A group whose rewards are all equal teaches nothing; its advantage is set to exactly 0
        # because the mean's rounding error would otherwise leave tiny values.
        highest = rewards.new_full((num_groups,), -torch.inf).scatter_reduce(0, inverse, rewards, "amax")
        lowest = rewards.new_full((num_groups,), torch.inf).scatter_reduce(0, inverse, rewards, "amin")
        flat = highest == lowest

        if self.options.scale == "group":
            # Unbiased, as torch.std and the GRPO reference implementations; a group of one has std 0.
            var = group_sum(centered**2, inverse, num_groups) / (sizes - 1).clamp(min=1)
            advantages = centered / (var.sqrt()[inverse] + self.options.eps)
        elif self.options.scale == "batch":
            advantages = centered / (batch_std(rewards, inputs.all_reduce_sum) + self.options.eps)
        else:
            advantages = centered
        advantages = torch.where(flat[inverse], torch.zeros_like(advantages), advantages)

        counts = all_sum(torch.stack([flat.sum().to(rewards.dtype), rewards.new_tensor(float(num_groups))]),
                         inputs.all_reduce_sum)
        metrics = {"advantages/zero_std_groups": counts[0] / counts[1].clamp(min=1)}
        return Advantages(advantages=broadcast(advantages, inputs.mask), metrics=metrics)


@hookimpl
def register_advantage_estimators(register):
    """Register ``group_relative``."""
    register(GroupRelative)
