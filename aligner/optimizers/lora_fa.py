"""``lora_fa``: LoRA-FA (Zhang et al., 2023): LoRA's A matrices stay frozen at their random
initialisation and only B trains, so no gradient (nor optimizer state) is kept for A and the
activations A needs for its gradient are not stored. Through peft's
``peft.optimizers.create_lorafa_optimizer``, whose update of B also projects B's gradient onto the
full-rank gradient it stands for."""

from __future__ import annotations

from typing import Any

import torch

from aligner.errors import PluginError
from aligner.hookspecs import Register, hookimpl
from aligner.optimizers import OptimizerContext, refuse_without_lora, require_parameters
from aligner.protocols import Options

NEEDS = "freezes LoRA's A matrices and trains B, so it needs plain LoRA adapters"


class LoRAFA:
    """peft's LoRA-FA optimizer: A frozen, B trained (AdamW-style, with the projected gradient); any
    other trainable weight (a value head, a classifier's score head) trains with plain AdamW-style
    updates in the same optimizer."""

    name = "lora_fa"

    class Options(Options):
        """No settings of its own: learning rate and weight decay come from ``train``."""

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def check_stage(self, stage: Any) -> None:
        """Refuse a stage without LoRA adapters, or with DoRA's (its magnitude vectors break peft's
        A/B pairing), before any model loads."""
        refuse_without_lora(self.name, stage, NEEDS, allow_dora=False)

    def build(self, context: OptimizerContext) -> torch.optim.Optimizer:
        """peft's helper on the policy (it freezes every ``lora_A``); weights of the trained module
        outside the policy join as one more group."""
        from peft import PeftModel
        from peft.optimizers import create_lorafa_optimizer

        require_parameters(self.name, context, "lora_A", NEEDS)
        if any("lora_magnitude_vector" in name for name, _ in context.named_parameters):
            raise PluginError(f"optimizer '{self.name}' {NEEDS}, but the stage trains DoRA magnitude vectors")
        policy = context.policy
        if not isinstance(policy, PeftModel):
            raise PluginError(f"optimizer '{self.name}' {NEEDS}: peft's helper needs a peft model, but the policy "
                              f"is a {type(policy).__name__}")
        adapter = policy.active_adapters[0]
        settings = policy.peft_config[adapter]
        optimizer = create_lorafa_optimizer(policy, r=settings.r, lora_alpha=settings.lora_alpha,
                                            lr=context.learning_rate, weight_decay=context.weight_decay)
        in_policy = {id(p) for p in policy.parameters()}
        extra = [(n, p) for n, p in context.named_parameters if id(p) not in in_policy]
        if extra:
            # peft's optimizer updates a parameter whose name has no "lora" as AdamW (no scaling
            # factor); the names must not contain "lora", or it would pair them as A and B.
            if any("lora" in n for n, _ in extra):
                raise PluginError(f"optimizer '{self.name}': trainable weights outside the policy are named like "
                                  f"LoRA weights: {', '.join(n for n, _ in extra if 'lora' in n)}")
            optimizer.add_param_group({"params": [p for _, p in extra], "names": [n for n, _ in extra],
                                       "scaling_factors": [None] * len(extra), "lr": context.learning_rate,
                                       "weight_decay": context.weight_decay})
        return optimizer


@hookimpl
def register_optimizers(register: Register) -> None:
    """Register LoRA-FA."""
    register(LoRAFA)
