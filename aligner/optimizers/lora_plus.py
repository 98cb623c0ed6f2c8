"""``lora_plus``: LoRA+ (Hayou et al., 2024): LoRA's B matrices learn ``lr_ratio`` times faster than
its A matrices, through peft's ``peft.optimizers.create_loraplus_optimizer``."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from aligner.hookspecs import Register, hookimpl
from aligner.optimizers import OptimizerContext, refuse_without_lora, require_parameters
from aligner.protocols import Options

NEEDS = "trains LoRA's A and B matrices at different learning rates, so it needs LoRA adapters"


class LoRAPlus:
    """AdamW with two learning rates: ``train.learning_rate`` for A, ``lr_ratio`` times it for B.

    peft's grouping is used as is: besides the ``lora_B`` weights, every 1-D weight (biases, norms)
    trains at the B rate, and LoRA on embeddings at ``lr_embedding``. The stage's LR schedule scales
    every group by the same factor, so the ratio holds at every step.
    """

    name = "lora_plus"

    class Options(Options):
        """The B/A learning-rate ratio and Adam's coefficients."""

        lr_ratio: float = Field(16.0, ge=1, description="B's learning rate over A's (the paper's lambda)")
        lr_embedding: float = Field(1e-6, gt=0, description="learning rate of LoRA on embedding layers (peft's default)")
        betas: tuple[float, float] = Field((0.9, 0.999), description="coefficients of the moment averages")
        eps: float = Field(1e-8, gt=0, description="added to the denominator for stability")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def check_stage(self, stage: Any) -> None:
        """Refuse a stage whose PEFT backend adds no LoRA adapters (DoRA's are fine)."""
        refuse_without_lora(self.name, stage, NEEDS, allow_dora=True)

    def build(self, context: OptimizerContext) -> torch.optim.Optimizer:
        """peft's LoRA+ grouping over the whole trained module (a value head trains too)."""
        from peft.optimizers import create_loraplus_optimizer

        require_parameters(self.name, context, "lora_B", NEEDS)
        o = self.options
        # The module, not only the policy: peft's helper groups by parameter name and shape, which
        # also places the weights of a PPO value head; it reads only trainable parameters.
        return create_loraplus_optimizer(context.module, torch.optim.AdamW, lr=context.learning_rate,
                                         loraplus_lr_ratio=o.lr_ratio, loraplus_lr_embedding=o.lr_embedding,
                                         loraplus_weight_decay=context.weight_decay, betas=o.betas, eps=o.eps)


@hookimpl
def register_optimizers(register: Register) -> None:
    """Register LoRA+."""
    register(LoRAPlus)
