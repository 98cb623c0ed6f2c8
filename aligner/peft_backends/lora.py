"""``lora``: low-rank adapters through peft (Hu et al., 2021), with rsLoRA and DoRA switches."""

from __future__ import annotations

import torch
from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.protocols import Options


class LoRABackend:
    """Wraps the model with peft LoRA adapters; only adapter weights train."""

    name = "lora"

    class Options(Options):
        """LoRA hyper-parameters (peft's ``LoraConfig``)."""

        r: int = Field(8, gt=0, description="rank")
        alpha: float = Field(16, gt=0, description="scaling numerator (alpha / r, or alpha / sqrt(r) with rslora)")
        dropout: float = Field(0.0, ge=0, lt=1)
        target_modules: list[str] | str = Field("all-linear", description="module names, or 'all-linear'")
        rslora: bool = False
        dora: bool = False

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Add fresh adapters (peft freezes every other weight)."""
        from peft import LoraConfig, get_peft_model

        o = self.options
        # A reward model's fresh score head must train in full: peft's SEQ_CLS task keeps it trainable.
        task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
        config = LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules,
                            use_rslora=o.rslora, use_dora=o.dora, task_type=task)
        return get_peft_model(model, config)

    def release(self, model: torch.nn.Module) -> torch.nn.Module:
        """After the stage: merge the adapters so the next stage starts from a plain model."""
        return model.merge_and_unload()


@hookimpl
def register_peft_backends(register):
    """Register LoRA."""
    register(LoRABackend)
