"""``disabled_adapter``: the reference is the policy's own base model with its adapters switched off.

With a PEFT backend the frozen base weights *are* the starting policy (LoRA-style adapters start
as the identity), so no second copy is needed: the reference pass runs the same module inside
peft's ``disable_adapter()`` context. Memory cost: nothing beyond activations.
"""

from __future__ import annotations

from typing import Any

import torch

from aligner.errors import ConfigError
from aligner.hookspecs import hookimpl
from aligner.protocols import Options, ReferenceContext, ReferenceNeeds, Requires, SequenceLogProbs


def peft_model_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The peft model inside ``model`` (through DDP-style ``.module`` wrappers), or ``None``."""
    while not hasattr(model, "disable_adapter"):
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return None
        model = inner
    return model


class DisabledAdapterReference:
    """Runs the policy's base model (adapters off) without gradient."""

    name = "disabled_adapter"
    # Declared, not only checked in setup: a stage with full fine-tuning is refused before anything
    # is written or loaded, naming both keys.
    requires = (Requires("peft", "adds_adapters", what="adds adapters that can be switched off (this reference is "
                         "the policy's base model with its adapters disabled)",
                         hint="use a PEFT backend that adds adapters, or reference 'cached' or 'frozen_copy' with "
                              "full fine-tuning"),)
    # ``reference: auto`` for values made during training when the backend adds adapters: no second copy.
    auto_priority = 20

    @classmethod
    def usable_for(cls, needs: ReferenceNeeds) -> bool:
        """When the stage needs a reference and its PEFT backend adds adapters to switch off."""
        return needs.needs_reference and needs.peft_adds_adapters

    class Options(Options):
        """No options."""

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.model: torch.nn.Module | None = None
        self.logprobs_fn: Any = None
        self.forward_passes = 0

    def setup(self, context: ReferenceContext) -> None:
        """Check that the policy has adapters to switch off; keep a handle on it (not a copy)."""
        # ``requires`` refuses built-in backends earlier; a plugin backend that does not declare
        # ``adds_adapters`` is only found out here.
        if peft_model_of(context.policy) is None:
            raise ConfigError(
                f"reference 'disabled_adapter' needs a PEFT backend (lora, qlora, dora, peft), but the stage's "
                f"'peft' is '{getattr(context.peft_backend, 'name', '?')}', which trains the weights themselves; "
                "use reference 'cached' or 'frozen_copy' with full fine-tuning")
        self.model = context.policy
        self.logprobs_fn = context.logprobs_fn

    @torch.no_grad()
    def logprobs(self, batch: dict[str, Any], token_level: bool = False) -> SequenceLogProbs:
        """Reference log-probs of the batch's completions, adapters disabled for this call only.

        ``token_level`` adds per-token values (PPO's per-token KL penalty needs them).
        """
        assert self.model is not None, "setup() was not called"
        peft_model = peft_model_of(self.model)
        self.forward_passes += 1
        with peft_model.disable_adapter():
            result = self.logprobs_fn(self.model, batch, token_level=token_level)
        return result.detach()


@hookimpl
def register_reference_policies(register):
    """Register ``disabled_adapter``."""
    register(DisabledAdapterReference)
