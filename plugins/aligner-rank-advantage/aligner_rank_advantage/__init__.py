"""``rank``: group-relative advantages from the ranks of the rewards within each prompt's group.

GRPO's advantage (``group_relative``) is the reward minus its group's mean, over the group's std:
its size follows the reward's scale, and one outlier in a group squeezes the others towards 0. Here
only the order of the rewards matters. Within a group of ``G`` samples, each sample's reward gets its
rank ``r`` in ``0..G-1`` (tied rewards share the average of their ranks), and its advantage is

    A = scale * (r / (G - 1) - 0.5)

so every group's advantages are centred on 0 and span ``[-scale/2, scale/2]`` (``[-1, 1]`` with the
default ``scale: 2``) whatever the judge's scale. A group of one sample, or one whose rewards are all
equal, gets 0. The advantage is the same for every token of a completion.

Install the distribution and name it in a GRPO-family stage: ``estimator: {name: rank}``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

import aligner
from aligner.hookspecs import Register
from aligner.online.advantages import (
    AdvantageInputs,
    Advantages,
    all_sum,
    broadcast,
    group_index,
    group_sum,
    sequence_rewards,
)
from aligner.protocols import Options as BaseOptions

__all__ = ["RankAdvantage", "group_ranks", "register_advantage_estimators"]


def group_ranks(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's 0-based rank among its group's rows, ties averaged, and its group's size (both ``[N]``).

    Sorting (O(N log N)) rather than comparing every pair of rows, whose ``[N, N]`` masks would grow
    with the square of the rollout batch. A NaN is never equal to anything, so each NaN is a run of
    its own; callers decide what a NaN's rank means.
    """
    inverse, num_groups = group_index(group_ids)
    count = values.numel()
    if count == 0:
        return values.new_zeros(0), values.new_zeros(0)
    # Sort by value, then (stably) by group: rows end up grouped, each group in ascending order.
    by_value = torch.argsort(values, stable=True)
    order = by_value[torch.argsort(inverse[by_value], stable=True)]
    sorted_groups, sorted_values = inverse[order], values[order]

    sizes = group_sum(torch.ones_like(values), inverse, num_groups)
    starts = torch.cumsum(sizes, 0) - sizes  # the first sorted position of each group
    positions = torch.arange(count, device=values.device, dtype=values.dtype) - starts[sorted_groups]

    # Runs of equal values in one group are ties: each of their rows gets the mean position of the run.
    new_run = torch.ones(count, dtype=torch.bool, device=values.device)
    new_run[1:] = (sorted_groups[1:] != sorted_groups[:-1]) | (sorted_values[1:] != sorted_values[:-1])
    run_ids = torch.cumsum(new_run.long(), 0) - 1
    num_runs = int(run_ids[-1]) + 1
    run_sums = values.new_zeros(num_runs).index_add_(0, run_ids, positions)
    run_sizes = values.new_zeros(num_runs).index_add_(0, run_ids, torch.ones_like(positions))

    ranks = torch.empty_like(values)
    ranks[order] = (run_sums / run_sizes)[run_ids]
    return ranks, sizes[inverse]


class RankAdvantage:
    """``A_i = scale * (rank_i / (G - 1) - 0.5)`` within each prompt's group, broadcast to its tokens."""

    name = "rank"
    needs_critic = False

    class Options(BaseOptions):
        """Rank-advantage settings."""

        scale: float = Field(2.0, gt=0, description=(
            "width of each group's span of advantages: they lie in [-scale/2, scale/2]; the default 2 "
            "gives [-1, 1]"))

    def __init__(self, options: Options | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def estimate(self, inputs: AdvantageInputs) -> Advantages:
        """Rank advantages of one rollout batch (groups are local to this process, as for GRPO)."""
        # Rank what would otherwise be the reward, per-token rewards (an in-reward KL) included.
        rewards = sequence_rewards(inputs)
        if not rewards.is_floating_point():  # integer scores would make the rank arithmetic integral
            rewards = rewards.float()
        inverse, num_groups = group_index(inputs.group_ids)
        ranks, sizes = group_ranks(rewards, inputs.group_ids)
        # A group of one has no order to learn from: clamp the denominator, then zero it below.
        advantages = self.options.scale * (ranks / (sizes - 1).clamp(min=1) - 0.5)
        advantages = torch.where(sizes > 1, advantages, torch.zeros_like(advantages))

        # A NaN reward has no rank, and ranking it would hand its group finite advantages that look
        # legitimate; NaN for the whole group instead lets the trainer's non-finite-step guard see it.
        nan_groups = group_sum(torch.isnan(rewards).to(rewards.dtype), inverse, num_groups) > 0
        advantages = torch.where(nan_groups[inverse], torch.full_like(advantages, torch.nan), advantages)

        # Tied: all of a group's rewards equal (a group of one included), so its advantages are all 0.
        highest = rewards.new_full((num_groups,), -torch.inf).scatter_reduce(0, inverse, rewards, "amax")
        lowest = rewards.new_full((num_groups,), torch.inf).scatter_reduce(0, inverse, rewards, "amin")
        tied = (highest == lowest).to(rewards.dtype)
        # Shares over the whole batch, not this process's rows, so every process logs the same value.
        counts = all_sum(torch.stack([tied.sum(), rewards.new_tensor(float(num_groups))]), inputs.all_reduce_sum)
        metrics = {"advantages/tied_groups": counts[0] / counts[1].clamp(min=1)}
        return Advantages(advantages=broadcast(advantages, inputs.mask), metrics=metrics)


@aligner.hookimpl
def register_advantage_estimators(register: Register) -> None:
    """Register ``rank``."""
    register(RankAdvantage)
