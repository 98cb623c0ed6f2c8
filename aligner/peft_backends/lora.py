"""``lora`` and ``dora``: low-rank adapters through peft (Hu et al., 2021; DoRA: Liu et al., 2024).

With ``adapter_name`` a stage trains a *named* adapter: it is added next to the named adapters of
earlier stages on the same base (only it trains; the others are switched off while it does) and it
is not merged at the end of the stage, so the final model holds them all in peft's multi-adapter
layout (one subfolder per adapter), for ``aligner generate --adapter`` and ``aligner export --adapter``.
"""

from __future__ import annotations

import logging
import re

import torch
from pydantic import Field, field_validator, model_validator

from aligner.errors import ConfigError
from aligner.hookspecs import hookimpl
from aligner.peft_backends.quantization import guard_4bit_training
from aligner.protocols import Options

log = logging.getLogger("aligner")

# A name becomes a folder of the saved model: one path component, no spaces or separators.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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
        adapter_name: str | None = Field(None, description=(
            "train a named adapter, kept side by side with the named adapters of earlier stages (not merged); "
            "the final model holds each in its own subfolder"))

        @field_validator("adapter_name")
        @classmethod
        def _folder_name(cls, value: str | None) -> str | None:
            if value is not None and not ADAPTER_NAME.fullmatch(value):
                raise ValueError(f"'{value}' cannot name an adapter: it becomes a folder name, so use letters, "
                                 "digits, '_', '-' and '.' (starting with a letter or digit)")
            return value

        @model_validator(mode="after")
        def _only_lora_and_dora(self):
            # Subclasses (qlora) build their adapters in their own apply(), which knows no names:
            # refuse the option rather than train an unnamed adapter and merge it.
            if self.adapter_name is not None and type(self) is not LoRABackend.Options:
                raise ValueError("'adapter_name' works with the lora and dora backends only")
            return self

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
        """Add fresh adapters (peft freezes every other weight); a named one joins earlier named ones."""
        from peft import PeftModel, get_peft_model

        name = self.options.adapter_name
        # A PeftModel with no "default" adapter is one that earlier named stages left unmerged (an
        # unmerged prompt-learning stage of the generic backend keeps "default", and its old path).
        if isinstance(model, PeftModel) and (name is not None or "default" not in model.peft_config):
            wrapped = self._add_named(model)
        elif name is None:
            wrapped = get_peft_model(model, self.lora_config(model))
        else:
            wrapped = get_peft_model(model, self.lora_config(model), adapter_name=name)
        # A base model quantised before this stage must not be repacked by an eval forward either.
        guard_4bit_training(wrapped)
        return wrapped

    def _add_named(self, model: torch.nn.Module) -> torch.nn.Module:
        """Train this stage's adapter on a model that already holds the named adapters of earlier stages."""
        name, existing = self.options.adapter_name, sorted(model.peft_config)
        if name is None:
            raise ConfigError(f"peft '{self.name}': the model holds the named adapters of earlier stages "
                              f"({', '.join(existing)}), which are kept unmerged; give this stage an 'adapter_name' "
                              "too (or put the unnamed stages first)")
        if name in model.peft_config:
            # e.g. SFT then DPO of one task's adapter: the same weights continue, with their own settings.
            log.info("peft '%s': adapter '%s' (from an earlier stage) continues training", self.name, name)
        else:
            model.add_adapter(name, self.lora_config(model))
        # Only the active adapter trains (peft sets requires_grad per adapter); the others are off in
        # the forward pass, so each adapter learns its task on the base alone.
        model.set_adapter(name)
        return model

    def release(self, model: torch.nn.Module) -> torch.nn.Module:
        """After the stage: merge the adapters so the next stage starts from a plain model.

        A named adapter is kept as it is: the next stage adds its own next to it on the same base.
        """
        if self.options.adapter_name is not None:
            return model
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
