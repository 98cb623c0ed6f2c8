"""Advantage estimators: what an estimator reads and returns, and the masked statistics they share.

Each estimator is a plugin class in its own module (``gae``, ``group_relative``, ``rloo``,
``reinforce_pp``) with a ``name``, ``needs_critic``, an ``Options`` model and
``estimate(inputs: AdvantageInputs) -> Advantages``.

Batch-wide statistics (whitening, a batch standard deviation) must be those of the global batch,
not of one process's rows, so they go through ``all_reduce_sum``: a function that sums a tensor
over processes. Group statistics stay local: the samples of one prompt live on one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

AllReduceSum = Callable[[Tensor], Tensor]


@dataclass
class AdvantageInputs:
    """What an estimator reads for one rollout batch (this process's rows)."""

    scores: Tensor  # [N] one reward per completion (already weighted/penalised)
    mask: Tensor  # [N, T] bool: completion tokens
    group_ids: Tensor  # [N] long: rows with the same id are samples for the same prompt (G per group)
    # [N, T] per-token rewards added to the score, e.g. -kl_coef * kl when the KL is in the reward;
    # None: zeros.
    token_rewards: Tensor | None = None
    values: Tensor | None = None  # [N, T] critic values (estimators with needs_critic)
    # Sums a tensor over processes for batch-wide statistics; None: one process.
    all_reduce_sum: AllReduceSum | None = None


@dataclass
class Advantages:
    """What an estimator returns."""

    advantages: Tensor  # [N, T], zero outside the mask
    returns: Tensor | None = None  # [N, T] value targets (critic estimators), else None
    metrics: dict[str, Tensor] = field(default_factory=dict)


def all_sum(tensor: Tensor, all_reduce_sum: AllReduceSum | None) -> Tensor:
    """``tensor`` summed over processes (itself with one process)."""
    return tensor if all_reduce_sum is None else all_reduce_sum(tensor)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true (0 when nothing is)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """Population variance of ``values`` where ``mask`` is true."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def masked_whiten(values: Tensor, mask: Tensor, all_reduce_sum: AllReduceSum | None = None) -> Tensor:
    """``values`` shifted and scaled to zero mean and unit variance over the masked positions of all processes.

    Two passes (mean, then the mean squared deviation) rather than ``E[x^2] - E[x]^2``, which
    cancels catastrophically when the mean is large. With one process the operations are exactly
    those of ``masked_mean``/``masked_var``, so the result is bit-identical to theirs.
    """
    mask = mask.to(values.dtype)
    total = all_sum(torch.stack([(values * mask).sum(), mask.sum()]), all_reduce_sum)
    count = total[1].clamp(min=1)
    mean = total[0] / count
    var = all_sum((((values - mean) ** 2) * mask).sum()[None], all_reduce_sum)[0] / count
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def sequence_rewards(inputs: AdvantageInputs) -> Tensor:
    """``[N]``: each row's score plus the sum of its masked per-token rewards."""
    if inputs.token_rewards is None:
        return inputs.scores
    mask = inputs.mask.to(inputs.token_rewards.dtype)
    return inputs.scores + (inputs.token_rewards * mask).sum(dim=-1)


def token_level_rewards(inputs: AdvantageInputs) -> Tensor:
    """``[N, T]``: the masked per-token rewards, with each row's score added on its last masked token.

    An empty row (no masked token) gets no reward at all: it has no token to put its score on.
    """
    mask = inputs.mask.bool()
    if inputs.token_rewards is None:
        rewards = torch.zeros(mask.shape, dtype=inputs.scores.dtype, device=mask.device)
    else:
        rewards = inputs.token_rewards * mask
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values.clamp(min=0)
    scores = torch.where(mask.any(dim=1), inputs.scores, torch.zeros_like(inputs.scores))
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def broadcast(seq_values: Tensor, mask: Tensor) -> Tensor:
    """``[N, T]``: each row's value on each of its masked tokens, 0 elsewhere."""
    return seq_values[:, None] * mask.to(seq_values.dtype)


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Each row's group renumbered ``0..K-1`` (``[N]``), and ``K``."""
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, unique.numel()


def group_sum(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """``[K]``: the sum of ``values`` (``[N]``) over the rows of each group."""
    return values.new_zeros(num_groups).index_add_(0, inverse, values)


def group_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """``[N]``: the mean of ``values`` over each row's group, per row."""
    inverse, num_groups = group_index(group_ids)
    sizes = group_sum(torch.ones_like(values), inverse, num_groups)
    return (group_sum(values, inverse, num_groups) / sizes)[inverse]
