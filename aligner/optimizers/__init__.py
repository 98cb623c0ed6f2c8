"""Optimizer plugins: what builds a stage's ``torch.optim.Optimizer`` (``stages[i].optimizer``).

An optimizer plugin only decides how the trainable weights are updated: which parameter groups,
which learning rate per group, which update rule. The stage runner (``aligner.training.runner``) keeps the
rest, for every optimizer alike: the LR schedule, gradient clipping, the non-finite guard, and
saving and loading the optimizer's ``state_dict`` in checkpoints (so a resume is exact as long as
the optimizer's ``state_dict`` round-trips its state).

Built in, one module each: ``adamw`` (the default), ``adamw_8bit`` (bitsandbytes), ``lora_plus``
and ``lora_fa`` (peft's helpers in ``peft.optimizers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from aligner.config import format_loc
from aligner.errors import ConfigError, PluginError


@dataclass
class OptimizerContext:
    """What an optimizer plugin builds the stage's optimizer from.

    ``named_parameters``: the weights that train, as ``(name, parameter)`` in ``module``'s order (names
    as ``module.named_parameters()`` gives them). ``module``: what the algorithm trains (the policy, or
    the policy with a value head for PPO). ``policy``: the policy inside it, already wrapped by the
    PEFT backend (a ``peft.PeftModel`` for adapter backends): what structure-aware methods inspect.
    ``learning_rate`` and ``weight_decay`` are the stage's ``train.learning_rate`` and
    ``train.weight_decay``; ``stage`` is the prepared stage (``aligner.training.stages.PreparedStage``).
    """

    named_parameters: list[tuple[str, torch.nn.Parameter]]
    module: torch.nn.Module
    policy: torch.nn.Module
    learning_rate: float
    weight_decay: float
    stage: Any = None

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters alone, in order."""
        return [p for _, p in self.named_parameters]


def lora_kind(peft_backend: Any) -> str | None:
    """What kind of adapters a stage's PEFT backend adds: ``"lora"``, ``"dora"`` (LoRA with magnitude
    vectors), ``"none"`` (no LoRA: full fine-tuning or another peft method) or ``None`` (a third-party
    backend this cannot tell about; the optimizer then checks the parameters when it is built)."""
    from aligner.peft_backends.lora import LoRABackend
    from aligner.peft_backends.peft_generic import PeftMethodBackend, build_peft_config

    if isinstance(peft_backend, LoRABackend):
        return "dora" if peft_backend.lora_config().use_dora else "lora"
    if isinstance(peft_backend, PeftMethodBackend):
        options = peft_backend.options
        if options.method.strip().lower() != "lora":
            return "none"
        config = build_peft_config(options.method, dict(options.model_extra or {}))
        return "dora" if getattr(config, "use_dora", False) else "lora"
    if peft_backend.adds_adapters is False:
        return "none"
    return None


def refuse_without_lora(optimizer: str, stage: Any, what: str, allow_dora: bool) -> None:
    """A ``ConfigError`` naming ``stages[i].peft`` when the stage's backend adds no LoRA adapters the
    optimizer ``optimizer`` can work on (``what`` says why it needs them)."""
    kind = lora_kind(stage.peft)
    if kind == "lora" or kind is None or (kind == "dora" and allow_dora):
        return
    loc = ("stages", stage.index, "peft")
    found = "DoRA adapters" if kind == "dora" else f"the PEFT backend '{stage.peft.name}'"
    raise ConfigError(f"stage '{stage.name}': optimizer '{optimizer}' ('{format_loc((*loc[:2], 'optimizer', 'name'))}') "
                      f"{what}, but '{format_loc(loc)}' has {found}; use {{name: lora, ...}} or "
                      f"{{name: qlora, ...}}{' without dora' if kind == 'dora' else ''}")


def require_parameters(optimizer: str, context: OptimizerContext, marker: str, what: str) -> None:
    """A ``PluginError`` when no trainable parameter name contains ``marker`` (e.g. ``lora_B``): a
    backend that :func:`lora_kind` could not judge added no LoRA weights."""
    if not any(marker in name for name, _ in context.named_parameters):
        backend = getattr(getattr(context.stage, "peft", None), "name", "?")
        raise PluginError(f"optimizer '{optimizer}' {what}, but the PEFT backend '{backend}' trains no "
                          f"'{marker}' weights")
