"""``adamw``: ``torch.optim.AdamW`` (Loshchilov & Hutter, 2019), the default optimizer of every stage."""

from __future__ import annotations

import torch
from pydantic import Field

from aligner.hookspecs import Register, hookimpl
from aligner.optimizers import OptimizerContext
from aligner.protocols import Options


class AdamW:
    """``torch.optim.AdamW`` over the trainable weights, one parameter group, with the stage's
    ``train.learning_rate`` and ``train.weight_decay``."""

    name = "adamw"

    class Options(Options):
        """Adam's moment coefficients and epsilon (torch's defaults)."""

        betas: tuple[float, float] = Field((0.9, 0.999), description="coefficients of the moment averages")
        eps: float = Field(1e-8, gt=0, description="added to the denominator for stability")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def build(self, context: OptimizerContext) -> torch.optim.Optimizer:
        """One group of plain parameters: exactly the optimizer (and checkpoint layout) of the runs
        before optimizers were plugins, so their results and checkpoints stay valid bit for bit."""
        # Plain parameters, not (name, parameter) pairs: torch would add 'param_names' to the
        # checkpointed state, and checkpoints written before would no longer load.
        return torch.optim.AdamW(context.parameters, lr=context.learning_rate, weight_decay=context.weight_decay,
                                 betas=self.options.betas, eps=self.options.eps)


@hookimpl
def register_optimizers(register: Register) -> None:
    """Register AdamW."""
    register(AdamW)
