"""Reward-model training: a Bradley-Terry loss on the scalar scores of a sequence-classification head.

With ``s_c``/``s_r`` the model's scores for the chosen/rejected sequences (prompt + completion), an
optional per-pair ``margin`` column ``m`` (Llama 2's margin loss) and a centring coefficient ``c``
(Eisenstein et al., 2023):

    loss = mean(-log sigmoid(s_c - s_r - m)) + c * mean((s_c + s_r)^2)

as TRL's RewardTrainer computes it. The loss declares ``forward_kind = "reward"``: the run then builds
a classification model with one label (``AutoModelForSequenceClassification``, or
``LlamaForSequenceClassification`` for a tiny spec) and ``compute_losses`` passes its scores in
``LossInputs.scores`` instead of computing log-probs. The saved model loads with
``AutoModelForSequenceClassification.from_pretrained``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.protocols import PREFERENCE, LossInputs, LossOutput, Options


class RewardModelLoss:
    """Bradley-Terry pairwise loss with optional margins and reward centring."""

    name = "reward_model"
    data_formats = (PREFERENCE,)
    needs_reference = False
    forward_kind = "reward"

    class Options(Options):
        """Reward-model knobs."""

        center_rewards_coefficient: float = Field(0.0, ge=0, description="weight of mean((s_c + s_r)^2); 0 = off")
        use_margin: bool = Field(True, description="subtract the rows' 'margin' column when the data has one")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def compute(self, inputs: LossInputs) -> LossOutput:
        """Mean Bradley-Terry loss over the pairs (plus the centring term)."""
        if inputs.scores is None:
            raise ValueError("reward_model needs sequence scores; its stage must run the 'reward' forward")
        scores = inputs.scores.to(torch.promote_types(inputs.scores.dtype, torch.float32))
        chosen, rejected = scores.chunk(2)
        gap = chosen - rejected
        margin = inputs.batch.get("margin")
        if self.options.use_margin and margin is not None:
            gap = gap - margin.to(gap.device, gap.dtype)
        loss = -F.logsigmoid(gap).mean()
        if self.options.center_rewards_coefficient:
            loss = loss + self.options.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        detached_chosen, detached_rejected = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": (detached_chosen > detached_rejected).float().mean(),
            "margin": (detached_chosen - detached_rejected).mean(),
            "rewards/chosen": detached_chosen.mean(),
            "rewards/rejected": detached_rejected.mean(),
            "rewards/mean": torch.cat([detached_chosen, detached_rejected]).mean(),
        }
        return LossOutput(loss, metrics)


@hookimpl
def register_losses(register):
    """Register the reward-model loss."""
    register(RewardModelLoss)
