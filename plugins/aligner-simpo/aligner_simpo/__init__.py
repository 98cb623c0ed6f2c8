"""SimPO: Simple Preference Optimization with a reference-free reward (Meng, Xia and Chen, 2024).

The implicit reward of a completion is its length-normalised log-probability under the policy,
scaled by ``beta``; the loss asks the chosen reward to beat the rejected one by a margin ``gamma``:

    r(x, y) = beta / |y| * log pi(y | x)
    loss    = -log sigmoid(r(x, y_w) - r(x, y_l) - gamma)

With ``label_smoothing`` eps > 0 the loss is ``(1 - eps) * loss(+) + eps * loss(-)`` (the flipped
pair), as in conservative DPO. No reference model appears anywhere, so the loss declares
``needs_reference = False`` and aligner runs no reference forward pass for it.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

import aligner
from aligner.protocols import PREFERENCE, LossInputs, LossOutput, Options

__version__ = "0.1.0"


class SimPOLoss:
    """SimPO on paired preference data; metrics are named like aligner's DPO metrics."""

    name = "simpo"
    data_formats = (PREFERENCE,)
    needs_reference = False

    class Options(Options):
        """SimPO's knobs (the paper's defaults for small models: beta 2.0, gamma 1.0)."""

        beta: float = Field(2.0, gt=0, description="scale of the length-normalised reward")
        gamma: float = Field(1.0, ge=0, description="target reward margin between chosen and rejected")
        label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed label-noise rate")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def compute(self, inputs: LossInputs) -> LossOutput:
        """Mean SimPO loss over the pairs of the micro-batch."""
        beta, gamma, eps = self.options.beta, self.options.gamma, self.options.label_smoothing
        chosen, rejected = inputs.policy.pairs()
        chosen_rewards = beta * chosen.mean_logps()
        rejected_rewards = beta * rejected.mean_logps()
        z = chosen_rewards - rejected_rewards - gamma
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen.logps.detach().mean(),
            "logps/rejected": rejected.logps.detach().mean(),
        }
        return LossOutput(losses.mean(), metrics)


@aligner.hookimpl
def register_losses(register):
    """Register the SimPO loss under the name ``simpo``."""
    register(SimPOLoss)
