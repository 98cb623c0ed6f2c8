"""``full``: full fine-tuning, every weight trains."""

from __future__ import annotations

import torch

from aligner.hookspecs import hookimpl
from aligner.protocols import Options


class FullFineTuning:
    """Leaves the model as it is with every parameter trainable."""

    name = "full"
    adds_adapters = False  # the weights themselves train: there is nothing to switch off for a reference

    class Options(Options):
        """No options."""

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make every parameter trainable."""
        model.requires_grad_(True)
        return model


@hookimpl
def register_peft_backends(register):
    """Register full fine-tuning."""
    register(FullFineTuning)
