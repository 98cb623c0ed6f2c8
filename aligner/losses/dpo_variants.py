"""More DPO-family losses on the same log-ratios: hinge (SLiC-style) and robust DPO.

With ``r_c``/``r_r`` the policy-minus-reference log-ratios of the chosen/rejected completions and
``z = beta * (r_c - r_r)``:

- hinge (Zhao et al., 2023, SLiC-HF; TRL's ``hinge``): ``max(0, 1 - z)``. Here ``beta`` is the inverse
  of the margin: pairs whose log-ratio gap exceeds ``1 / beta`` contribute nothing.
- robust (Chowdhury et al., 2024, "Provably Robust DPO"): an unbiased estimate of the DPO loss when
  a fraction ``eps`` of the labels are flipped:
  ``((1 - eps) * -log sigmoid(z) - eps * -log sigmoid(-z)) / (1 - 2 eps)``.
  It differs from conservative DPO (``dpo`` with ``label_smoothing``), which *adds* the flipped term
  instead of subtracting it; with ``eps = 0`` both are plain DPO.

Implicit rewards are ``beta * r`` as in DPO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.losses.common import logratios, preference_metrics
from aligner.protocols import PREFERENCE, LossInputs, LossOutput, Options


class HingeLoss:
    """Hinge loss on the scaled log-ratio gap."""

    name = "hinge"
    data_formats = (PREFERENCE,)
    needs_reference = True

    class Options(Options):
        """Hinge's knobs."""

        beta: float = Field(0.1, gt=0, description="inverse margin: pairs with gap > 1/beta give zero loss")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def compute(self, inputs: LossInputs) -> LossOutput:
        """Mean hinge loss over the pairs of the micro-batch."""
        beta = self.options.beta
        chosen, rejected = logratios(inputs)
        losses = torch.relu(1 - beta * (chosen - rejected))
        return LossOutput(losses.mean(), preference_metrics(inputs, beta * chosen, beta * rejected))


class RobustDPOLoss:
    """DPO de-biased for a known rate of flipped preference labels."""

    name = "robust_dpo"
    data_formats = (PREFERENCE,)
    needs_reference = True

    class Options(Options):
        """Robust DPO's knobs."""

        beta: float = Field(0.1, gt=0, description="strength of the KL constraint to the reference")
        label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="assumed rate of flipped labels (eps)")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def compute(self, inputs: LossInputs) -> LossOutput:
        """Mean robust-DPO loss over the pairs of the micro-batch."""
        beta, eps = self.options.beta, self.options.label_smoothing
        chosen, rejected = logratios(inputs)
        z = beta * (chosen - rejected)
        losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        return LossOutput(losses.mean(), preference_metrics(inputs, beta * chosen, beta * rejected))


@hookimpl
def register_losses(register):
    """Register hinge and robust DPO."""
    register(HingeLoss)
    register(RobustDPOLoss)
