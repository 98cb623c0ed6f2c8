"""``lora`` and ``dora``: low-rank adapters through peft (Hu et al., 2021; DoRA: Liu et al., 2024)."""

from __future__ import annotations

import torch
from pydantic import Field

from aligner.hookspecs import hookimpl
from aligner.peft_backends.quantization import guard_4bit_training
from aligner.protocols import Options


class LoRABackend:
    """Wraps the model with peft LoRA adapters; only adapter weights train."""

    name = "lora"
    default_dora = False
    adds_adapters = True  # peft adapters: disable_adapter() gives back the base model (qlora and dora inherit it)

    class Options(Options):
        """LoRA hyper-parameters (peft's ``LoraConfig``)."""

        r: int = Field(8, gt=0, description="rank")
        alpha: float = Field(16, gt=0, description="scaling numerator (alpha / r, or alpha / sqrt(r) with rslora)")
        dropout: float = Field(0.0, ge=0, lt=1)
        target_modules: list[str] | str = Field("all-linear", description="module names, or 'all-linear'")
        rslora: bool = False
        dora: bool | None = Field(None, description="weight-decomposed LoRA (default: off, on for 'dora')")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def lora_config(self, model: torch.nn.Module | None = None):
        """The peft ``LoraConfig`` these options describe (for a classifier ``model``: the SEQ_CLS task)."""
        from peft import LoraConfig

        o = self.options
        dora = self.default_dora if o.dora is None else o.dora
        # A reward model's fresh score head must train in full: peft's SEQ_CLS task keeps it trainable.
        task = "SEQ_CLS" if model is not None and type(model).__name__.endswith("ForSequenceClassification") \
            else "CAUSAL_LM"
        return LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules,
                          use_rslora=o.rslora, use_dora=dora, task_type=task)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Add fresh adapters (peft freezes every other weight)."""
        from peft import get_peft_model

        wrapped = get_peft_model(model, self.lora_config(model))
        # A base model quantised before this stage must not be repacked by an eval forward either.
        guard_4bit_training(wrapped)
        return wrapped

    def release(self, model: torch.nn.Module) -> torch.nn.Module:
        """After the stage: merge the adapters so the next stage starts from a plain model."""
        return model.merge_and_unload()


class DoRABackend(LoRABackend):
    """LoRA with weight decomposition (magnitude + direction): ``lora`` with ``dora: true``."""

    name = "dora"
    default_dora = True


@hookimpl
def register_peft_backends(register):
    """Register LoRA and DoRA."""
    register(LoRABackend)
    register(DoRABackend)
