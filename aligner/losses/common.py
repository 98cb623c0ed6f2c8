"""Helpers shared by preference losses: log-ratios and the metrics every preference loss logs."""

from __future__ import annotations

import torch
import torch.distributed as dist

from aligner.protocols import LossInputs


def logratios(inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy-minus-reference log-prob sums of the (chosen, rejected) completions."""
    if inputs.reference is None:
        raise ValueError("this loss needs reference log-probs but none were computed")
    policy_chosen, policy_rejected = inputs.policy.pairs()
    ref_chosen, ref_rejected = inputs.reference.pairs()
    return policy_chosen.logps - ref_chosen.logps, policy_rejected.logps - ref_rejected.logps


def preference_metrics(inputs: LossInputs, chosen_rewards: torch.Tensor,
                       rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Implicit rewards, margins, accuracy and log-probs, named as TRL names them."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    policy_chosen, policy_rejected = inputs.policy.pairs()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen.logps.detach().mean(),
        "logps/rejected": policy_rejected.logps.detach().mean(),
    }


def mean_over_processes(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """``sum(total) / sum(count)`` over every process of a distributed run (here alone: ``total / count``).

    Each process passes its local sum and how many values it holds (0 with none); the division is
    over the pooled count, so a process with fewer values weighs less. With several processes, every
    process must call it the same number of times (a collective). ``0`` if no process holds a value.
    """
    pooled = torch.stack([total.detach().reshape(()),
                          torch.as_tensor(count, dtype=total.dtype, device=total.device).reshape(())])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(pooled, op=dist.ReduceOp.SUM)
    return pooled[0] / pooled[1] if pooled[1] > 0 else pooled.new_zeros(())
