"""Supervised fine-tuning: mean negative log-likelihood of the completion tokens.

On preference data it trains on the chosen completions and on unpaired data on the desirable ones,
so it can be added to any preference loss with a weight (RPO-style:
``losses: [{name: dpo}, {name: sft, weight: 0.2}]``, or beside ``kto`` on unpaired rows). A stage
whose only loss is ``sft`` runs preference rows as prompt + chosen rows: the rejected completions
are never computed.
"""

from __future__ import annotations

from aligner.hookspecs import hookimpl
from aligner.protocols import PREFERENCE, SFT, UNPAIRED, LossInputs, LossOutput, Options


class SFTLoss:
    """Token-averaged NLL over the completion tokens of the micro-batch."""

    name = "sft"
    data_formats = (SFT, PREFERENCE, UNPAIRED)
    needs_reference = False
    # Only the chosen completion of a pair: a stage whose losses all say so runs preference rows as
    # sft rows, so the rejected completions are never computed (aligner.training.stages.reads_only_chosen).
    preference_completions = ("chosen",)

    class Options(Options):
        """SFT takes no options beyond its weight."""

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def compute(self, inputs: LossInputs) -> LossOutput:
        """``-sum(log p(completion tokens)) / number of completion tokens`` (chosen/desirable ones only)."""
        policy = inputs.policy
        if inputs.data_format == PREFERENCE:
            policy = policy.pairs()[0]
        elif inputs.data_format == UNPAIRED:
            # Only desirable completions are imitated; a batch without one contributes 0.
            policy = policy.select(inputs.batch["labels"].to(policy.logps.device))
        tokens = policy.num_tokens.sum().clamp(min=1)
        nll = -policy.logps.sum() / tokens
        return LossOutput(loss=nll, metrics={"nll": nll.detach()})


@hookimpl
def register_losses(register):
    """Register the SFT loss."""
    register(SFTLoss)
