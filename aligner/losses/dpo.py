"""DPO (Rafailov et al., 2023) and IPO (Azar et al., 2023): preference losses against a reference.

With log-ratios ``r_c = log pi(y_c|x) - log ref(y_c|x)`` and ``r_r`` likewise for the rejected answer:

- DPO (sigmoid): ``-(1 - eps) * log sigmoid(beta (r_c - r_r)) - eps * log sigmoid(-beta (r_c - r_r))``,
  ``eps = label_smoothing`` (0 is plain DPO; > 0 is conservative DPO for noisy labels).
- IPO: ``(h - 1 / (2 beta))^2`` with ``h = r_c / |y_c| - r_r / |y_r|`` when ``length_normalize`` (TRL's
  form, which the IPO authors confirmed matches their experiments), or ``h = r_c - r_r`` (the
  paper's Eq. 17 as written) when not.

Implicit rewards are ``beta * r`` for both, as in TRL's logs.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.losses.common import logratios, preference_metrics
from aligner.protocols import PREFERENCE, LossInputs, LossOutput, Options


class DPOLoss:
    """Direct Preference Optimization, sigmoid form."""

    name = "dpo"
    data_formats = (PREFERENCE,)
    needs_reference = True

    class Options(Options):
        """DPO's knobs."""

        beta: float = Field(0.1, gt=0, description="strength of the KL constraint to the reference")
        label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed label-noise rate (cDPO)")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def compute(self, inputs: LossInputs) -> LossOutput:
        """Mean DPO loss over the pairs of the micro-batch."""
        beta, eps = self.options.beta, self.options.label_smoothing
        chosen, rejected = logratios(inputs)
        delta = beta * (chosen - rejected)
        losses = -(1 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
        return LossOutput(losses.mean(), preference_metrics(inputs, beta * chosen, beta * rejected))


class IPOLoss:
    """Identity Preference Optimisation: regress the log-ratio gap onto ``1 / (2 beta)``."""

    name = "ipo"
    data_formats = (PREFERENCE,)
    needs_reference = True

    class Options(Options):
        """IPO's knobs."""

        beta: float = Field(0.1, gt=0, description="regularisation; the target gap is 1 / (2 beta)")
        length_normalize: bool = Field(True, description="average log-ratios per token (TRL) or sum (paper)")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def compute(self, inputs: LossInputs) -> LossOutput:
        """Mean IPO loss over the pairs of the micro-batch."""
        beta = self.options.beta
        chosen, rejected = logratios(inputs)
        if self.options.length_normalize:
            policy_chosen, policy_rejected = inputs.policy.pairs()
            chosen_h = chosen / policy_chosen.num_tokens.clamp(min=1)
            rejected_h = rejected / policy_rejected.num_tokens.clamp(min=1)
        else:
            chosen_h, rejected_h = chosen, rejected
        losses = (chosen_h - rejected_h - 1 / (2 * beta)) ** 2
        return LossOutput(losses.mean(), preference_metrics(inputs, beta * chosen, beta * rejected))


@hookimpl
def register_losses(register):
    """Register DPO and IPO."""
    register(DPOLoss)
    register(IPOLoss)
