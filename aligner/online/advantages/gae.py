"""``gae``: generalised advantage estimation with a critic (Schulman et al., 2016), as PPO uses it.

Per token ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``:
``lam`` trades the critic's bias (``lam = 0``: one-step TD) for the sampled return's variance
(``lam = 1``: Monte-Carlo). The value targets are ``returns = A + V``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from aligner.hookspecs import hookimpl
from aligner.online.advantages import AdvantageInputs, Advantages, masked_whiten, token_level_rewards
from aligner.protocols import Options


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns ``[N, T]`` for per-token ``rewards`` and critic ``values``.

    ``mask`` marks each row's completion tokens, one contiguous run per row (prompt before it,
    padding after). The episode ends after a row's last completion token, so the value after it
    is 0. The operations are those of the PPO implementation, in its order (bit-identical results).
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        # ``next_mask`` is 0 after the last completion token: nothing is bootstrapped past the end.
        next_mask = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * next_mask * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


class GAE:
    """GAE over the per-token rewards (score on the last token plus ``token_rewards``) and the critic's values."""

    name = "gae"
    needs_critic = True

    class Options(Options):
        """GAE settings."""

        gamma: float = Field(1.0, ge=0, le=1, description="discount per token")
        lam: float = Field(0.95, ge=0, le=1, description="bias/variance trade-off of the estimate")
        whiten: bool = Field(True, description="normalise advantages over the global batch")

    def __init__(self, options: Options) -> None:
        self.options = options

    def estimate(self, inputs: AdvantageInputs) -> Advantages:
        """Advantages (whitened if asked) and value targets of one rollout batch."""
        if inputs.values is None:
            raise ValueError("advantage estimator 'gae' needs critic values (inputs.values)")
        advantages, returns = gae(token_level_rewards(inputs), inputs.values, inputs.mask,
                                  self.options.gamma, self.options.lam)
        if self.options.whiten:
            advantages = masked_whiten(advantages, inputs.mask, inputs.all_reduce_sum)
        return Advantages(advantages=advantages, returns=returns)


@hookimpl
def register_advantage_estimators(register):
    """Register ``gae``."""
    register(GAE)
